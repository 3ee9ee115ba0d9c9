"""`evaluate()`: the quality of pruned variants of a MoE checkpoint, streamed one layer at a time.

Reuses the calibrator's machinery: the data spec and tokenisation (`calibration.data`), the
meta-device skeleton and the layer loader that reads a layer's tensors from the shards and
dequantises them on the device (`calibration.stream`), the padded batches (`make_batches`) and
the activation store that spills to disk under a memory budget (`calibration.store`).

Streams: the original's hidden states, one per plan (the same loaded layer run with its router
forbidden the pruned experts, `oracle.forbid_pruned_experts`: exactly what the pruned checkpoint
computes, DESIGN.md) and one per pruned checkpoint (its own layers, loaded next to the source's).
Each layer is read once per checkpoint, whatever the number of plans; activation memory is one
store per stream. After the last layer each stream goes through the model's own final norm and
LM head (the stack's forward with its layers replaced, so family-specific scaling applies), and
per-token loss, KL and agreement are taken in float64.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shardcut.format.checkpoint import open_checkpoint
from shardcut.format.errors import ShardcutError
from shardcut.format.hub import resolve_model
from shardcut.moe.model import describe
from shardcut.moe.oracle import forbid_pruned_experts
from shardcut.ops.calibration.data import CalibData, load_data
from shardcut.ops.calibration.observe import check_supported
from shardcut.ops.calibration.runner import CalibEvent, make_batches, resolve_device, resolve_dtype
from shardcut.ops.calibration.store import DEFAULT_RAM_FRACTION, ActivationStore, available_memory
from shardcut.ops.calibration.stream import (
    LayerLoader,
    TensorReader,
    capture_call,
    current_memory,
    make_skeleton,
    release_free_memory,
)
from shardcut.ops.evaluation.layers import load_head, logits_of, moe_block, refuse_pruned, run_with_block
from shardcut.ops.evaluation.metrics import EvalReport, summarize
from shardcut.ops.evaluation.tokens import original_tokens, variant_tokens
from shardcut.plans.plan import Plan, validate_plan

DEFAULT_MAX_LENGTH = 2048
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}


@dataclass
class _Checkpoint:
    """One streamed checkpoint: its skeleton and layer loader."""

    name: str
    model_dir: Path
    ckpt: object
    info: object
    skeleton: object
    loader: LayerLoader


@dataclass
class _Stream:
    """One variant's hidden states and what is accumulated about it."""

    name: str
    kind: str
    source: _Checkpoint
    keep: dict[str, list[int]] | None
    ratio: float
    kept: int
    store: ActivationStore | None = None
    moe: dict[str, list[float]] = field(default_factory=dict)  # plan key -> [sum diff², sum ref²]
    residual: list[list[float]] = field(default_factory=list)
    kl: list[np.ndarray] = field(default_factory=list)
    agree: list[np.ndarray] = field(default_factory=list)
    loss: list[np.ndarray] = field(default_factory=list)


