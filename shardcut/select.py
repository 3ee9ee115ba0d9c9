"""Choosing which experts stay: criteria derived from a score file, per-layer selection under
the routing constraints, and `make_plan` (score file + model headers -> plan + report).

Criteria (higher = more important = kept; an expert never routed scores 0), over the
calibration tokens x routed to expert j, g_j(x) the gate the layer applied, f_j(x) the
expert's output before gating:

    reap                mean of g_j(x)·‖f_j(x)‖₂           = reap_sum / count   (REAP, eq. 9)
    ean                 Σ ‖f_j(x)‖₂                        = norm_sum
    ean_mean            mean of ‖f_j(x)‖₂                  = norm_sum / count
    frequency           number of tokens routed to j       = count
    weighted_frequency  Σ g_j(x)                           = gate_sum
    random              uniform in [0, 1), seeded (a baseline)

Rounding (the REAP reference's): experts pruned per layer = floor(E x ratio), the same in
every layer (256 x 0.30 -> 76 pruned, 180 kept), computed on the ratio as written (decimal),
so 100 x 0.29 prunes 29. With grouped routing (n_group > 1) the pruned count is rounded
down to a multiple of n_group (an explicit kept count up to one), so every group drops the
same number; the report says when this happened. `multiple_of=N` (off by default) makes the
kept count E' a multiple of N as well, for serving with expert parallelism (vLLM refuses or
unbalances an E' that its EP size does not divide): E' is rounded up to the next multiple of
lcm(N, n_group), so, as with every rounding here, no more experts are pruned than asked for.

Models with several expert counts (Qwen3-Omni: thinker 8, talker 6; one count per config
node, see `ModelInfo.layers_by_config`) apply all of this per count group: `ratio` prunes
floor(E x ratio) of each group's own E, with its own top_k (grouped routing is the main
stack's); `experts=N` keeps N in every layer of every group and is refused, naming the group,
where N does not fit one (not below its E, or below its top_k).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from shardcut.errors import PlanError, ShardcutError
from shardcut.model import CountGroup, ModelInfo, count_groups
from shardcut.plan import Plan, check_replaceable_plan, validate_plan
from shardcut.scores import Scores, file_sha256

CRITERIA: dict[str, str] = {
    "reap": "mean over routed tokens of g_j(x)·‖f_j(x)‖₂ (reap_sum / count)",
    "ean": "Σ ‖f_j(x)‖₂ over routed tokens (norm_sum)",
    "ean_mean": "mean over routed tokens of ‖f_j(x)‖₂ (norm_sum / count)",
    "frequency": "tokens routed to j (count)",
    "weighted_frequency": "Σ g_j(x) over routed tokens (gate_sum)",
    "random": "seeded uniform random values (baseline)",
}
# The REAP reference's names for the same quantities.
ALIASES = {"ean_sum": "ean", "expert_frequency": "frequency", "weighted_expert_frequency_sum": "weighted_frequency"}
MTP_POLICIES = ("reuse-last", "scores-of:N", "same-ids-as:N")
SUPER_PERCENTILE = 99.5
SUPER_MAX_FRACTION = 10.0
SUPER_LAYER_FRACTION = 0.75


def canonical_criterion(name: str | None, scores: Scores | None = None) -> str:
    """The criterion's canonical name; raises for an unknown one (imported values count as known).

    None means the default: `reap`, or for a file holding only one imported criterion, that one.
    """
    if name is None:
        only = list(scores.values) if scores is not None and not scores.has_sums else []
        return only[0] if len(only) == 1 else "reap"
    name = ALIASES.get(name, name)
    if name in CRITERIA or (scores is not None and name in scores.values):
        return name
    extra = f"; this file also holds imported values of {', '.join(scores.values)}" if scores and scores.values else ""
    raise ShardcutError(f"unknown criterion {name!r} (known: {', '.join(CRITERIA)}{extra})")


def criterion_values(scores: Scores, criterion: str | None = "reap", seed: int = 0) -> np.ndarray:
    """Per-layer, per-expert values `[L, E]` of a criterion (higher = keep); formulas in the module doc.

    Example:
        >>> criterion_values(Scores.load("scores.safetensors"), "ean_mean")[0].argmax()
    """
    name = canonical_criterion(criterion, scores)
    if name in scores.values:
        return scores.values[name]
    if name == "random":  # padding past a layer's own count stays 0, as in every other criterion
        return np.where(scores.valid_mask(), np.random.default_rng(seed).random(scores.count.shape), 0.0)
    if not scores.has_sums:
        held = ", ".join(scores.values)
        raise ShardcutError(f"this score file holds only imported {held!r} values (no sums), so {name!r} cannot "
                            f"be derived; use --criterion {next(iter(scores.values))}")
    with np.errstate(divide="ignore", invalid="ignore"):
        if name == "reap":
            return np.where(scores.count > 0, scores.reap_sum / scores.count, 0.0)
        if name == "ean_mean":
            return np.where(scores.count > 0, scores.norm_sum / scores.count, 0.0)
    return {"ean": scores.norm_sum, "frequency": scores.count, "weighted_frequency": scores.gate_sum}[name].copy()


def rank(values: np.ndarray) -> np.ndarray:
    """Expert ids from most to least important: higher value first, on equal values the lower id."""
    values = np.asarray(values, dtype=np.float64)
    return np.lexsort((np.arange(len(values)), -values))


# ---------------------------------------------------------------------------------------------
# Counts


@dataclass(frozen=True)
class Counts:
    """How many experts every layer keeps, and how that number was reached."""

    num_experts: int
    kept: int
    ratio: float | None
    rule: str  # human-readable: "pruned per layer = floor(256 x 0.3) = 76 -> 180 kept"
    rounded: str | None = None  # set when group balance or multiple_of changed the count
    multiple_of: int = 1

    @property
    def pruned(self) -> int:
        return self.num_experts - self.kept


def kept_count(num_experts: int, top_k: int, *, ratio: float | None = None, experts: int | None = None,
               n_group: int = 1, topk_group: int = 1, multiple_of: int = 1) -> Counts:
    """Experts kept per layer for `ratio` (fraction removed) or `experts` (kept), with the floors.

    `multiple_of`: round the kept count up to a multiple of it (and of n_group) as well.

    Example:
        >>> kept_count(256, 8, ratio=0.30).kept
        180
        >>> kept_count(256, 8, ratio=0.30, n_group=8, topk_group=4).kept
        184
        >>> kept_count(256, 8, ratio=0.30, multiple_of=16).kept
        192
    """
    E, G = num_experts, max(1, n_group)
    if (ratio is None) == (experts is None):
        raise ShardcutError("give exactly one of ratio (fraction of experts removed) or experts (kept per layer)")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise PlanError(f"multiple_of {multiple_of!r} must be a positive integer (e.g. the expert-parallel size)")
    M = multiple_of
    rounded = None
    if ratio is not None:
        if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0 < ratio < 1):
            raise ShardcutError(f"ratio {ratio} must lie strictly between 0 and 1 (the fraction of experts removed)")
        pruned = math.floor(E * Fraction(repr(float(ratio))))
        rule = f"pruned per layer = floor({E} x {ratio:g}) = {pruned}"
        if pruned == 0:
            raise ShardcutError(f"ratio {ratio:g} removes no expert of {E} (floor({E} x {ratio:g}) = 0)")
        if G > 1 and pruned % G:
            down = pruned - pruned % G
            rounded = (f"rounded down to {down}, a multiple of n_group={G}, so every group drops {down // G}")
            if down == 0:
                raise ShardcutError(f"ratio {ratio:g} prunes {pruned} of {E} experts, fewer than one per group "
                                    f"(n_group={G}); use a ratio of at least {G / E:g}")
            pruned = down
            rule += f", {rounded}"
        kept = E - pruned
        rule += f" -> {kept} kept"
    else:
        if isinstance(experts, bool) or not isinstance(experts, int):
            raise ShardcutError(f"experts {experts!r} must be an integer")
        if experts >= E or experts < 1:
            raise ShardcutError(f"experts {experts} must be below the model's {E} experts per layer (and at least 1)")
        if experts < top_k:
            raise ShardcutError(f"experts {experts} is fewer than top_k={top_k}: every token routes to {top_k} experts")
        kept = experts
        rule = f"{kept} kept per layer as requested"
        if G > 1 and kept % G:
            up = kept + G - kept % G
            rounded = f"rounded up to {up}, a multiple of n_group={G}, so every group keeps {up // G}"
            kept = up
            rule = f"{experts} kept per layer requested, {rounded}"
        if kept >= E:
            raise ShardcutError(f"experts {experts} rounded to a multiple of n_group={G} keeps all {E} experts")
    if M > 1 and kept % M:
        step = math.lcm(M, G)  # kept stays a multiple of n_group (E is one), so whole groups still drop
        up = kept + step - kept % step
        what = f"multiple_of={M}" + (f" and n_group={G}" if G > 1 else "")
        note = f"kept rounded up from {kept} to {up}, a multiple of {what} (E' % {M} == 0)"
        if up >= E:
            raise PlanError(f"{rule}; {note} keeps all {E} experts: use a larger ratio (fewer kept) or another "
                                f"multiple_of")
        rounded = f"{rounded}; {note}" if rounded else note
        rule += f", {note}"
        kept = up
    if kept < top_k:
        raise ShardcutError(f"{rule}: fewer than top_k={top_k}; use a ratio of at most {(E - top_k) / E:g}")
    if G > 1:
        per = kept // G
        if per < 2:
            raise ShardcutError(f"{rule}: {per} per group with n_group={G}; grouped routing needs at least 2 per group")
        if topk_group * per < top_k:
            raise ShardcutError(f"{rule}: topk_group={topk_group} x {per} per group < top_k={top_k}, so a token "
                                f"could not find {top_k} experts in its {topk_group} groups")
    return Counts(E, kept, ratio, rule, rounded, M)


def group_counts(info: ModelInfo, *, ratio: float | None = None, experts: int | None = None,
                 multiple_of: int = 1) -> list[tuple[CountGroup, Counts]]:
    """Each count group with the experts its layers keep (`kept_count` on the group's own facts).

    Example:
        >>> [(g.name, c.kept) for g, c in group_counts(info, ratio=0.5)]
        [('thinker_config.text_config', 4), ('talker_config.text_config', 3)]
    """
    groups = count_groups(info)
    out = []
    for g in groups:
        try:
            counts = kept_count(g.num_experts, g.top_k, ratio=ratio, experts=experts, n_group=g.n_group,
                                topk_group=g.topk_group, multiple_of=multiple_of)
        except ShardcutError as exc:
            if len(groups) == 1:
                raise
            hint = ("; experts N keeps N in every layer of every stack, a ratio prunes each its own share"
                    if experts is not None else "")
            raise ShardcutError(f"{g.name} ({g.num_experts} experts per layer, top_k={g.top_k}): {exc}{hint}") from None
        out.append((g, counts))
    return out


# ---------------------------------------------------------------------------------------------
# Selection from arrays (no model I/O)


@dataclass
class Selection:
    """One layer's choice: kept ids (ascending) and how the order was honoured."""

    kept: list[int]
    lowest_kept: float | None
    highest_pruned: float | None
    protected: list[int]
    protection_overrode: bool  # a protected expert displaced a higher-scoring one
    group_balance_overrode: bool  # per-group quotas kept an expert scoring below one pruned in another group


def select_layer(values, kept: int, n_group: int = 1, protect=()) -> Selection:
    """Keep `kept` experts of one layer by `values` (higher = keep; ties keep the lower id).

    With `n_group` > 1 experts form `n_group` contiguous groups and each keeps kept/n_group,
    ranked within the group. `protect` ids are kept whatever their value (they count against
    their group's quota).

    Example:
        >>> select_layer([0.5, 0.1, 0.9, 0.1], 2).kept
        [0, 2]
        >>> select_layer([0.5, 0.1, 0.9, 0.1], 2, n_group=2).kept
        [0, 2]
    """
    v = np.asarray(values, dtype=np.float64)
    E, G = len(v), max(1, n_group)
    if E % G or kept % G:
        raise ShardcutError(f"{kept} kept of {E} experts cannot split evenly over n_group={G}")
    size, per = E // G, kept // G
    prot = sorted({int(i) for i in protect})
    bad = [i for i in prot if not 0 <= i < E]
    if bad:
        raise ShardcutError(f"protected expert ids {bad[:5]} out of range 0..{E - 1}")
    chosen: list[int] = []
    for g in range(G):
        lo = g * size
        in_group = [i for i in prot if lo <= i < lo + size]
        if len(in_group) > per:
            where = f"group {g} (experts {lo}..{lo + size - 1})" if G > 1 else "the layer"
            raise ShardcutError(f"{len(in_group)} protected experts in {where} but only {per} kept there")
        order = [lo + int(i) for i in rank(v[lo : lo + size]) if lo + int(i) not in in_group]
        chosen += in_group + order[: per - len(in_group)]
    chosen.sort()
    pruned = np.setdiff1d(np.arange(E), chosen)
    plain = _plain(v, kept, G)
    return Selection(
        chosen,
        float(v[chosen].min()) if chosen else None,
        float(v[pruned].max()) if len(pruned) else None,
        prot,
        protection_overrode=bool(prot) and chosen != plain,
        group_balance_overrode=G > 1 and plain != _plain(v, kept, 1),
    )


def _plain(v: np.ndarray, kept: int, G: int) -> list[int]:
    size, per = len(v) // G, kept // G
    return sorted(g * size + int(i) for g in range(G) for i in rank(v[g * size : (g + 1) * size])[:per])


def super_experts(scores: Scores, layer_fraction: float = SUPER_LAYER_FRACTION,
                  percentile: float = SUPER_PERCENTILE) -> tuple[dict[str, list[int]], float]:
    """Experts with outlier activations, by layer key, and the threshold used.

    threshold = max(`percentile`-th percentile of act_max over every scored layer, global max / 10);
    an expert is super when its act_max exceeds it and its layer is among the first
    `layer_fraction` of the scored layers (int(L x fraction)). The defaults, 99.5 and 0.75, are
    the REAP reference's (a fraction of 1 is its "preserve outliers" everywhere). Unlike the
    reference, rows map to their own layer keys (not to decoder indices 0..L-1).

    Example:
        >>> super_experts(Scores.load("scores.safetensors"))
        ({'5': [17]}, 812.5)
    """
    if not scores.has_sums:
        raise ShardcutError("this score file has no act_max (imported criterion values only): "
                            "super experts cannot be found")
    if not (isinstance(percentile, (int, float)) and 0 < percentile <= 100):
        raise ShardcutError(f"super-expert percentile {percentile} must lie in (0, 100]")
    if not (isinstance(layer_fraction, (int, float)) and 0 < layer_fraction <= 1):
        raise ShardcutError(f"super-expert layer fraction {layer_fraction} must lie in (0, 1]")
    a = scores.act_max
    real = a[scores.valid_mask()]  # padding past a layer's own count is no expert
    threshold = max(float(np.percentile(real, percentile)), float(real.max()) / SUPER_MAX_FRACTION)
    order = sorted(range(len(scores.layers)), key=lambda r: _layer_sort_key(scores.layers[r]))
    considered = order[: int(len(order) * layer_fraction)]
    found = {scores.layers[r]: [int(i) for i in np.flatnonzero(a[r] > threshold)] for r in considered}
    return {k: v for k, v in found.items() if v}, threshold


def _layer_sort_key(key: str) -> tuple[str, int]:
    m = re.fullmatch(r"(.*?)(\d+)", key)
    return (m.group(1), int(m.group(2))) if m else (key, -1)


def parse_protect(specs: list[str] | None) -> dict[str, list[int]]:
    """`["3:0,5", "mtp.0:1"]` -> `{"3": [0, 5], "mtp.0": [1]}` (the `--protect` syntax).

    Example:
        >>> parse_protect(["3:0,5"])
        {'3': [0, 5]}
    """
    out: dict[str, list[int]] = {}
    for spec in specs or []:
        layer, sep, ids = spec.partition(":")
        try:
            parsed = [int(x) for x in ids.split(",") if x.strip()]
        except ValueError:
            parsed = []
        if not sep or not layer.strip() or not parsed:
            raise ShardcutError(f"--protect {spec!r}: expected LAYER:ID[,ID...], e.g. 3:0,17")
        out.setdefault(layer.strip(), []).extend(parsed)
    return out


# ---------------------------------------------------------------------------------------------
# Plans for a model


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

    Reads only the model's config and shard headers. MoE layers the scores do not cover (MTP
    layers, which calibration through transformers cannot see) need `mtp_policy`:
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
    from shardcut.container import shard_size
    from shardcut.durable import check_output
    from shardcut.hub import is_local, open_model
    from shardcut.model import describe
    from shardcut.rewrite import layout

    if out is not None:
        check_output(out, [model if is_local(model) else None, None if isinstance(scores, Scores) else scores],
                     overwrite=overwrite, what="plan")
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
    group_of = {layer.key: (g, c) for g, c in per_group for layer in g.layers}
    sources = _ranking_sources(info, scores, mtp_policy, origin)
    scores.require_routed(origin)
    values = criterion_values(scores, crit, seed)
    row_of = {k: i for i, k in enumerate(scores.layers)}

    protected = {k: list(v) for k, v in _check_protect(protect or {}, info).items()}
    notes: list[str] = []
    threshold, supers = None, {}
    warnings: list[str] = []
    mismatch = _scores_model_mismatch(model, ckpt, info, scores)
    if mismatch:
        warnings.append(f"the scores were computed on another model ({mismatch}); only their layers and expert "
                        "counts were checked against MODEL")
    if protect_super_experts:
        supers, threshold = super_experts(scores, super_layer_fraction, super_percentile)
        notes.append(f"super-expert threshold {threshold:.6g} (percentile {super_percentile:g}, first "
                     f"{super_layer_fraction:g} of the layers): "
                     + (", ".join(f"layer {k}: {v}" for k, v in supers.items()) if supers else "none found"))
    for g, c in per_group:
        if c.rounded:
            notes.append(f"{'rounding' if 'multiple_of=' in c.rounded else 'grouped routing'}{f' ({g.name})' if multi else ''}: "
                         f"{c.rounded}")

    keep: dict[str, list[int]] = {}
    rows: list[LayerRow] = []
    pending: list[tuple[str, str]] = []
    for layer in info.layers:
        kind, src = sources[layer.key]
        if kind == "same-ids":
            pending.append((layer.key, src))
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
        rows.append(LayerRow(layer.key, len(sel.kept), c.pruned, sel.lowest_kept, sel.highest_pruned,
                             sel.protected, sel.protection_overrode, sel.group_balance_overrode,
                             "scores" if src == layer.key else f"ranked with the scores of layer {src}",
                             by_id, tie, never))
    for key, src in pending:
        keep[key] = list(keep[src])
        if protected.get(key) and not set(protected[key]) <= set(keep[key]):
            raise ShardcutError(f"layer {key}: protected experts {protected[key]} are not all among layer {src}'s "
                                f"kept ids, which mtp policy same-ids-as:{src} copies")
        c = group_of[key][1]
        rows.append(LayerRow(key, c.kept, c.pruned, None, None, protected.get(key, []), False, False,
                             f"keeps the same ids as layer {src}"))
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
        chosen = {**({"experts": kept_all.pop()} if len(kept_all) == 1 else {}),
                  "num_experts_by_config": {g.name: c.kept for g, c in per_group},
                  "pruned_per_layer_by_config": {g.name: c.pruned for g, c in per_group},
                  "rounding_by_config": {g.name: c.rule for g, c in per_group}}
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
    if mtp_policy and any(kind != "own" for kind, _ in sources.values()):
        extra["mtp_policy"] = mtp_policy
        notes += [f"mtp policy {mtp_policy}: layer {row.layer} has no scores, {row.source}"
                  for row in rows if row.source != "scores"]
    elif mtp_policy:
        notes.append(f"mtp policy {mtp_policy!r} not needed: every MoE layer has scores")
    if protected:
        extra["protected"] = {k: sorted(set(v)) for k, v in protected.items()}
    if protect_super_experts:
        extra["super_expert_threshold"] = threshold
        extra["super_experts"] = {"percentile": super_percentile, "layer_fraction": super_layer_fraction,
                                  "max_fraction": SUPER_MAX_FRACTION, "threshold": threshold}
    decided = sum(row.decided_by_id for row in rows)
    if warnings:
        extra["warnings"] = warnings
        extra["decided_by_id_order"] = decided
    plan = Plan(keep, extra, "plan")
    validate_plan(plan, info, "plan")

    lay = layout(ckpt, info, plan)
    output = sum(shard_size(s, m) for s, m in zip(lay.shards, lay.metadata))
    rule = "; ".join(f"{g.name}: {c.rule}" for g, c in per_group) if multi else counts.rule
    by_config = {g.name: {"num_experts": g.num_experts, "top_k": g.top_k, "kept": c.kept, "pruned": c.pruned,
                          "rule": c.rule, "rounded": c.rounded} for g, c in per_group} if multi else {}
    report = PlanReport(model_text, info.arch.name, crit, info.num_experts, counts.kept, ratio, rule, rows,
                        ckpt.file_bytes, output, sha, extra.get("mtp_policy"), threshold, notes, by_config,
                        warnings, decided)
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
        out.append(f"layer {row.layer}: the cut falls among {row.decided_by_id} experts with {what}{never}; "
                   "which of them stay was decided by id order (lower ids kept)")
    if out:
        total = sum(row.decided_by_id for row in rows)
        never = sum(row.never_routed_at_cut for row in rows)
        out.insert(0, f"{len(out)} of {len(rows)} MoE layers cut among equal scores: {total} experts decided by id "
                      f"order" + (f" ({never} never routed: more calibration data would rank them)" if never else ""))
    return out


