"""How many experts each layer keeps: `kept_count` (floor(E x ratio) pruned, or a kept count
asked for, rounded to n_group and multiple_of, checked to stay routable) and `group_counts`, the
same for each count group of a model (stacks with their own expert count)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from shardcut.format.errors import PlanError, ShardcutError
from shardcut.moe.model import CountGroup, ModelInfo, count_groups


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


def kept_count(
    num_experts: int,
    top_k: int,
    *,
    ratio: float | None = None,
    experts: int | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    multiple_of: int = 1,
) -> Counts:
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
        raise PlanError("give exactly one of ratio (fraction of experts removed) or experts (kept per layer)")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise PlanError(f"multiple_of {multiple_of!r} must be a positive integer (e.g. the expert-parallel size)")
    if ratio is not None:
        kept, rule, rounded = _kept_for_ratio(E, G, ratio)
    else:
        assert experts is not None  # exactly one of the two, checked above
        kept, rule, rounded = _kept_as_asked(E, G, top_k, experts)
    kept, rule, rounded = _round_to_multiple(E, G, kept, multiple_of, rule, rounded)
    _check_routable(E, G, top_k, topk_group, kept, rule)
    return Counts(E, kept, ratio, rule, rounded, multiple_of)


def _kept_for_ratio(E: int, G: int, ratio: float) -> tuple[int, str, str | None]:
    """floor(E x ratio) pruned, rounded down to a multiple of n_group: (kept, rule, rounding)."""
    rounded = None
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0 < ratio < 1):
        raise PlanError(f"ratio {ratio} must lie strictly between 0 and 1 (the fraction of experts removed)")
    pruned = math.floor(E * Fraction(repr(float(ratio))))
    rule = f"pruned per layer = floor({E} x {ratio:g}) = {pruned}"
    if pruned == 0:
        raise PlanError(f"ratio {ratio:g} removes no expert of {E} (floor({E} x {ratio:g}) = 0)")
    if G > 1 and pruned % G:
        down = pruned - pruned % G
        rounded = f"rounded down to {down}, a multiple of n_group={G}, so every group drops {down // G}"
        if down == 0:
            raise PlanError(
                f"ratio {ratio:g} prunes {pruned} of {E} experts, fewer than one per group "
                f"(n_group={G}); use a ratio of at least {G / E:g}"
            )
        pruned = down
        rule += f", {rounded}"
    kept = E - pruned
    return kept, rule + f" -> {kept} kept", rounded


def _kept_as_asked(E: int, G: int, top_k: int, experts: int) -> tuple[int, str, str | None]:
    """`experts` kept, rounded up to a multiple of n_group: (kept, rule, rounding)."""
    rounded = None
    if isinstance(experts, bool) or not isinstance(experts, int):
        raise PlanError(f"experts {experts!r} must be an integer")
    if experts >= E or experts < 1:
        raise PlanError(f"experts {experts} must be below the model's {E} experts per layer (and at least 1)")
    if experts < top_k:
        raise PlanError(f"experts {experts} is fewer than top_k={top_k}: every token routes to {top_k} experts")
    kept = experts
    rule = f"{kept} kept per layer as requested"
    if G > 1 and kept % G:
        up = kept + G - kept % G
        rounded = f"rounded up to {up}, a multiple of n_group={G}, so every group keeps {up // G}"
        kept = up
        rule = f"{experts} kept per layer requested, {rounded}"
    if kept >= E:
        raise PlanError(f"experts {experts} rounded to a multiple of n_group={G} keeps all {E} experts")
    return kept, rule, rounded


def _round_to_multiple(
    E: int, G: int, kept: int, M: int, rule: str, rounded: str | None
) -> tuple[int, str, str | None]:
    """The kept count rounded up to a multiple of `multiple_of` (and n_group), never to all E."""
    if M > 1 and kept % M:
        step = math.lcm(M, G)  # kept stays a multiple of n_group (E is one), so whole groups still drop
        up = kept + step - kept % step
        what = f"multiple_of={M}" + (f" and n_group={G}" if G > 1 else "")
        note = f"kept rounded up from {kept} to {up}, a multiple of {what} (E' % {M} == 0)"
        if up >= E:
            raise PlanError(
                f"{rule}; {note} keeps all {E} experts: use a larger ratio (fewer kept) or another multiple_of"
            )
        rounded = f"{rounded}; {note}" if rounded else note
        rule += f", {note}"
        kept = up
    return kept, rule, rounded


def _check_routable(E: int, G: int, top_k: int, topk_group: int, kept: int, rule: str) -> None:
    """Every token still finds top_k experts (within its topk_group groups under grouped routing)."""
    if kept < top_k:
        raise PlanError(f"{rule}: fewer than top_k={top_k}; use a ratio of at most {(E - top_k) / E:g}")
    if G > 1:
        per = kept // G
        if per < 2:
            raise PlanError(f"{rule}: {per} per group with n_group={G}; grouped routing needs at least 2 per group")
        if topk_group * per < top_k:
            raise PlanError(
                f"{rule}: topk_group={topk_group} x {per} per group < top_k={top_k}, so a token "
                f"could not find {top_k} experts in its {topk_group} groups"
            )


def group_counts(
    info: ModelInfo, *, ratio: float | None = None, experts: int | None = None, multiple_of: int = 1
) -> list[tuple[CountGroup, Counts]]:
    """Each count group with the experts its layers keep (`kept_count` on the group's own facts).

    Example:
        >>> [(g.name, c.kept) for g, c in group_counts(info, ratio=0.5)]
        [('thinker_config.text_config', 4), ('talker_config.text_config', 3)]
    """
    groups = count_groups(info)
    out = []
    for g in groups:
        try:
            counts = kept_count(
                g.num_experts,
                g.top_k,
                ratio=ratio,
                experts=experts,
                n_group=g.n_group,
                topk_group=g.topk_group,
                multiple_of=multiple_of,
            )
        except ShardcutError as exc:
            if len(groups) == 1:
                raise
            hint = (
                "; experts N keeps N in every layer of every stack, a ratio prunes each its own share"
                if experts is not None
                else ""
            )
            raise PlanError(f"{g.name} ({g.num_experts} experts per layer, top_k={g.top_k}): {exc}{hint}") from None
        out.append((g, counts))
    return out