@dataclass
class Evaluator:
    """One evaluation run; `evaluate()` is `Evaluator(...).run()`."""

    model: str
    data: str
    plans: Sequence[Plan | str | Path] = ()
    scores: str | Path | None = None
    ratios: Sequence[float] = ()
    criterion: str | None = "reap"
    protect_super_experts: bool = False
    protect: dict[str, list[int]] | None = None
    mtp_policy: str | None = None
    pruned: Sequence[str | Path] = ()
    samples: int | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    device: str = "auto"
    dtype: str | torch.dtype | None = None
    seed: int = 0
    max_memory: int | str | None = None
    batch_tokens: int | None = None
    trust_remote_code: bool = False
    work_dir: Path | None = None
    progress: Callable[[CalibEvent], None] | None = None

    def _emit(self, event: CalibEvent) -> None:
        if self.progress is not None:
            self.progress(event)

    def _open(self, model: str | Path) -> _Checkpoint:
        model_dir = resolve_model(str(model))
        ckpt = open_checkpoint(model_dir)
        info = describe(ckpt)
        check_supported(info, model_dir / "config.json")
        TensorReader(ckpt)  # refuses quantization schemes it cannot read, before any data is loaded
        skeleton = make_skeleton(ckpt, info, self.torch_dtype, self.trust_remote_code)
        return _Checkpoint(
            str(model), model_dir, ckpt, info, skeleton, LayerLoader(skeleton, ckpt, info, self.torch_device)
        )

    # -- setup -------------------------------------------------------------------------------

    def _prepare(self) -> None:
        if not (self.plans or self.ratios or self.pruned):
            raise ShardcutError("nothing to evaluate: give plans, ratios with a score file, or pruned checkpoints")
        if self.ratios and self.scores is None:
            raise ShardcutError("ratios need the score file to plan from")
        self.torch_device = resolve_device(self.device)
        self.torch_dtype = resolve_dtype(self.dtype, self.torch_device)
        self.src = self._open(self.model)
        info = self.src.info
        self.E = info.num_experts
        n = self.src.skeleton.num_layers
        self.keys = {layer.index: layer.key for layer in info.layers if not layer.mtp and layer.index < n}
        if not self.keys:
            raise ShardcutError("the model's forward reaches no MoE layer", self.src.model_dir / "config.json")
        self.streams = [_Stream("original", "original", self.src, None, 0.0, self.E)]
        for i, plan in enumerate(self.plans):
            p = plan if isinstance(plan, Plan) else Plan.load(plan)
            name = Path(p.origin).name if p.origin not in ("", "plan") else f"plan {i + 1}"
            self._add_plan(p, name)
        if self.ratios:
            from shardcut.ops.planning import make_plan

            for r in self.ratios:
                p, _ = make_plan(
                    self.src.model_dir,
                    self.scores,
                    ratio=float(r),
                    criterion=self.criterion,
                    protect_super_experts=self.protect_super_experts,
                    protect=self.protect,
                    mtp_policy=self.mtp_policy,
                )
                self._add_plan(p, f"ratio={float(r):g}")
        for out in self.pruned:
            self._add_checkpoint(out)
        self.budget_tokens = self.batch_tokens or DEFAULT_BATCH_TOKENS[self.torch_device.type]
        if self.budget_tokens < 1:
            raise ShardcutError(f"the batch token budget must be positive (got {self.budget_tokens})")
        vocab = info.text_config.get("vocab_size", info.config.get("vocab_size"))
        if not isinstance(vocab, int):
            raise ShardcutError("config has no integer vocab_size", self.src.model_dir / "config.json")
        self.data_set: CalibData = load_data(
            self.data,
            self.src.model_dir,
            samples=self.samples,
            max_length=self.max_length,
            seed=self.seed,
            vocab_size=vocab,
            trust_remote_code=self.trust_remote_code,
        )
        self.local = self.data_set.samples
        self.batches = make_batches([len(s) for s in self.local], self.budget_tokens)
        self.rows = sum(len(s) for s in self.local)
        # next-token targets in store row order (batches' samples back to back); -1: the last position
        targets = np.full(self.rows, -1, dtype=np.int64)
        for b in self.batches:
            row = b.start
            for j, length in zip(b.samples, b.lengths):
                targets[row : row + length - 1] = self.local[j][1:]
                row += length
        self.targets = targets
        self.hidden_size = int(self.src.skeleton.model.config.get_text_config().hidden_size)

    def _add_plan(self, plan: Plan, name: str) -> None:
        validate_plan(plan, self.src.info, plan.origin)
        kept = plan.num_experts
        self.streams.append(_Stream(name, "plan", self.src, plan.keep, 1 - kept / self.E, kept))

    def _add_checkpoint(self, out: str | Path) -> None:
        from shardcut.rewrite.writer import PLAN_COPY_NAME

        ck = self._open(out)
        src = self.src
        if ck.info.arch.name != src.info.arch.name or ck.skeleton.num_layers != src.skeleton.num_layers:
            raise ShardcutError(
                f"not a pruned copy of {src.name}: {ck.info.arch.name} with "
                f"{ck.skeleton.num_layers} layers, the source is {src.info.arch.name} with "
                f"{src.skeleton.num_layers}",
                ck.model_dir,
            )
        if [la.key for la in ck.info.layers] != [la.key for la in src.info.layers]:
            raise ShardcutError(f"its MoE layers differ from those of {src.name}", ck.model_dir)
        if (ck.model_dir / PLAN_COPY_NAME).is_file():
            validate_plan(Plan.load(ck.model_dir / PLAN_COPY_NAME), src.info, ck.model_dir / PLAN_COPY_NAME)
        kept = ck.info.num_experts
        self.streams.append(_Stream(Path(ck.model_dir).name, "checkpoint", ck, None, 1 - kept / self.E, kept))

    def _budget(self) -> int:
        if self.max_memory is None:
            return int(available_memory() * DEFAULT_RAM_FRACTION)
        from shardcut.rewrite.writer import parse_size

        return int(parse_size(self.max_memory))

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> EvalReport:
        self._prepare()
        n_layers = self.src.skeleton.num_layers
        self.steps = n_layers + 2
        warnings, overlap = self._check_overlap()
        for w in warnings:
            self._emit(CalibEvent("info", f"warning: {w}"))
        self._emit(
            CalibEvent(
                "info",
                f"data: {self.data_set.tokens} tokens in {len(self.local)} samples "
                f"({'; '.join(self.data_set.notes)}); {len(self.streams) - 1} variants",
            )
        )
        if self.work_dir is not None and not Path(self.work_dir).is_dir():
            raise ShardcutError("the work folder does not exist", self.work_dir)
        work = Path(tempfile.mkdtemp(prefix="shardcut-eval-", dir=self.work_dir))
        per_stream = self._budget() // len(self.streams)
        try:
            for i, s in enumerate(self.streams):
                s.store = ActivationStore(
                    self.rows, self.hidden_size, self.torch_dtype, per_stream, work / f"stream{i}"
                )
                s.residual = [[0.0, 0.0] for _ in range(n_layers)]
                s.moe = {k: [0.0, 0.0] for k in self.keys.values()}
            self._emit(
                CalibEvent(
                    "info",
                    f"{len(self.streams)} streams; {self.streams[0].store.describe()} each; "
                    f"device {self.torch_device}, {len(self.batches)} batches",
                )
            )
            with torch.inference_mode():
                self._embeddings()
                for i in range(n_layers):
                    self._layer(i)
                self._heads()
        finally:
            for s in self.streams:
                if s.store is not None:
                    s.store.close()
            shutil.rmtree(work, ignore_errors=True)
        self._emit(CalibEvent("done", step=self.steps, steps=self.steps))
        return self._report(warnings, overlap)

    def _check_overlap(self) -> tuple[list[str], dict | None]:
        if self.scores is None:
            return [], None
        from shardcut.format.fingerprint import PREFIX_TOKENS, overlap
        from shardcut.plans.scores import Scores

        sketch = Scores.load(self.scores).metadata.get("data_sketch")
        if not sketch:
            return [
                f"{self.scores} records no calibration data sketch (an older or imported score file): "
                "cannot check that the evaluation data is held out"
            ], None
        ov = overlap(sketch, self.local)
        if ov is None:
            return [f"{self.scores}: unreadable data_sketch metadata; overlap not checked"], None
        found = {"compared": ov.compared, "matched": ov.matched, "samples": ov.samples, "fraction": ov.fraction}
        if ov.matched:
            return [
                f"{ov.matched} of {ov.compared} evaluation samples checked against {self.scores} were calibration "
                f"samples (same first {PREFIX_TOKENS} tokens; about {ov.fraction:.0%} of the evaluation data): "
                "the evaluation data is not held out"
            ], found
        return [], found

    def _batch_inputs(self, batch):
        dev = self.torch_device
        lengths = torch.tensor(batch.lengths, device=dev)
        mask = torch.arange(batch.width, device=dev)[None, :] < lengths[:, None]  # right padding
        return mask, (None if bool(mask.all()) else mask.long())

    def _sources(self) -> list[_Checkpoint]:
        out: list[_Checkpoint] = []
        for s in self.streams:
            if all(s.source is not c for c in out):
                out.append(s.source)
        return out

    def _commit(self) -> None:
        for s in self.streams:
            s.store.commit()

    def _embeddings(self) -> None:
        self._emit(
            CalibEvent(
                "layer_start", step=0, steps=self.steps, layer=-1, layer_tokens=self.rows, batches=len(self.batches)
            )
        )
        for c in self._sources():
            c.loader.load_outside()
        for batch in self.batches:
            mask, attention = self._batch_inputs(batch)
            ids = torch.zeros(mask.shape, dtype=torch.long, device=self.torch_device)
            ids[mask] = torch.from_numpy(np.concatenate([self.local[j] for j in batch.samples])).to(self.torch_device)
            for c in self._sources():
                emb = capture_call(c.skeleton, 0, input_ids=ids, attention_mask=attention).hidden[mask].to("cpu")
                for s in self.streams:
                    if s.source is c:
                        s.store.write(batch.start, batch.start + batch.rows, emb)
        for c in self._sources():
            c.loader.free_outside_params()
        self._commit()
        self._emit(
            CalibEvent("layer_done", step=1, steps=self.steps, layer=-1, memory=current_memory(self.torch_device))
        )

    def _layer(self, i: int) -> None:
        key = self.keys.get(i)
        self._emit(
            CalibEvent(
                "layer_start",
                step=i + 1,
                steps=self.steps,
                layer=i,
                key=key,
                layer_tokens=self.rows,
                batches=len(self.batches),
            )
        )
        t0 = time.perf_counter()
        loaded = {}
        for c in self._sources():
            layer = c.loader.load_layer(i, c.loader.read_layer(i))
            loaded[id(c)] = (layer, moe_block(layer) if key is not None else None)
        E_key = (self.src.info.layer_by_key[key].num_experts or self.E) if key is not None else self.E
        done = 0
        for b_idx, batch in enumerate(self.batches):
            mask, attention = self._batch_inputs(batch)
            B, T = mask.shape
            calls = {}
            outs: dict[int, tuple] = {}
            for s_idx, s in enumerate(self.streams):
                c = s.source
                flat = s.store.read(batch.start, batch.start + batch.rows).to(self.torch_device)
                hidden = flat.new_zeros((B, T, flat.shape[-1]))
                hidden[mask] = flat
                if id(c) not in calls:
                    calls[id(c)] = capture_call(c.skeleton, i, inputs_embeds=hidden, attention_mask=attention)
                layer, block = loaded[id(c)]
                if s.keep is not None and key is not None:
                    with (
                        forbid_pruned_experts(layer, {key: s.keep[key]}, E_key, layer_key=lambda _name: key),
                        refuse_pruned(layer, key, s.keep[key], E_key),
                    ):
                        outs[s_idx] = run_with_block(layer, block, hidden, calls[id(c)])
                else:
                    outs[s_idx] = run_with_block(layer, block, hidden, calls[id(c)])
            ref, ref_moe = outs[0]
            ref_valid = ref[mask]
            ref_moe_valid = ref_moe.reshape(B * T, -1)[mask.reshape(-1)] if ref_moe is not None else None
            ref_sq = _sq(ref_valid) if len(self.streams) > 1 else 0.0
            ref_moe_sq = _sq(ref_moe_valid) if ref_moe_valid is not None and len(self.streams) > 1 else 0.0
            for s_idx, s in enumerate(self.streams):
                out, moe = outs[s_idx]
                valid = out[mask] if s_idx else ref_valid
                if s_idx:  # differences in the activations' dtype (exactly 0 when equal), sums in float64
                    s.residual[i][0] += _sq(valid - ref_valid)
                    s.residual[i][1] += ref_sq
                    if moe is not None and ref_moe_valid is not None:
                        s.moe[key][0] += _sq(moe.reshape(B * T, -1)[mask.reshape(-1)] - ref_moe_valid)
                        s.moe[key][1] += ref_moe_sq
                s.store.write(batch.start, batch.start + batch.rows, valid.to("cpu"))
            done += batch.rows
            self._emit(
                CalibEvent(
                    "batch",
                    step=i + 1,
                    steps=self.steps,
                    layer=i,
                    key=key,
                    batch=b_idx + 1,
                    batches=len(self.batches),
                    tokens=done,
                    layer_tokens=self.rows,
                    tokens_per_s=done / max(time.perf_counter() - t0, 1e-9),
                    memory=current_memory(self.torch_device),
                )
            )
        for c in self._sources():
            c.loader.free(loaded[id(c)][0])
        release_free_memory()
        self._commit()
        self._emit(
            CalibEvent(
                "layer_done", step=i + 2, steps=self.steps, layer=i, key=key, memory=current_memory(self.torch_device)
            )
        )

    def _heads(self) -> None:
        step = self.steps - 1
        self._emit(
            CalibEvent(
                "layer_start",
                step=step,
                steps=self.steps,
                layer=self.src.skeleton.num_layers,
                layer_tokens=self.rows,
                batches=len(self.batches),
                message="LM head",
            )
        )
        for c in self._sources():
            load_head(c, self.torch_device)
        for batch in self.batches:
            mask, attention = self._batch_inputs(batch)
            targets = torch.from_numpy(self.targets[batch.start : batch.start + batch.rows]).to(self.torch_device)
            original = original_tokens(self._stream_logits(self.streams[0], batch, mask, attention), targets)
            self.streams[0].loss.append(original.loss)
            for s in self.streams[1:]:  # one variant's logits at a time: 2 x a batch's logits at most
                kl, agree, loss = variant_tokens(original, self._stream_logits(s, batch, mask, attention))
                s.kl.append(kl)
                s.agree.append(agree)
                s.loss.append(loss)
            del original
        self._emit(
            CalibEvent(
                "layer_done",
                step=self.steps,
                steps=self.steps,
                layer=self.src.skeleton.num_layers,
                memory=current_memory(self.torch_device),
            )
        )

    def _stream_logits(self, s: _Stream, batch, mask, attention) -> torch.Tensor:
        flat = s.store.read(batch.start, batch.start + batch.rows).to(self.torch_device)
        hidden = flat.new_zeros((*mask.shape, flat.shape[-1]))
        hidden[mask] = flat
        return logits_of(s.source.skeleton, hidden, attention)[mask]

    def _report(self, warnings: list[str], overlap: dict | None) -> EvalReport:
        original = self.streams[0]
        loss = np.concatenate(original.loss)
        plans = [
            summarize(
                s.name,
                s.kind,
                s.ratio,
                s.kept,
                np.concatenate(s.loss),
                np.concatenate(s.kl),
                np.concatenate(s.agree),
                s.moe,
                s.residual,
            )
            for s in self.streams[1:]
        ]
        mean = float(loss.mean()) if len(loss) else float("nan")
        return EvalReport(
            model=self.model,
            data=self.data,
            samples=len(self.local),
            tokens=self.rows,
            predicted_tokens=len(loss),
            loss=mean,
            perplexity=float(np.exp(mean)),
            num_experts=self.E,
            plans=plans,
            warnings=warnings,
            overlap=overlap,
            device=str(self.torch_device),
            dtype=str(self.torch_dtype).removeprefix("torch."),
        )


