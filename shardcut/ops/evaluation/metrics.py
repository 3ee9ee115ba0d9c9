"""The quality report of `shardcut eval` and the arithmetic that turns per-token values into it.

Definitions (every number is over the held-out tokens, padding excluded):
- loss: mean next-token cross-entropy (nats) over positions that have a next token in their
  sample; perplexity = exp(loss);
- KL: per token, KL(original || pruned) = sum_v p_o(v) (log p_o(v) - log p_p(v)) of the two
  next-token distributions, at every position; reported as mean, median (p50) and p99;
- top-1 agreement: share of positions whose most likely next token is the same;
- per-layer relative error: ||y_pruned - y_original||_F / ||y_original||_F over all tokens, where y
  is the output of a MoE block (`moe_error`, by plan key) or of a decoder layer, i.e. the residual
  stream (`residual_error`, by layer index), each stream running on its own inputs, so the error
  accumulates from the first layer a prune changes.

No torch here: `push` reads a saved report to put it on a model card.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shardcut.format.errors import ShardcutError

REPORT_FORMAT = "shardcut-eval/1"


@dataclass
class PlanQuality:
    """One pruned variant against the original.

    name: the plan file, `ratio=R` for plans made from scores, or the pruned checkpoint's folder.
    ratio: fraction of the routed experts removed (main stack); kept: experts kept per layer.
    """

    name: str
    kind: str  # "plan" (router mask on the original) or "checkpoint" (a pruned folder, streamed)
    ratio: float
    kept: int
    loss: float
    perplexity: float
    kl_mean: float
    kl_p50: float
    kl_p99: float
    top1_agreement: float
    moe_error: dict[str, float] = field(default_factory=dict)
    residual_error: list[float] = field(default_factory=list)

    def first_layer_over(self, threshold: float) -> int | None:
        """The first decoder layer whose residual-stream error exceeds `threshold`."""
        return next((i for i, e in enumerate(self.residual_error) if e > threshold), None)


@dataclass
class EvalReport:
    """What `evaluate` returns: the original's loss and every variant's quality against it."""

    model: str
    data: str
    samples: int
    tokens: int
    predicted_tokens: int
    loss: float
    perplexity: float
    num_experts: int
    plans: list[PlanQuality]
    warnings: list[str] = field(default_factory=list)
    overlap: dict | None = None  # held-out vs calibration samples, when a score file's sketch was read
    device: str = ""
    dtype: str = ""

    def to_json(self) -> dict:
        return {"format": REPORT_FORMAT, **asdict(self)}

    def save(self, path: str | Path) -> None:
        from shardcut.format.durable import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EvalReport:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ShardcutError(f"not a readable eval report ({exc})", path) from None
        if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
            raise ShardcutError(f"not a {REPORT_FORMAT} file (write one with `shardcut eval --json`)", path)
        try:
            body = {k: v for k, v in data.items() if k != "format"}
            body["plans"] = [PlanQuality(**p) for p in body["plans"]]
            return cls(**body)
        except (TypeError, KeyError) as exc:
            raise ShardcutError(f"malformed eval report ({exc})", path) from None

    def markdown(self) -> str:
        """The summary table (one row per variant) in GitHub markdown."""
        lines = [
            f"Held-out data: `{self.data}`, {self.samples} samples, {self.tokens:,} tokens; original perplexity "
            f"{self.perplexity:.4g} (loss {self.loss:.4f}).",
            "",
            "| variant | experts pruned | kept / layer | perplexity | loss | KL mean | KL p50 | KL p99 "
            "| top-1 agreement | worst layer error |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in self.plans:
            worst = max(p.residual_error) if p.residual_error else 0.0
            lines.append(
                f"| {p.name} | {p.ratio:.0%} | {p.kept} | {p.perplexity:.4g} | {p.loss:.4f} | {p.kl_mean:.4g} "
                f"| {p.kl_p50:.4g} | {p.kl_p99:.4g} | {p.top1_agreement:.2%} | {worst:.3g} |"
            )
        return "\n".join(lines)


def summarize(
    name: str,
    kind: str,
    ratio: float,
    kept: int,
    loss_tokens,
    kl,
    agree,
    moe_sums: dict[str, list[float]],
    residual_sums: list[list[float]],
) -> PlanQuality:
    """A PlanQuality from per-token arrays (numpy) and per-layer [diff², ref²] sums."""
    import numpy as np

    kl = np.asarray(kl, dtype=np.float64)
    loss = float(np.mean(loss_tokens)) if len(loss_tokens) else float("nan")
    p50, p99 = (float(v) for v in np.percentile(kl, [50, 99]))
    return PlanQuality(
        name,
        kind,
        ratio,
        kept,
        loss,
        _exp(loss),
        float(kl.mean()),
        p50,
        p99,
        float(np.mean(agree)),
        {k: relative(d, r) for k, (d, r) in moe_sums.items()},
        [relative(d, r) for d, r in residual_sums],
    )


def relative(diff_sq: float, ref_sq: float) -> float:
    """sqrt(diff² / ref²); 0 when both are 0 (a block whose output is zero and stays zero)."""
    if diff_sq == 0.0:
        return 0.0
    return math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else float("inf")


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")
