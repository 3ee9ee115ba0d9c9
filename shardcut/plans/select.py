"""Choosing which experts stay: criteria derived from a score file and per-layer selection under
the routing constraints (`shardcut.ops.planning.make_plan` puts them together into a plan).

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
where N does not fit one (not below its E, or below its top_k). The counts are computed in
`shardcut.plans.counts` (`kept_count`, `group_counts`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from shardcut.format.errors import PlanError, ScoresError
from shardcut.plans.counts import kept_count as kept_count  # noqa: F401 (its old home: tests import it here)
from shardcut.plans.options import SUPER_LAYER_FRACTION, SUPER_PERCENTILE
from shardcut.plans.options import parse_protect as parse_protect  # its old home: eval_cmd imports it here
from shardcut.plans.scores import Scores

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
SUPER_MAX_FRACTION = 10.0


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
    raise PlanError(f"unknown criterion {name!r} (known: {', '.join(CRITERIA)}{extra})")


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
        raise ScoresError(
            f"this score file holds only imported {held!r} values (no sums), so {name!r} cannot "
            f"be derived; use criterion {next(iter(scores.values))}",
            params=("criterion",),
        )
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
        raise PlanError(f"{kept} kept of {E} experts cannot split evenly over n_group={G}")
    size, per = E // G, kept // G
    prot = sorted({int(i) for i in protect})
    bad = [i for i in prot if not 0 <= i < E]
    if bad:
        raise PlanError(f"protected expert ids {bad[:5]} out of range 0..{E - 1}")
    chosen: list[int] = []
    for g in range(G):
        lo = g * size
        in_group = [i for i in prot if lo <= i < lo + size]
        if len(in_group) > per:
            where = f"group {g} (experts {lo}..{lo + size - 1})" if G > 1 else "the layer"
            raise PlanError(f"{len(in_group)} protected experts in {where} but only {per} kept there")
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


def super_experts(
    scores: Scores, layer_fraction: float = SUPER_LAYER_FRACTION, percentile: float = SUPER_PERCENTILE
) -> tuple[dict[str, list[int]], float]:
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
        raise ScoresError(
            "this score file has no act_max (imported criterion values only): super experts cannot be found"
        )
    if not (isinstance(percentile, (int, float)) and 0 < percentile <= 100):
        raise PlanError(f"super-expert percentile {percentile} must lie in (0, 100]")
    if not (isinstance(layer_fraction, (int, float)) and 0 < layer_fraction <= 1):
        raise PlanError(f"super-expert layer fraction {layer_fraction} must lie in (0, 1]")
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
    for r, (key, E) in enumerate(zip(scores.layers, scores.experts_per_row, strict=True)):
        order = rank(values[r, :E])  # a layer's own experts only, never the padding
        layers.append(
            {
                "layer": key,
                **({"experts": E} if multi else {}),
                "tokens": float(scores.tokens[r]) if scores.has_sums else None,
                "never_routed": [int(i) for i in np.flatnonzero(scores.count[r, :E] == 0)] if scores.has_sums else None,
                "lowest": [[int(i), float(values[r, i])] for i in order[::-1][:n]],
                "highest": [[int(i), float(values[r, i])] for i in order[:n]],
            }
        )
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
