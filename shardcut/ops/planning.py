"""`make_plan`: a score file and a model's headers in, a plan and its report out (`shardcut plan`).

It ranks every MoE layer with `shardcut.plans.select` (criteria, counts, groups, protection), records
the options it was given so the plan can be reproduced (`shardcut.plans.options.PlanOptions`), warns
where the cut falls among equal scores, and estimates the output's size from the rewrite's
layout. An operation: nothing below it imports it.

make_plan's steps, in order: check the output path (`_check_plan_output`), open the model and
the scores and count (`_open`), protections (`_protections`), per-layer selection (`_select`),
warnings and notes, the plan's provenance (`_provenance`), the report with the size estimate
(`_report`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from shardcut.format.cache_paths import split_revision
from shardcut.format.checkpoint import Checkpoint
from shardcut.format.errors import PlanError, ShardcutError
from shardcut.moe.model import CountGroup, ModelInfo
from shardcut.ops.ranking import UNREACHED, check_protect, ranking_sources
from shardcut.plans.counts import Counts, group_counts
from shardcut.plans.options import PlanOptions
from shardcut.plans.plan import Plan, check_replaceable_plan, validate_plan
from shardcut.plans.scores import Scores, file_sha256
from shardcut.plans.select import (
    SUPER_MAX_FRACTION,
    canonical_criterion,
    criterion_values,
    select_layer,
    super_experts,
)


@dataclass
class LayerRow:
    """One MoE layer of a plan report."""

    layer: str
    kept: int
    pruned: int
    lowest_kept: float | None
    highest_pruned: float | None
    protected: list[int]
    protection_overrode: bool
    group_balance_overrode: bool
    source: str  # "scores", "scores of layer 3" (MTP policy), or "same ids as layer 3"
    decided_by_id: int = 0  # experts on either side of the cut that only the id tie-break placed
    tie_value: float | None = None  # the value they share (0 for never-routed experts)
    never_routed_at_cut: int = 0  # of those, experts no calibration token was routed to


@dataclass
class PlanReport:
    """What `make_plan` chose and why: counts, per-layer rows, notes, size estimate.

    num_experts / kept / pruned are the main stack's; a model with several expert counts also
    gets `by_config` (count group -> num_experts, top_k, kept, pruned, rule, rounded), and
    `rule` then names each group.
    """

    model: str
    architecture: str
    criterion: str
    num_experts: int
    kept: int
    ratio: float | None
    rule: str
    rows: list[LayerRow]
    input_bytes: int
    output_bytes: int
    scores_sha256: str
    mtp_policy: str | None = None
    super_threshold: float | None = None
    notes: list[str] = field(default_factory=list)
    by_config: dict[str, dict] = field(default_factory=dict)  # several expert counts: each group's
    warnings: list[str] = field(default_factory=list)  # ties at the cut, scores of another model
    decided_by_id: int = 0  # experts placed by the id tie-break, over all layers

    @property
    def pruned(self) -> int:
        return self.num_experts - self.kept

    def to_json(self) -> dict:
        out = asdict(self)
        out["pruned"] = self.pruned
        if not self.by_config:
            del out["by_config"]  # as inspect's num_experts_by_config: only for several expert counts
        return out


def make_plan(
    model: str | Path,
    scores: Scores | str | Path,
    options: PlanOptions | None = None,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    **option_values: Any,
) -> tuple[Plan, PlanReport]:
    """Plan a prune of `model` from a score file: the same number kept in every MoE layer (in
    every layer of a count group, for models with several expert counts), the highest by the
    criterion (see `shardcut.plans.select` for formulas and the rounding rule).

    The options are a `PlanOptions` (`options`), or its fields as keywords (`ratio=0.5`), or
    both (the keywords replace the dataclass's fields): exactly one of `ratio` / `experts`;
    `criterion` (None: reap, or the one criterion a values-only imported file holds), `seed`,
    `protect` ({layer: ids} always kept), `protect_super_experts` with its rule
    (`super_percentile`, `super_layer_fraction`, see `super_experts`), `multiple_of=N` (round
    the kept count up to a multiple of N, an expert-parallel size) and `mtp_policy`.

    Reads only the model's config and shard headers. A stack a text-only calibration never
    reaches (the table's `Calibration.text_only_stacks`) with an expert count of its own
    (Qwen3-Omni's talker) is kept whole, recorded under the plan's `unscored_stacks` and in the
    report's notes. Other MoE layers the scores do not cover (MTP layers, which calibration
    through transformers cannot see; ERNIE-VL's vision experts, which share the text count) need `mtp_policy`:
    `reuse-last` (rank with the last scored layer's scores), `scores-of:N` (with layer N's),
    or `same-ids-as:N` (keep exactly layer N's ids).

    The plan records the options under `options` (`PlanOptions.from_record(plan.extra)` reads
    them back, `.arguments()` turns them into the `shardcut plan` flags that reproduce it).

    Warnings (in `report.warnings` and the plan's `warnings`): a cut that falls among experts
    of equal value (ties, zeros, never-routed experts), with how many experts only the id
    tie-break placed, and scores whose recorded model differs from `model`.
    out: write the plan there (`plan -o`), durably. Refused before any work when it is the score
    file or lies inside the model folder, and when it exists unless `overwrite`.

    Example:
        >>> plan, report = make_plan("Qwen3-30B-A3B", "scores.safetensors", ratio=0.5)
        >>> plan.save("plan.json"); report.kept, report.output_bytes
    """
    opts = replace(options or PlanOptions(), **option_values).check()
    if out is not None:
        _check_plan_output(out, model, scores, overwrite)
    job = _open(model, scores, opts)
    if out is not None:  # a Hub id resolves to a cache snapshot: never write inside it either
        from shardcut.format.durable import check_output

        check_output(out, [job.ckpt.root], overwrite=overwrite, what="plan")
    protected, supers, threshold = _protections(job)
    keep, rows = _select(job, protected, supers)
    warnings = _warnings(job, rows)
    notes = _notes(job, rows, supers, threshold)
    extra = _provenance(job, protected, threshold, rows, warnings)
    plan = Plan(keep, extra, "plan")
    validate_plan(plan, job.info, "plan")
    report = _report(job, plan, rows, notes, warnings, threshold)
    if out is not None:
        plan.save(out)
    return plan, report


@dataclass
class _Job:
    """What every step of `make_plan` reads: the options, the model's headers, the scores and
    how each MoE layer is ranked."""

    model: str
    opts: PlanOptions
    ckpt: Checkpoint
    info: ModelInfo
    scores: Scores
    sha: str
    criterion: str  # resolved
    per_group: list[tuple[CountGroup, Counts]]
    sources: dict[str, tuple[str, str]]  # layer key -> ("own" | "scores" | "same-ids" | "whole", source layer)
    values: np.ndarray  # [scored layers, E] of the criterion

    _group_of: dict[str, tuple[CountGroup, Counts]] = field(init=False)

    def __post_init__(self) -> None:
        self._group_of = {layer.key: (g, c) for g, c in self.per_group for layer in g.layers}

    @property
    def multi(self) -> bool:
        return len(self.per_group) > 1

    def group_of(self, key: str) -> tuple[CountGroup, Counts]:
        return self._group_of[key]


def _check_plan_output(out: str | Path, model: str | Path, scores: Scores | str | Path, overwrite: bool) -> None:
    """Before anything is read: the plan file is no input, not inside the model folder, and
    replaces only a plan (with `overwrite`)."""
    from shardcut.format.durable import check_output
    from shardcut.format.hub import is_local

    inputs = [model if is_local(model) else None, None if isinstance(scores, Scores) else scores]
    check_output(out, inputs, overwrite=overwrite, what="plan")
    check_replaceable_plan(out)


def _open(model: str | Path, scores: Scores | str | Path, opts: PlanOptions) -> _Job:
    """The model's headers (no shard data), the scores checked against them, the counts."""
    from shardcut.format.hub import open_model
    from shardcut.moe.model import describe

    ckpt = open_model(model)
    info = describe(ckpt)
    if isinstance(scores, Scores):
        origin, sha = "scores", scores.sha256()
    else:
        origin, sha = str(scores), file_sha256(scores) if Path(scores).is_file() else ""
        scores = Scores.load(scores)
    crit = canonical_criterion(opts.criterion, scores)
    per_group = group_counts(info, ratio=opts.ratio, experts=opts.experts, multiple_of=opts.multiple_of)
    sources = ranking_sources(info, scores, opts.mtp_policy, origin)
    whole = _keep_whole(per_group, sources)
    per_group = [(g, whole.get(g.name, c)) for g, c in per_group]
    scores.require_routed(origin)
    values = criterion_values(scores, crit, opts.seed)
    return _Job(str(model), opts, ckpt, info, scores, sha, crit, per_group, sources, values)


def _protections(job: _Job) -> tuple[dict[str, list[int]], dict[str, list[int]], float | None]:
    """Explicitly protected ids (checked against the model), super experts and their threshold."""
    protected = {k: list(v) for k, v in check_protect(dict(job.opts.protect or {}), job.info).items()}
    if not job.opts.protect_super_experts:
        return protected, {}, None
    supers, threshold = super_experts(job.scores, job.opts.super_layer_fraction, job.opts.super_percentile)
    return protected, supers, threshold


def _select(
    job: _Job, protected: dict[str, list[int]], supers: dict[str, list[int]]
) -> tuple[dict[str, list[int]], list[LayerRow]]:
    """Kept ids per MoE layer (in model order) and the report's rows; adds to `protected` the
    super experts each layer takes (a layer ranked with another layer's scores takes that
    layer's)."""
    row_of = {k: i for i, k in enumerate(job.scores.layers)}
    keep: dict[str, list[int]] = {}
    rows: list[LayerRow] = []
    pending: list[tuple[str, str]] = []
    for layer in job.info.layers:
        kind, src = job.sources[layer.key]
        if kind == "same-ids":
            pending.append((layer.key, src))
            continue
        if kind == "whole":
            keep[layer.key] = list(range(layer.num_experts))
            rows.append(
                LayerRow(layer.key, layer.num_experts, 0, None, None, [], False, False, f"kept whole: {UNREACHED}")
            )
            continue
        prot = sorted(set(protected.get(layer.key, [])) | set(supers.get(src, [])))
        if prot:
            protected[layer.key] = prot
        keep[layer.key], row = _select_layer(job, layer.key, layer.num_experts, row_of[src], src, prot)
        rows.append(row)
    for key, src in pending:
        keep[key] = list(keep[src])
        if protected.get(key) and not set(protected[key]) <= set(keep[key]):
            raise PlanError(
                f"layer {key}: protected experts {protected[key]} are not all among layer {src}'s "
                f"kept ids, which mtp_policy same-ids-as:{src} copies",
                params=("mtp_policy",),
            )
        c = job.group_of(key)[1]
        rows.append(
            LayerRow(
                key,
                c.kept,
                c.pruned,
                None,
                None,
                protected.get(key, []),
                False,
                False,
                f"keeps the same ids as layer {src}",
            )
        )
    order = {layer.key: i for i, layer in enumerate(job.info.layers)}
    rows.sort(key=lambda row: order[row.layer])
    return {layer.key: keep[layer.key] for layer in job.info.layers}, rows


def _select_layer(job: _Job, key: str, E: int, r: int, src: str, prot: list[int]) -> tuple[list[int], LayerRow]:
    """One layer ranked with row `r` of the criterion values (layer `src`'s scores)."""
    group, c = job.group_of(key)
    v = job.values[r, :E]
    try:
        sel = select_layer(v, c.kept, group.n_group, prot)
    except ShardcutError as exc:
        raise PlanError(f"layer {key}: {exc}", params=exc.params) from None
    by_id, tie, tied_ids = id_order_ties(v, sel.kept, group.n_group, sel.protected)
    never = int(np.sum(job.scores.count[r, tied_ids] == 0)) if job.scores.has_sums and tied_ids else 0
    source = "scores" if src == key else f"ranked with the scores of layer {src}"
    row = LayerRow(
        key,
        len(sel.kept),
        c.pruned,
        sel.lowest_kept,
        sel.highest_pruned,
        sel.protected,
        sel.protection_overrode,
        sel.group_balance_overrode,
        source,
        by_id,
        tie,
        never,
    )
    return sel.kept, row


def _warnings(job: _Job, rows: list[LayerRow]) -> list[str]:
    """Scores of another model, and cuts among equal scores."""
    warnings: list[str] = []
    mismatch = _scores_model_mismatch(job.model, job.ckpt, job.info, job.scores)
    if mismatch:
        warnings.append(
            f"the scores were computed on another model ({mismatch}); only their layers and expert "
            "counts were checked against MODEL"
        )
    return warnings + _tie_warnings(rows)


def _notes(job: _Job, rows: list[LayerRow], supers: dict[str, list[int]], threshold: float | None) -> list[str]:
    """The super-expert rule and what it found, every rounding, and what the MTP policy did."""
    opts, notes = job.opts, []
    if opts.protect_super_experts:
        found = ", ".join(f"layer {k}: {v}" for k, v in supers.items()) if supers else "none found"
        notes.append(
            f"super-expert threshold {threshold:.6g} (percentile {opts.super_percentile:g}, first "
            f"{opts.super_layer_fraction:g} of the layers): {found}"
        )
    for g, c in job.per_group:
        if c.rounded:
            what = "rounding" if "multiple_of=" in c.rounded else "grouped routing"
            notes.append(f"{what}{f' ({g.name})' if job.multi else ''}: {c.rounded}")
    for name in _whole_groups(job):
        n = sum(1 for k, (kind, _) in job.sources.items() if kind == "whole" and job.group_of(k)[0].name == name)
        notes.append(f"{name}: every expert kept ({n} MoE layers): {UNREACHED}")
    if _policy_used(job):
        notes += [
            f"mtp policy {opts.mtp_policy}: layer {row.layer} has no scores, {row.source}"
            for row in rows
            if row.source != "scores" and not row.source.startswith("kept whole")
        ]
    elif opts.mtp_policy:
        notes.append(f"mtp policy {opts.mtp_policy!r} not needed: every MoE layer has scores")
    return notes


def _policy_used(job: _Job) -> bool:
    return bool(job.opts.mtp_policy) and any(kind not in ("own", "whole") for kind, _ in job.sources.values())


def _keep_whole(per_group: list[tuple[CountGroup, Counts]], sources: dict[str, tuple[str, str]]) -> dict[str, Counts]:
    """Count group name -> its counts when every layer of it is kept whole (`ranking_sources`)."""
    out = {}
    for g, c in per_group:
        if all(sources[layer.key][0] == "whole" for layer in g.layers):
            out[g.name] = Counts(g.num_experts, g.num_experts, c.ratio, f"{g.num_experts} kept ({UNREACHED})")
    return out


def _whole_groups(job: _Job) -> list[str]:
    """The count groups kept whole, a text-only calibration never reaching them."""
    return [g.name for g, _ in job.per_group if all(job.sources[layer.key][0] == "whole" for layer in g.layers)]


def _provenance(
    job: _Job, protected: dict[str, list[int]], threshold: float | None, rows: list[LayerRow], warnings: list[str]
) -> dict:
    """The plan's `extra`: source model, criterion, counts and their rounding, the options as
    given (`options`), the protections, the super-expert rule, the warnings."""
    opts, info = job.opts, job.info
    source: dict = {"model": job.model, "num_experts": info.num_experts}
    if job.multi:
        source["num_experts_by_config"] = {g.name: g.num_experts for g, _ in job.per_group}
    ref = _hub_ref(job.model)
    if ref:
        source["model"], source["revision"] = ref
    extra: dict = {
        "source": source,
        "criterion": job.criterion,
        **({"ratio": opts.ratio} if opts.ratio is not None else {}),
        **_chosen_counts(job),
        "scores_sha256": job.sha,
        **({"multiple_of": opts.multiple_of} if opts.multiple_of > 1 else {}),
        "options": opts.recorded(job.criterion),
    }
    if job.criterion == "random":
        extra["seed"] = opts.seed
    if _whole_groups(job):
        extra["unscored_stacks"] = {name: f"kept whole: {UNREACHED}" for name in _whole_groups(job)}
    if _policy_used(job):
        extra["mtp_policy"] = opts.mtp_policy
    if protected:
        extra["protected"] = {k: sorted(set(v)) for k, v in protected.items()}
    if opts.protect_super_experts:
        extra["super_expert_threshold"] = threshold
        extra["super_experts"] = {
            "percentile": opts.super_percentile,
            "layer_fraction": opts.super_layer_fraction,
            "max_fraction": SUPER_MAX_FRACTION,
            "threshold": threshold,
        }
    if warnings:
        extra["warnings"] = warnings
        extra["decided_by_id_order"] = sum(row.decided_by_id for row in rows)
    return extra


def _chosen_counts(job: _Job) -> dict:
    """The kept count and its rule; for several expert counts each group's ("experts" only
    where it is one number, experts=N)."""
    if not job.multi:
        counts = job.per_group[0][1]
        return {"experts": counts.kept, "pruned_per_layer": counts.pruned, "rounding": counts.rule}
    kept_all = {c.kept for _, c in job.per_group}
    return {
        **({"experts": kept_all.pop()} if len(kept_all) == 1 else {}),
        "num_experts_by_config": {g.name: c.kept for g, c in job.per_group},
        "pruned_per_layer_by_config": {g.name: c.pruned for g, c in job.per_group},
        "rounding_by_config": {g.name: c.rule for g, c in job.per_group},
    }


def _report(
    job: _Job, plan: Plan, rows: list[LayerRow], notes: list[str], warnings: list[str], threshold: float | None
) -> PlanReport:
    """The report, with the output's size from the rewrite's own layout of the plan."""
    from shardcut.format.container import shard_size
    from shardcut.rewrite.writer import layout

    lay = layout(job.ckpt, job.info, plan)
    output = sum(shard_size(s, m) for s, m in zip(lay.shards, lay.metadata, strict=True))
    main = job.per_group[0][1]
    rule = "; ".join(f"{g.name}: {c.rule}" for g, c in job.per_group) if job.multi else main.rule
    by_config = {
        g.name: {
            "num_experts": g.num_experts,
            "top_k": g.top_k,
            "kept": c.kept,
            "pruned": c.pruned,
            "rule": c.rule,
            "rounded": c.rounded,
        }
        for g, c in (job.per_group if job.multi else [])
    }
    return PlanReport(
        job.model,
        job.info.arch.name,
        job.criterion,
        job.info.num_experts,
        main.kept,
        job.opts.ratio,
        rule,
        rows,
        job.ckpt.file_bytes,
        output,
        job.sha,
        plan.extra.get("mtp_policy"),
        threshold,
        notes,
        by_config,
        warnings,
        sum(row.decided_by_id for row in rows),
    )


def _hub_ref(model: str) -> tuple[str, str] | None:
    """(repo id, revision) of a `org/name@revision` model that is no local path, else None."""
    repo, revision = split_revision(model)
    return (repo, revision) if revision is not None else None


def id_order_ties(values, kept: list[int], n_group: int = 1, protect=()) -> tuple[int, float | None, list[int]]:
    """Experts only the id tie-break placed: those sharing a value with an expert on the other side
    of the cut (within its group under grouped routing; protected experts aside).

    Returns (how many, the lowest such value, their ids). Example: values [0, 0, 0, 5], two kept
    -> experts 0, 1, 2 tie at 0; 0 and 1 kept, 2 pruned, by id: (3, 0.0, [0, 1, 2]).
    """
    v = np.asarray(values, dtype=np.float64)
    E, G = len(v), max(1, n_group)
    size, keep, prot = E // G, set(kept), set(int(i) for i in protect)
    tied: list[int] = []
    for g in range(G):
        ids = [i for i in range(g * size, (g + 1) * size) if i not in prot]
        common = {v[i] for i in ids if i in keep} & {v[i] for i in ids if i not in keep}
        tied += [i for i in ids if v[i] in common]
    return len(tied), (float(min(v[tied])) if tied else None), sorted(tied)


def _tie_warnings(rows: list[LayerRow]) -> list[str]:
    out = []
    for row in rows:
        if not row.decided_by_id:
            continue
        what = "zero scores" if row.tie_value == 0 else f"scores tied at {row.tie_value:.6g}"
        never = f", {row.never_routed_at_cut} of them never routed" if row.never_routed_at_cut else ""
        out.append(
            f"layer {row.layer}: the cut falls among {row.decided_by_id} experts with {what}{never}; "
            "which of them stay was decided by id order (lower ids kept)"
        )
    if out:
        total = sum(row.decided_by_id for row in rows)
        unrouted = sum(row.never_routed_at_cut for row in rows)
        out.insert(
            0,
            f"{len(out)} of {len(rows)} MoE layers cut among equal scores: {total} experts decided by id "
            f"order" + (f" ({unrouted} never routed: more calibration data would rank them)" if unrouted else ""),
        )
    return out


def _scores_model_mismatch(model, ckpt, info: ModelInfo, scores: Scores) -> str | None:
    """How the scores' recorded model differs from MODEL (fingerprint, commit, architecture), or None."""
    from shardcut.format.checkpoint import layout_fingerprint
    from shardcut.plans.scores import model_mismatch

    here = {"model": str(model), "architecture": info.arch.name, "model_fingerprint": layout_fingerprint(ckpt)}
    ref = _hub_ref(str(model))
    if ref:
        here["revision"] = ref[1]
    return model_mismatch(here, {k: v for k, v in scores.metadata.items() if k != "num_experts"})
