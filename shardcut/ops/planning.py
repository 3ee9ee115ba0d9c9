"""`make_plan`: a score file and a model's headers in, a plan and its report out (`shardcut plan`).

It ranks every MoE layer with `shardcut.plans.select` (criteria, counts, groups, protection), records
the options it was given so the plan can be reproduced (`PLAN_FLAGS`, `plan_arguments`), warns
where the cut falls among equal scores, and estimates the output's size from the rewrite's
layout. An operation: nothing below it imports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from shardcut.format.errors import PlanError, ShardcutError
from shardcut.moe.model import ModelInfo
from shardcut.plans.plan import Plan, check_replaceable_plan, validate_plan
from shardcut.plans.scores import Scores, file_sha256
from shardcut.plans.select import (
    MTP_POLICIES,
    SUPER_LAYER_FRACTION,
    SUPER_MAX_FRACTION,
    SUPER_PERCENTILE,
    Counts,
    canonical_criterion,
    criterion_values,
    group_counts,
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
    *,
    ratio: float | None = None,
    experts: int | None = None,
    criterion: str | None = "reap",
    seed: int = 0,
    protect_super_experts: bool = False,
    protect: dict[str, list[int]] | None = None,
    mtp_policy: str | None = None,
    super_percentile: float = SUPER_PERCENTILE,
    super_layer_fraction: float = SUPER_LAYER_FRACTION,
    out: str | Path | None = None,
    overwrite: bool = False,
    multiple_of: int = 1,
) -> tuple[Plan, PlanReport]:
    """Plan a prune of `model` from a score file: the same number kept in every MoE layer (in
    every layer of a count group, for models with several expert counts), the highest by
    `criterion` (see the module doc for formulas and the rounding rule; None: reap, or the one
    criterion a values-only imported file holds).

    Reads only the model's config and shard headers. A stack a text-only calibration never
    reaches (the table's `Calibration.text_only_stacks`) with an expert count of its own
    (Qwen3-Omni's talker) is kept whole, recorded under the plan's `unscored_stacks` and in the
    report's notes. Other MoE layers the scores do not cover (MTP layers, which calibration
    through transformers cannot see; ERNIE-VL's vision experts, which share the text count) need `mtp_policy`:
    `reuse-last` (rank with the last scored layer's scores), `scores-of:N` (with layer N's),
    or `same-ids-as:N` (keep exactly layer N's ids). `multiple_of=N` rounds the kept count up to a
    multiple of N (an expert-parallel size; see the module doc).

    The plan records these arguments as given under `options` (`plan_arguments` turns them back
    into the `shardcut plan` flags that reproduce it).

    Warnings (in `report.warnings` and the plan's `warnings`): a cut that falls among experts
    of equal value (ties, zeros, never-routed experts), with how many experts only the id
    tie-break placed, and scores whose recorded model differs from `model`.
    super_percentile / super_layer_fraction: the super-expert rule (see `super_experts`).
    out: write the plan there (`plan -o`), durably. Refused before any work when it is the score
    file or lies inside the model folder, and when it exists unless `overwrite`.

    Example:
        >>> plan, report = make_plan("Qwen3-30B-A3B", "scores.safetensors", ratio=0.5)
        >>> plan.save("plan.json"); report.kept, report.output_bytes
    """
    from shardcut.format.container import shard_size
    from shardcut.format.durable import check_output
    from shardcut.format.hub import is_local, open_model
    from shardcut.moe.model import describe
    from shardcut.rewrite.writer import layout

    if out is not None:
        check_output(
            out,
            [model if is_local(model) else None, None if isinstance(scores, Scores) else scores],
            overwrite=overwrite,
            what="plan",
        )
        check_replaceable_plan(out)
    given = {k: v for k, v in locals().items() if k in PLAN_FLAGS}  # every option, recorded in the plan
    ckpt = open_model(model)  # headers only: no shard data
    if out is not None:  # a Hub id resolves to a cache snapshot: never write inside it either
        check_output(out, [ckpt.root], overwrite=overwrite, what="plan")
    info = describe(ckpt)
    if isinstance(scores, Scores):
        origin, sha = "scores", scores.sha256()
    else:
        origin, sha = str(scores), file_sha256(scores) if Path(scores).is_file() else ""
        scores = Scores.load(scores)
    crit = canonical_criterion(criterion, scores)
    per_group = group_counts(info, ratio=ratio, experts=experts, multiple_of=multiple_of)
    multi = len(per_group) > 1
    counts = per_group[0][1]  # the main stack's
    sources = _ranking_sources(info, scores, mtp_policy, origin)
    whole = _keep_whole(per_group, sources)
    per_group = [(g, whole.get(g.name, c)) for g, c in per_group]
    group_of = {layer.key: (g, c) for g, c in per_group for layer in g.layers}
    scores.require_routed(origin)
    values = criterion_values(scores, crit, seed)
    row_of = {k: i for i, k in enumerate(scores.layers)}

    protected = {k: list(v) for k, v in _check_protect(protect or {}, info).items()}
    notes: list[str] = []
    threshold: float | None = None
    supers: dict[str, list[int]] = {}
    warnings: list[str] = []
    mismatch = _scores_model_mismatch(model, ckpt, info, scores)
    if mismatch:
        warnings.append(
            f"the scores were computed on another model ({mismatch}); only their layers and expert "
            "counts were checked against MODEL"
        )
    if protect_super_experts:
        supers, threshold = super_experts(scores, super_layer_fraction, super_percentile)
        notes.append(
            f"super-expert threshold {threshold:.6g} (percentile {super_percentile:g}, first "
            f"{super_layer_fraction:g} of the layers): "
            + (", ".join(f"layer {k}: {v}" for k, v in supers.items()) if supers else "none found")
        )
    for g, c in per_group:
        if c.rounded:
            notes.append(
                f"{'rounding' if 'multiple_of=' in c.rounded else 'grouped routing'}{f' ({g.name})' if multi else ''}: "
                f"{c.rounded}"
            )

    keep: dict[str, list[int]] = {}
    rows: list[LayerRow] = []
    pending: list[tuple[str, str]] = []
    for layer in info.layers:
        kind, src = sources[layer.key]
        if kind == "same-ids":
            pending.append((layer.key, src))
            continue
        if kind == "whole":
            keep[layer.key] = list(range(layer.num_experts))
            rows.append(
                LayerRow(layer.key, layer.num_experts, 0, None, None, [], False, False, f"kept whole: {UNREACHED}")
            )
            continue
        r = row_of[src]
        group, c = group_of[layer.key]
        # a layer ranked with another layer's scores takes that layer's super experts too
        prot = sorted(set(protected.get(layer.key, [])) | set(supers.get(src, [])))
        if prot:
            protected[layer.key] = prot
        try:
            sel = select_layer(values[r, : layer.num_experts], c.kept, group.n_group, prot)
        except ShardcutError as exc:
            raise ShardcutError(f"layer {layer.key}: {exc}") from None
        keep[layer.key] = sel.kept
        by_id, tie, tied_ids = id_order_ties(values[r, : layer.num_experts], sel.kept, group.n_group, sel.protected)
        never = int(np.sum(scores.count[r, tied_ids] == 0)) if scores.has_sums and tied_ids else 0
        rows.append(
            LayerRow(
                layer.key,
                len(sel.kept),
                c.pruned,
                sel.lowest_kept,
                sel.highest_pruned,
                sel.protected,
                sel.protection_overrode,
                sel.group_balance_overrode,
                "scores" if src == layer.key else f"ranked with the scores of layer {src}",
                by_id,
                tie,
                never,
            )
        )
    for key, src in pending:
        keep[key] = list(keep[src])
        if protected.get(key) and not set(protected[key]) <= set(keep[key]):
            raise ShardcutError(
                f"layer {key}: protected experts {protected[key]} are not all among layer {src}'s "
                f"kept ids, which mtp policy same-ids-as:{src} copies"
            )
        c = group_of[key][1]
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
    order = {layer.key: i for i, layer in enumerate(info.layers)}
    rows.sort(key=lambda row: order[row.layer])
    warnings += _tie_warnings(rows)
    keep = {layer.key: keep[layer.key] for layer in info.layers}

    model_text = str(model)
    source = {"model": model_text, "num_experts": info.num_experts}
    if multi:
        source["num_experts_by_config"] = {g.name: g.num_experts for g, _ in per_group}
    if "@" in model_text and not Path(model_text).exists():
        source["model"], source["revision"] = model_text.split("@", 1)
    if not multi:
        chosen = {"experts": counts.kept, "pruned_per_layer": counts.pruned, "rounding": counts.rule}
    else:  # "experts" only where it is one number (experts=N); each group's count, pruned and rule
        kept_all = {c.kept for _, c in per_group}
        chosen = {
            **({"experts": kept_all.pop()} if len(kept_all) == 1 else {}),
            "num_experts_by_config": {g.name: c.kept for g, c in per_group},
            "pruned_per_layer_by_config": {g.name: c.pruned for g, c in per_group},
            "rounding_by_config": {g.name: c.rule for g, c in per_group},
        }
    extra: dict = {
        "source": source,
        "criterion": crit,
        **({"ratio": ratio} if ratio is not None else {}),
        **chosen,
        "scores_sha256": sha,
        **({"multiple_of": multiple_of} if multiple_of > 1 else {}),
        "options": plan_options(**{**given, "criterion": crit}),
    }
    if crit == "random":
        extra["seed"] = seed
    if whole:
        extra["unscored_stacks"] = {name: f"kept whole: {UNREACHED}" for name in whole}
        notes += [
            f"{name}: every expert kept ({len([k for k, (kind, _) in sources.items() if kind == 'whole' and group_of[k][0].name == name])} "
            f"MoE layers): {UNREACHED}"
            for name in whole
        ]
    if mtp_policy and any(kind not in ("own", "whole") for kind, _ in sources.values()):
        extra["mtp_policy"] = mtp_policy
        notes += [
            f"mtp policy {mtp_policy}: layer {row.layer} has no scores, {row.source}"
            for row in rows
            if row.source != "scores" and not row.source.startswith("kept whole")
        ]
    elif mtp_policy:
        notes.append(f"mtp policy {mtp_policy!r} not needed: every MoE layer has scores")
    if protected:
        extra["protected"] = {k: sorted(set(v)) for k, v in protected.items()}
    if protect_super_experts:
        extra["super_expert_threshold"] = threshold
        extra["super_experts"] = {
            "percentile": super_percentile,
            "layer_fraction": super_layer_fraction,
            "max_fraction": SUPER_MAX_FRACTION,
            "threshold": threshold,
        }
    decided = sum(row.decided_by_id for row in rows)
    if warnings:
        extra["warnings"] = warnings
        extra["decided_by_id_order"] = decided
    plan = Plan(keep, extra, "plan")
    validate_plan(plan, info, "plan")

    lay = layout(ckpt, info, plan)
    output = sum(shard_size(s, m) for s, m in zip(lay.shards, lay.metadata, strict=True))
    rule = "; ".join(f"{g.name}: {c.rule}" for g, c in per_group) if multi else counts.rule
    by_config = (
        {
            g.name: {
                "num_experts": g.num_experts,
                "top_k": g.top_k,
                "kept": c.kept,
                "pruned": c.pruned,
                "rule": c.rule,
                "rounded": c.rounded,
            }
            for g, c in per_group
        }
        if multi
        else {}
    )
    report = PlanReport(
        model_text,
        info.arch.name,
        crit,
        info.num_experts,
        counts.kept,
        ratio,
        rule,
        rows,
        ckpt.file_bytes,
        output,
        sha,
        extra.get("mtp_policy"),
        threshold,
        notes,
        by_config,
        warnings,
        decided,
    )
    if out is not None:
        plan.save(out)
    return plan, report


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
    text = str(model)
    if "@" in text and not Path(text).exists():
        here["revision"] = text.split("@", 1)[1]
    return model_mismatch(here, {k: v for k, v in scores.metadata.items() if k != "num_experts"})


# The `shardcut plan` / `prune --scores` flag of every `make_plan` option (one table, so the
# model card's commands and the CLI cannot drift apart; a test checks every option has one).
# make_plan records every option named here in the plan's `options`.
PLAN_FLAGS: dict[str, str] = {
    "ratio": "--ratio",
    "experts": "--experts",
    "criterion": "--criterion",
    "seed": "--seed",
    "protect_super_experts": "--protect-super-experts",
    "protect": "--protect",
    "mtp_policy": "--mtp-policy",
    "multiple_of": "--multiple-of",
    "super_percentile": "--super-percentile",
    "super_layer_fraction": "--super-layer-fraction",
}


def plan_options(**options) -> dict:
    """`make_plan`'s options as the plan records them (JSON-ready; None and empty ones left out)."""
    out = {}
    for key, value in options.items():
        if value is None or value == {}:
            continue
        out[key] = {k: sorted({int(i) for i in v}) for k, v in value.items()} if key == "protect" else value
    return out


def recorded_options(extra: dict) -> dict | None:
    """The options a plan was made with: its `options`, or for a plan made before they were
    recorded, what its provenance implies (its `protected` ids, super experts included, as
    explicit protections: the same selection). None when it does not say how many were kept."""
    if isinstance(extra.get("options"), dict):
        return dict(extra["options"])
    if "ratio" not in extra and not isinstance(extra.get("experts"), int):
        return None
    out = {"ratio": extra["ratio"]} if "ratio" in extra else {"experts": extra["experts"]}
    for key in ("criterion", "seed", "mtp_policy", "multiple_of"):
        if extra.get(key) is not None:
            out[key] = extra[key]
    if isinstance(extra.get("protected"), dict) and extra["protected"]:
        out["protect"] = extra["protected"]
    return out


def plan_arguments(options: dict, *, count: bool = True) -> list[str]:
    """The `shardcut plan` (or `prune --scores`) arguments that make the plan `options` describe:
    the count and criterion always, every other option where it differs from `make_plan`'s
    default. `count=False` leaves out --ratio / --experts (for "re-prune at another ratio").

    Example:
        >>> plan_arguments({"ratio": 0.5, "criterion": "reap", "seed": 0, "mtp_policy": "reuse-last"})
        ['--ratio', '0.5', '--criterion', 'reap', '--mtp-policy', 'reuse-last']
    """
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(make_plan).parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = [k for k in options if k not in PLAN_FLAGS]
    if unknown:
        raise PlanError(f"plan option {unknown[0]!r} has no shardcut plan flag (a plan of a newer shardcut?)")
    args: list[str] = []
    for key, flag in PLAN_FLAGS.items():
        value = options.get(key)
        if value is None or (key in ("ratio", "experts") and not count):
            continue
        if key not in ("ratio", "experts", "criterion") and value == defaults.get(key):
            continue
        if value is True:
            args.append(flag)
        elif value is False:
            continue
        elif key == "protect":
            for layer, ids in value.items():
                args += [flag, f"{layer}:{','.join(str(i) for i in ids)}"]
        else:
            args += [flag, repr(value) if isinstance(value, float) else str(value)]
    return args


UNREACHED = "no scores, a text-only calibration never routes through this stack"


def _keep_whole(per_group, sources: dict[str, tuple[str, str]]) -> dict[str, Counts]:
    """Count group name -> its counts when every layer of it is kept whole (`_ranking_sources`)."""
    out = {}
    for g, c in per_group:
        if all(sources[layer.key][0] == "whole" for layer in g.layers):
            out[g.name] = Counts(g.num_experts, g.num_experts, c.ratio, f"{g.num_experts} kept ({UNREACHED})")
    return out


def _text_unreached(info: ModelInfo) -> set[str]:
    """Plan keys of the MoE layers a text-only calibration never reaches (the table's
    `Calibration.text_only_stacks`: ERNIE-VL's vision experts, Qwen3-Omni's talker)."""
    stacks = info.arch.calibration_of(info.config.get("model_type")).text_only_stacks
    return {layer.key for layer in info.layers if not layer.mtp and layer.stack.plan_prefix in stacks}


def _ranking_sources(info: ModelInfo, scores: Scores, policy: str | None, origin: str) -> dict[str, tuple[str, str]]:
    """For each MoE layer: ("own", key), ("scores", N), ("same-ids", N) or ("whole", key) (a stack
    text-only calibration never reaches, with a count of its own: every expert kept); checks the
    scores fit the model."""
    E = info.num_experts
    if len(info.layers_by_config()) == 1 and scores.layer_experts is None and scores.num_experts != E:
        raise ShardcutError(
            f"holds scores of {scores.num_experts} experts per layer, the model has {E} (scores of another model?)",
            origin,
        )
    model_keys = [layer.key for layer in info.layers]
    foreign = [k for k in scores.layers if k not in info.layer_by_key]
    if foreign:
        raise ShardcutError(
            f"covers layers {foreign[:5]} that are not MoE layers of the model (its MoE layers: "
            f"{_span(model_keys)}; scores of another model?)",
            origin,
        )
    scored = set(scores.layers)
    unreached = _text_unreached(info)
    missing_main = [
        layer.key for layer in info.layers if not layer.mtp and layer.key not in scored and layer.key not in unreached
    ]
    if missing_main:
        raise ShardcutError(
            f"lacks MoE layers {missing_main[:5]} of the model ({len(scores.layers)} scored, "
            f"{len(model_keys)} in the model; scores of another model?)",
            origin,
        )
    for key in scores.layers:
        have, want = scores.experts_of(key), info.layer_by_key[key].num_experts
        if have != want:
            raise ShardcutError(
                f"layer {key}: holds scores of {have} experts, the model's layer has {want} (scores "
                "of another model, or a file without per-layer counts (layer_experts)?)",
                origin,
            )
    unscored = [layer.key for layer in info.layers if layer.key not in scored]
    out = {k: ("own", k) for k in model_keys if k in scored}
    # a stack text-only calibration never reaches, with its own config count, is kept whole
    whole_groups = [
        path
        for path, layers in info.layers_by_config().items()
        if all(layer.key in unreached and layer.key not in scored for layer in layers)
    ]
    for path in whole_groups:
        out.update({layer.key: ("whole", layer.key) for layer in info.layers_by_config()[path]})
    unscored = [k for k in unscored if k not in out]
    if not unscored:
        return out
    shared = [k for k in unscored if k in unreached]
    if shared and not policy:
        stacks = sorted({info.layer_by_key[k].stack.plan_prefix for k in shared})
        raise ShardcutError(
            f"MoE layers {_span(shared)} ({', '.join(stacks)} stack) have no scores: a text-only calibration never "
            "routes through them, and they cannot be kept whole because they share one expert count with the "
            f"scored layers ({info.arch.name}: transformers and vLLM load one count for both; a prune keeps the "
            "same number in each). Rank them anyway with mtp_policy (--mtp-policy reuse-last, scores-of:N or "
            "same-ids-as:N): their kept experts then follow text statistics",
            origin,
        )
    if not policy:
        raise ShardcutError(
            f"MoE layers {', '.join(unscored)} (MTP) have no scores; choose how to prune them with mtp_policy "
            f"(--mtp-policy): reuse-last, scores-of:N or same-ids-as:N",
            origin,
        )
    name, _, arg = policy.partition(":")
    if name == "reuse-last" and not arg:
        for key in unscored:  # the last scored layer of the same count group (the main stack's, for MTP)
            layer = info.layer_by_key[key]
            same = [x for x in info.layers if x.key in scored and x.config_path == layer.config_path]
            last = ([x for x in same if not x.mtp] or same or [x for x in info.layers if x.key in scored])[-1]
            out[key] = ("scores", last.key)
    elif name in ("scores-of", "same-ids-as") and arg:
        if arg not in scored:
            raise ShardcutError(f"mtp policy {policy!r}: layer {arg} has no scores (scored: {_span(scores.layers)})")
        out.update({k: ("scores" if name == "scores-of" else "same-ids", arg) for k in unscored})
    else:
        raise ShardcutError(f"unknown mtp policy {policy!r} (known: {', '.join(MTP_POLICIES)}, N a scored layer key)")
    for key, (_, src) in out.items():  # another stack's scores or ids fit only where the counts match
        layer, other = info.layer_by_key[key], info.layer_by_key[src]
        if layer.num_experts != other.num_experts or (
            out[key][0] == "same-ids" and layer.config_path != other.config_path
        ):
            raise ShardcutError(
                f"mtp policy {policy!r}: layer {key} ({layer.num_experts} experts) cannot take "
                f"layer {src}'s {'ids' if out[key][0] == 'same-ids' else 'scores'} "
                f"({other.num_experts} experts, expert count of {'.'.join(other.config_path) or 'config'})"
            )
    return out


def _check_protect(protect: dict[str, list[int]], info: ModelInfo) -> dict[str, list[int]]:
    for key, ids in protect.items():
        if key not in info.layer_by_key:
            raise ShardcutError(
                f"--protect: layer {key} is not a MoE layer of the model "
                f"(MoE layers: {_span([layer.key for layer in info.layers])})"
            )
        E = info.layer_by_key[key].num_experts
        bad = [i for i in ids if not 0 <= i < E]
        if bad:
            raise ShardcutError(f"--protect: layer {key}: expert ids {bad[:5]} out of range 0..{E - 1}")
    return protect


def _span(keys: list[str]) -> str:
    return ", ".join(keys) if len(keys) <= 6 else f"{', '.join(keys[:3])}, …, {', '.join(keys[-2:])}"


# ---------------------------------------------------------------------------------------------
# Summaries for `scores show`