def _scores_model_mismatch(model, ckpt, info: ModelInfo, scores: Scores) -> str | None:
    """How the scores' recorded model differs from MODEL (fingerprint, commit, architecture), or None."""
    from shardcut.checkpoint import layout_fingerprint
    from shardcut.scores import model_mismatch

    here = {"model": str(model), "architecture": info.arch.name, "model_fingerprint": layout_fingerprint(ckpt)}
    text = str(model)
    if "@" in text and not Path(text).exists():
        here["revision"] = text.split("@", 1)[1]
    return model_mismatch(here, {k: v for k, v in scores.metadata.items() if k != "num_experts"})
# The `shardcut plan` / `prune --scores` flag of every `make_plan` option (one table, so the
# model card's commands and the CLI cannot drift apart; a test checks every option has one).
# make_plan records every option named here in the plan's `options`.
PLAN_FLAGS: dict[str, str] = {
    "ratio": "--ratio", "experts": "--experts", "criterion": "--criterion", "seed": "--seed",
    "protect_super_experts": "--protect-super-experts", "protect": "--protect", "mtp_policy": "--mtp-policy",
    "multiple_of": "--multiple-of", "super_percentile": "--super-percentile",
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

    defaults = {k: p.default for k, p in inspect.signature(make_plan).parameters.items()
                if p.kind is p.KEYWORD_ONLY}
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


def _ranking_sources(info: ModelInfo, scores: Scores, policy: str | None, origin: str) -> dict[str, tuple[str, str]]:
    """For each MoE layer: ("own", key), ("scores", N) or ("same-ids", N); checks the scores fit the model."""
    E = info.num_experts
    if len(info.layers_by_config()) == 1 and scores.layer_experts is None and scores.num_experts != E:
        raise ShardcutError(f"holds scores of {scores.num_experts} experts per layer, the model has {E} "
                            "(scores of another model?)", origin)
    model_keys = [layer.key for layer in info.layers]
    foreign = [k for k in scores.layers if k not in info.layer_by_key]
    if foreign:
        raise ShardcutError(f"covers layers {foreign[:5]} that are not MoE layers of the model (its MoE layers: "
                            f"{_span(model_keys)}; scores of another model?)", origin)
    scored = set(scores.layers)
    missing_main = [layer.key for layer in info.layers if not layer.mtp and layer.key not in scored]
    if missing_main:
        raise ShardcutError(f"lacks MoE layers {missing_main[:5]} of the model ({len(scores.layers)} scored, "
                            f"{len(model_keys)} in the model; scores of another model?)", origin)
    for key in scores.layers:
        have, want = scores.experts_of(key), info.layer_by_key[key].num_experts
        if have != want:
            raise ShardcutError(f"layer {key}: holds scores of {have} experts, the model's layer has {want} (scores "
                                "of another model, or a file without per-layer counts (layer_experts)?)", origin)
    unscored = [layer.key for layer in info.layers if layer.key not in scored]
    out = {k: ("own", k) for k in model_keys if k in scored}
    if not unscored:
        return out
    if not policy:
        raise ShardcutError(
            f"MoE layers {', '.join(unscored)} (MTP) have no scores; choose how to prune them with mtp_policy "
            f"(--mtp-policy): reuse-last, scores-of:N or same-ids-as:N", origin)
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
        if layer.num_experts != other.num_experts or (out[key][0] == "same-ids" and
                                                      layer.config_path != other.config_path):
            raise ShardcutError(f"mtp policy {policy!r}: layer {key} ({layer.num_experts} experts) cannot take "
                                f"layer {src}'s {'ids' if out[key][0] == 'same-ids' else 'scores'} "
                                f"({other.num_experts} experts, expert count of {'.'.join(other.config_path) or 'config'})")
    return out


def _check_protect(protect: dict[str, list[int]], info: ModelInfo) -> dict[str, list[int]]:
    for key, ids in protect.items():
        if key not in info.layer_by_key:
            raise ShardcutError(f"--protect: layer {key} is not a MoE layer of the model "
                                f"(MoE layers: {_span([layer.key for layer in info.layers])})")
        E = info.layer_by_key[key].num_experts
        bad = [i for i in ids if not 0 <= i < E]
        if bad:
            raise ShardcutError(f"--protect: layer {key}: expert ids {bad[:5]} out of range 0..{E - 1}")
    return protect


def _span(keys: list[str]) -> str:
    return ", ".join(keys) if len(keys) <= 6 else f"{', '.join(keys[:3])}, …, {', '.join(keys[-2:])}"


# ---------------------------------------------------------------------------------------------
# Summaries for `scores show`


def summarize_scores(scores: Scores, criterion: str | None = None, seed: int = 0, n: int = 3) -> dict:
    """A JSON-ready per-layer summary: tokens, never-routed experts, lowest and highest experts.

    Example:
        >>> summarize_scores(Scores.load("scores.safetensors"), "reap")["layers"][0]["lowest"]
        [[12, 0.0031], [40, 0.0040], [7, 0.0052]]
    """
    crit = canonical_criterion(criterion, scores)
    values = criterion_values(scores, crit, seed)
    multi = scores.layer_experts is not None
    layers = []
    for r, (key, E) in enumerate(zip(scores.layers, scores.experts_per_row)):
        order = rank(values[r, :E])  # a layer's own experts only, never the padding
        layers.append({
            "layer": key,
            **({"experts": E} if multi else {}),
            "tokens": float(scores.tokens[r]) if scores.has_sums else None,
            "never_routed": [int(i) for i in np.flatnonzero(scores.count[r, :E] == 0)] if scores.has_sums else None,
            "lowest": [[int(i), float(values[r, i])] for i in order[::-1][:n]],
            "highest": [[int(i), float(values[r, i])] for i in order[:n]],
        })
    return {
        "format": "shardcut-scores/1",
        "criterion": crit,
        "criterion_definition": CRITERIA.get(crit, "imported values"),
        "num_experts": scores.num_experts,
        **({"layer_experts": scores.experts_per_row} if multi else {}),
        "has_sums": scores.has_sums,
        "imported_criteria": list(scores.values),
        "metadata": dict(scores.metadata),
        "layers": layers,
    }
