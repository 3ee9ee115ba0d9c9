"""The variants an evaluation carries, each a stream of hidden states: the original, one per plan
(the plan applied as a router mask on the original's layers) and one per pruned checkpoint
(its own layers, streamed next to the source's), and the check that the held-out data is not the
calibration data of a score file."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from shardcut.format.checkpoint import Checkpoint, open_checkpoint
from shardcut.format.errors import ShardcutError
from shardcut.format.hub import resolve_model
from shardcut.moe.model import ModelInfo, describe
from shardcut.ops.calibration.observe import check_supported
from shardcut.ops.calibration.stream import LayerLoader, Skeleton, TensorReader, make_skeleton
from shardcut.ops.evaluation.options import EvalOptions
from shardcut.plans.plan import Plan, validate_plan


@dataclass
class Source:
    """One streamed checkpoint: its skeleton and layer loader."""

    name: str
    model_dir: Path
    ckpt: Checkpoint
    info: ModelInfo
    skeleton: Skeleton
    loader: LayerLoader


@dataclass
class Stream:
    """One variant: where its layers come from and, for a plan, the experts each layer keeps."""

    name: str
    kind: str  # "original", "plan" or "checkpoint"
    source: Source
    keep: dict[str, list[int]] | None
    ratio: float
    kept: int


def open_source(model: str | Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool) -> Source:
    model_dir = resolve_model(str(model))
    ckpt = open_checkpoint(model_dir)
    info = describe(ckpt)
    check_supported(info, model_dir / "config.json")
    TensorReader(ckpt)  # refuses quantization schemes it cannot read, before any data is loaded
    skeleton = make_skeleton(ckpt, info, dtype, trust_remote_code)
    return Source(str(model), model_dir, ckpt, info, skeleton, LayerLoader(skeleton, ckpt, info, device))


def _plan_stream(src: Source, plan: Plan, name: str) -> Stream:
    validate_plan(plan, src.info, plan.origin)
    E = src.info.num_experts
    return Stream(name, "plan", src, plan.keep, 1 - plan.num_experts / E, plan.num_experts)


def plan_streams(src: Source, o: EvalOptions) -> list[Stream]:
    """A stream per plan in `plans`, then one per ratio in `ratios` (planned from `scores` with `plan_options`)."""
    out = []
    for i, plan in enumerate(o.plans):
        p = plan if isinstance(plan, Plan) else Plan.load(plan)
        out.append(_plan_stream(src, p, Path(p.origin).name if p.origin not in ("", "plan") else f"plan {i + 1}"))
    if o.ratios:
        from shardcut.ops.planning import make_plan

        assert o.scores is not None  # EvalOptions.check: ratios need scores

        for r in o.ratios:
            p, _ = make_plan(src.model_dir, o.scores, replace(o.plan_options, ratio=r))
            out.append(_plan_stream(src, p, f"ratio={r:g}"))
    return out


def pruned_stream(src: Source, out: str | Path, device: torch.device, dtype: torch.dtype, o: EvalOptions) -> Stream:
    """A `shardcut prune` output as a stream, after checking it is a pruned copy of `src`."""
    from shardcut.rewrite.side_files import PLAN_COPY_NAME

    ck = open_source(out, device, dtype, o.trust_remote_code)
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
    return Stream(Path(ck.model_dir).name, "checkpoint", ck, None, 1 - kept / src.info.num_experts, kept)


def check_overlap(scores: str | Path | None, samples) -> tuple[list[str], dict | None]:
    """Warnings, and the counts, when the held-out `samples` hold calibration samples of `scores`."""
    if scores is None:
        return [], None
    from shardcut.format.fingerprint import PREFIX_TOKENS, overlap
    from shardcut.plans.scores import Scores

    sketch = Scores.load(scores).metadata.get("data_sketch")
    if not sketch:
        return [
            f"{scores} records no calibration data sketch (an older or imported score file): "
            "cannot check that the evaluation data is held out"
        ], None
    ov = overlap(sketch, samples)
    if ov is None:
        return [f"{scores}: unreadable data_sketch metadata; overlap not checked"], None
    found = {"compared": ov.compared, "matched": ov.matched, "samples": ov.samples, "fraction": ov.fraction}
    if ov.matched:
        return [
            f"{ov.matched} of {ov.compared} evaluation samples checked against {scores} were calibration "
            f"samples (same first {PREFIX_TOKENS} tokens; about {ov.fraction:.0%} of the evaluation data): "
            "the evaluation data is not held out"
        ], found
    return [], found
