"""What an evaluation has accumulated: per-layer sums and per-token values of every stream.

One `EvalTally` is the whole state of a run between layers (saved after every layer in the
work folder, so `resume` continues it exactly), the output of a `shard` run, and what
`merge_tallies` combines: sums add, per-token values are concatenated and put in sample order
(the held-out sample's index in the whole data set, then position), so the report of merged
shards is the report of the unsharded run. A file is safetensors (float64 and int64 arrays, a
JSON description in the metadata): nothing is ever unpickled. No torch here.

Arrays: `residual` [streams, layers, 2] and `moe` [streams, MoE layers, 2] hold the sums
(sum diff², sum ref²) of `metrics.summarize`; per stream s, `loss.s` (predicted tokens),
`kl.s` and `agree.s` (every token; not for the original, stream 0); `token_sample` and
`loss_sample` give each value's sample.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shardcut.format.errors import ShardcutError
from shardcut.ops.evaluation.metrics import EvalReport, summarize

TALLY_FORMAT = "shardcut-eval-tally/1"


@dataclass
class StreamInfo:
    name: str
    kind: str  # "original", "plan" or "checkpoint"
    ratio: float
    kept: int


@dataclass
class EvalTally:
    """See the module docstring. `about`: model, data, num_experts, device, dtype, warnings,
    overlap, shard, samples, tokens, compat (what must agree for tallies to merge)."""

    streams: list[StreamInfo]
    moe_keys: list[str]
    layers: int
    about: dict
    residual: np.ndarray = None  # type: ignore[assignment]
    moe: np.ndarray = None  # type: ignore[assignment]
    loss: list[list[np.ndarray]] = field(default_factory=list)
    kl: list[list[np.ndarray]] = field(default_factory=list)
    agree: list[list[np.ndarray]] = field(default_factory=list)
    token_sample: list[np.ndarray] = field(default_factory=list)
    loss_sample: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        S = len(self.streams)
        if self.residual is None:
            self.residual = np.zeros((S, self.layers, 2))
        if self.moe is None:
            self.moe = np.zeros((S, len(self.moe_keys), 2))
        for name in ("loss", "kl", "agree"):
            if not getattr(self, name):
                setattr(self, name, [[] for _ in range(S)])

    # -- accumulating ------------------------------------------------------------------------

    def add_tokens(self, samples: np.ndarray, predicted: np.ndarray, per_stream: Sequence[tuple]) -> None:
        """One batch of the head step: each token's sample, the samples of its predicted tokens,
        and per stream (kl, agree, loss) (None, None, loss for the original)."""
        self.token_sample.append(np.asarray(samples, dtype=np.int64))
        self.loss_sample.append(np.asarray(predicted, dtype=np.int64))
        for s, (kl, agree, loss) in enumerate(per_stream):
            self.loss[s].append(np.asarray(loss, dtype=np.float64))
            if s:
                self.kl[s].append(np.asarray(kl, dtype=np.float64))
                self.agree[s].append(np.asarray(agree, dtype=np.float64))

    # -- the report --------------------------------------------------------------------------

    def _ordered(self, parts: list[np.ndarray], samples: list[np.ndarray]) -> np.ndarray:
        values = np.concatenate(parts) if parts else np.zeros(0)
        order = np.argsort(np.concatenate(samples) if samples else np.zeros(0, np.int64), kind="stable")
        return values[order]

    def report(self) -> EvalReport:
        """The report: every number is a function of the sums and of the values in sample order."""
        a = self.about
        if not self.token_sample:
            raise ShardcutError("the evaluation has no per-token values yet (its LM head step did not run)")
        loss = self._ordered(self.loss[0], self.loss_sample)
        plans = []
        for s, info in enumerate(self.streams[1:], start=1):
            plans.append(
                summarize(
                    info.name,
                    info.kind,
                    info.ratio,
                    info.kept,
                    self._ordered(self.loss[s], self.loss_sample),
                    self._ordered(self.kl[s], self.token_sample),
                    self._ordered(self.agree[s], self.token_sample),
                    {k: list(self.moe[s, j]) for j, k in enumerate(self.moe_keys)},
                    [list(r) for r in self.residual[s]],
                )
            )
        mean = float(loss.mean()) if len(loss) else float("nan")
        return EvalReport(
            model=a["model"],
            data=a["data"],
            samples=int(a["samples"]),
            tokens=int(sum(len(t) for t in self.token_sample)),
            predicted_tokens=len(loss),
            loss=mean,
            perplexity=float(np.exp(mean)),
            num_experts=int(a["num_experts"]),
            plans=plans,
            warnings=list(a.get("warnings", [])),
            overlap=a.get("overlap"),
            device=a.get("device", ""),
            dtype=a.get("dtype", ""),
        )

    # -- files -------------------------------------------------------------------------------

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"residual": self.residual, "moe": self.moe}
        if self.token_sample:
            out["token_sample"] = np.concatenate(self.token_sample)
            out["loss_sample"] = np.concatenate(self.loss_sample)
            for s in range(len(self.streams)):
                out[f"loss.{s}"] = np.concatenate(self.loss[s])
                if s:
                    out[f"kl.{s}"] = np.concatenate(self.kl[s])
                    out[f"agree.{s}"] = np.concatenate(self.agree[s])
        return {k: np.ascontiguousarray(v) for k, v in out.items()}

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        meta = {
            "format": TALLY_FORMAT,
            "about": json.dumps(self.about, sort_keys=True),
            "streams": json.dumps([vars(s) for s in self.streams]),
            "moe_keys": json.dumps(self.moe_keys),
            "layers": str(self.layers),
        }
        return save(self.arrays(), metadata=meta)

    def validate(self, source: str | Path = "tally") -> None:
        S = len(self.streams)
        if self.residual.shape != (S, self.layers, 2) or self.moe.shape != (S, len(self.moe_keys), 2):
            raise ShardcutError("the tally's sums do not match its streams and layers", source)

    def save(self, path: str | Path) -> None:
        from shardcut.format.durable import atomic_write_bytes

        self.validate(path)
        atomic_write_bytes(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> EvalTally:
        """Read a tally (a shard's output or a run's saved state), checking its shapes."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        from shardcut.format.checkpoint import require_regular

        path = Path(path)
        try:
            require_regular(path)  # by stat: a FIFO is never opened
            data = path.read_bytes()
        except FileNotFoundError:
            raise ShardcutError("file not found", path) from None
        except OSError as exc:
            raise ShardcutError(f"cannot read the tally ({exc.strerror or exc})", path) from None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
            arrays = load(data)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ShardcutError(f"not a readable {TALLY_FORMAT} file ({exc})", path) from None
        if meta.get("format") != TALLY_FORMAT:
            raise ShardcutError(f"not a {TALLY_FORMAT} file (write one with a `shard` run)", path)
        try:
            streams = [StreamInfo(**s) for s in json.loads(meta["streams"])]
            tally = cls(streams, list(json.loads(meta["moe_keys"])), int(meta["layers"]), json.loads(meta["about"]))
            tally.residual, tally.moe = arrays["residual"].astype(np.float64), arrays["moe"].astype(np.float64)
            if "token_sample" in arrays:
                tally.token_sample, tally.loss_sample = [arrays["token_sample"]], [arrays["loss_sample"]]
                n, m = len(arrays["token_sample"]), len(arrays["loss_sample"])
                for s in range(len(streams)):
                    tally.loss[s] = [arrays[f"loss.{s}"]]
                    if len(tally.loss[s][0]) != m:
                        raise ValueError(f"loss.{s} holds {len(tally.loss[s][0])} values, not {m}")
                    if s:
                        tally.kl[s], tally.agree[s] = [arrays[f"kl.{s}"]], [arrays[f"agree.{s}"]]
                        if len(tally.kl[s][0]) != n or len(tally.agree[s][0]) != n:
                            raise ValueError(f"kl.{s} or agree.{s} do not hold {n} values")
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardcutError(f"malformed {TALLY_FORMAT} file ({exc})", path) from None
        tally.validate(path)
        return tally


