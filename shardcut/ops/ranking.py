"""Where each MoE layer of a plan takes its ranking from (its own scores, another layer's under
`mtp_policy`, or none: kept whole), and the checks that the scores and `protect` fit the model.
Used by `make_plan` (`planning.py`)."""

from __future__ import annotations

from shardcut.format.errors import PlanError, ScoresError
from shardcut.format.text import span
from shardcut.moe.model import ModelInfo
from shardcut.plans.layer_names import check_layers
from shardcut.plans.options import MTP_POLICIES
from shardcut.plans.scores import Scores

UNREACHED = "no scores, a text-only calibration never routes through this stack"


def text_unreached(info: ModelInfo) -> set[str]:
    """Plan keys of the MoE layers a text-only calibration never reaches (the table's
    `Calibration.text_only_stacks`: ERNIE-VL's vision experts, Qwen3-Omni's talker)."""
    stacks = info.arch.calibration_of(info.config.get("model_type")).text_only_stacks
    return {layer.key for layer in info.layers if not layer.mtp and layer.stack.plan_prefix in stacks}


def ranking_sources(info: ModelInfo, scores: Scores, policy: str | None, origin: str) -> dict[str, tuple[str, str]]:
    """For each MoE layer: ("own", key), ("scores", N), ("same-ids", N) or ("whole", key) (a stack
    text-only calibration never reaches, with a count of its own: every expert kept); checks the
    scores fit the model."""
    unreached = text_unreached(info)
    _check_fit(info, scores, origin, unreached)
    scored = set(scores.layers)
    out = _own_or_whole(info, scored, unreached)
    unscored = [layer.key for layer in info.layers if layer.key not in out]
    if not unscored:
        return out
    policy = _require_policy(info, unscored, unreached, policy, origin)
    out.update(_by_policy(info, scores, unscored, policy))
    _check_policy_counts(info, out, policy)
    return out


def _check_fit(info: ModelInfo, scores: Scores, origin: str, unreached: set[str]) -> None:
    """The scores are of this model: its MoE layers (every main one) with their expert counts."""
    E = info.num_experts
    if len(info.layers_by_config()) == 1 and scores.layer_experts is None and scores.num_experts != E:
        raise ScoresError(
            f"holds scores of {scores.num_experts} experts per layer, the model has {E} (scores of another model?)",
            origin,
        )
    check_layers(scores.layers, info, origin, unreached)  # the model's MoE layers, every main one
    for key in scores.layers:
        have, want = scores.experts_of(key), info.layer_by_key[key].num_experts
        if have != want:
            raise ScoresError(
                f"layer {key}: holds scores of {have} experts, the model's layer has {want} (scores "
                "of another model, or a file without per-layer counts (layer_experts)?)",
                origin,
            )


def _own_or_whole(info: ModelInfo, scored: set[str], unreached: set[str]) -> dict[str, tuple[str, str]]:
    """Scored layers rank by their own scores; a stack text-only calibration never reaches, with
    its own config count, is kept whole."""
    model_keys = [layer.key for layer in info.layers]
    out = {k: ("own", k) for k in model_keys if k in scored}
    # a stack text-only calibration never reaches, with its own config count, is kept whole
    whole_groups = [
        path
        for path, layers in info.layers_by_config().items()
        if all(layer.key in unreached and layer.key not in scored for layer in layers)
    ]
    for path in whole_groups:
        out.update({layer.key: ("whole", layer.key) for layer in info.layers_by_config()[path]})
    return out


def _require_policy(info: ModelInfo, unscored: list[str], unreached: set[str], policy: str | None, origin: str) -> str:
    """Unscored layers (MTP, or a text-unreached stack sharing the main count) need mtp_policy."""
    shared = [k for k in unscored if k in unreached]
    if shared and not policy:
        stacks = sorted({info.layer_by_key[k].stack.plan_prefix for k in shared})
        raise PlanError(
            f"MoE layers {span(shared)} ({', '.join(stacks)} stack) have no scores: a text-only calibration never "
            "routes through them, and they cannot be kept whole because they share one expert count with the "
            f"scored layers ({info.arch.name}: transformers and vLLM load one count for both; a prune keeps the "
            "same number in each). Rank them anyway with mtp_policy (reuse-last, scores-of:N or same-ids-as:N): "
            "their kept experts then follow text statistics",
            origin,
            params=("mtp_policy",),
        )
    if not policy:
        raise PlanError(
            f"MoE layers {', '.join(unscored)} (MTP) have no scores; choose how to prune them with mtp_policy: "
            "reuse-last, scores-of:N or same-ids-as:N",
            origin,
            params=("mtp_policy",),
        )
    return policy


def _by_policy(info: ModelInfo, scores: Scores, unscored: list[str], policy: str) -> dict[str, tuple[str, str]]:
    """Where each unscored layer takes its ranking from, under mtp_policy."""
    scored = set(scores.layers)
    out: dict[str, tuple[str, str]] = {}
    name, _, arg = policy.partition(":")
    if name == "reuse-last" and not arg:
        for key in unscored:  # the last scored layer of the same count group (the main stack's, for MTP)
            layer = info.layer_by_key[key]
            same = [x for x in info.layers if x.key in scored and x.config_path == layer.config_path]
            last = ([x for x in same if not x.mtp] or same or [x for x in info.layers if x.key in scored])[-1]
            out[key] = ("scores", last.key)
    elif name in ("scores-of", "same-ids-as") and arg:
        if arg not in scored:
            raise PlanError(
                f"mtp_policy {policy!r}: layer {arg} has no scores (scored: {span(scores.layers)})",
                params=("mtp_policy",),
            )
        out.update({k: ("scores" if name == "scores-of" else "same-ids", arg) for k in unscored})
    else:
        raise PlanError(
            f"unknown mtp_policy {policy!r} (known: {', '.join(MTP_POLICIES)}, N a scored layer key)",
            params=("mtp_policy",),
        )
    return out


def _check_policy_counts(info: ModelInfo, out: dict[str, tuple[str, str]], policy: str) -> None:
    """Another stack's scores or ids fit only where the counts match."""
    for key, (_, src) in out.items():
        layer, other = info.layer_by_key[key], info.layer_by_key[src]
        if layer.num_experts != other.num_experts or (
            out[key][0] == "same-ids" and layer.config_path != other.config_path
        ):
            raise PlanError(
                f"mtp_policy {policy!r}: layer {key} ({layer.num_experts} experts) cannot take "
                f"layer {src}'s {'ids' if out[key][0] == 'same-ids' else 'scores'} "
                f"({other.num_experts} experts, expert count of {'.'.join(other.config_path) or 'config'})",
                params=("mtp_policy",),
            )


def check_protect(protect: dict[str, list[int]], info: ModelInfo) -> dict[str, list[int]]:
    for key, ids in protect.items():
        if key not in info.layer_by_key:
            raise PlanError(
                f"protect: layer {key} is not a MoE layer of the model "
                f"(MoE layers: {span([layer.key for layer in info.layers])})",
                params=("protect",),
            )
        E = info.layer_by_key[key].num_experts
        bad = [i for i in ids if not 0 <= i < E]
        if bad:
            raise PlanError(f"protect: layer {key}: expert ids {bad[:5]} out of range 0..{E - 1}", params=("protect",))
    return protect