def _sq(x: torch.Tensor) -> float:
    """The sum of squares of `x`, accumulated in float64."""
    return float(torch.sum(x * x, dtype=torch.float64))


def evaluate(
    model: str | Path,
    data: str,
    *,
    plans: Sequence[Plan | str | Path] = (),
    scores: str | Path | None = None,
    ratios: Sequence[float] = (),
    criterion: str | None = "reap",
    protect_super_experts: bool = False,
    protect: dict[str, list[int]] | None = None,
    mtp_policy: str | None = None,
    pruned: Sequence[str | Path] = (),
    samples: int | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    device: str = "auto",
    dtype: str | None = None,
    seed: int = 0,
    max_memory: int | str | None = None,
    batch_tokens: int | None = None,
    trust_remote_code: bool = False,
    work_dir: str | Path | None = None,
    progress: Callable[[CalibEvent], None] | None = None,
) -> EvalReport:
    """Measure what pruning costs: each plan (or pruned checkpoint) against MODEL on held-out DATA.

    One streamed pass over MODEL's layers carries the original hidden states and one stream per
    variant: every plan in `plans`, one plan per ratio in `ratios` made from `scores` (with the
    plan options of `make_plan`), and every checkpoint in `pruned` (a `shardcut prune` output,
    streamed next to MODEL). `scores` is also checked against DATA: a warning when DATA holds
    calibration samples. Returns loss/perplexity of each, KL(original || variant) per token (mean,
    p50, p99), top-1 agreement and per-layer relative errors (see `shardcut.ops.evaluation.metrics`).

    Example:
        >>> report = evaluate("Qwen3-30B-A3B", "heldout.jsonl:200", scores="s.safetensors", ratios=[0.25, 0.5])
        >>> report.plans[1].kl_mean, report.plans[1].first_layer_over(0.05)
    """
    return Evaluator(
        str(model),
        data,
        plans=list(plans),
        scores=scores,
        ratios=list(ratios),
        criterion=criterion,
        protect_super_experts=protect_super_experts,
        protect=protect,
        mtp_policy=mtp_policy,
        pruned=list(pruned),
        samples=samples,
        max_length=max_length,
        device=device,
        dtype=dtype,
        seed=seed,
        max_memory=max_memory,
        batch_tokens=batch_tokens,
        trust_remote_code=trust_remote_code,
        work_dir=Path(work_dir) if work_dir else None,
        progress=progress,
    ).run()