def merge_tallies(tallies: Sequence[EvalTally], sources: Sequence[str | Path] | None = None) -> EvalTally:
    """The tally of the union of disjoint shards of one evaluation (same model, data, variants and
    settings): sums added, per-token values concatenated (the report orders them by sample)."""
    if not tallies:
        raise ShardcutError("nothing to merge")
    names = [str(s) for s in sources] if sources else [f"tally {i + 1}" for i in range(len(tallies))]
    first = tallies[0]
    seen: dict[str, str] = {}
    for t, name in zip(tallies, names, strict=True):
        if t.about.get("compat") != first.about.get("compat") or [vars(s) for s in t.streams] != [
            vars(s) for s in first.streams
        ]:
            raise ShardcutError(
                f"not a shard of the same evaluation as {names[0]} (model, data, variants or settings differ)", name
            )
        if not t.token_sample:
            raise ShardcutError("an unfinished tally (its LM head step did not run)", name)
        shard = str(t.about.get("shard"))
        if shard in seen:
            raise ShardcutError(f"shard {shard} is also {seen[shard]}: each shard may be merged once", name)
        seen[shard] = name
    about = dict(first.about, samples=sum(int(t.about["samples"]) for t in tallies), shard=None)
    out = EvalTally(first.streams, first.moe_keys, first.layers, about)
    out.residual = np.sum([t.residual for t in tallies], axis=0)
    out.moe = np.sum([t.moe for t in tallies], axis=0)
    for t in tallies:
        out.token_sample += t.token_sample
        out.loss_sample += t.loss_sample
        for s in range(len(out.streams)):
            out.loss[s] += t.loss[s]
            out.kl[s] += t.kl[s]
            out.agree[s] += t.agree[s]
    return out


def merge_tally_files(paths: Sequence[str | Path], out: str | Path | None = None, *, overwrite: bool = False):
    """`shardcut eval-merge`: the report of the shards' tallies (written to `out` when given)."""
    from shardcut.format.durable import check_output

    if out is not None:
        check_output(out, paths, overwrite=overwrite, what="report")
    report = merge_tallies([EvalTally.load(p) for p in paths], paths).report()
    if out is not None:
        report.save(out)
    return report
