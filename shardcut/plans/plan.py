"""The plan (`shardcut-plan/1`): which experts each MoE layer keeps, and its validation
against a model's routing constraints (DESIGN.md, "Routing constraints a plan must satisfy").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from shardcut.format.errors import PlanError
from shardcut.format.text import span
from shardcut.moe.model import ModelInfo
from shardcut.plans.keys import PLAN_KEY_RULE, is_plan_key

PLAN_FORMAT = "shardcut-plan/1"


@dataclass
class Plan:
    """Kept expert ids per MoE layer (plan key -> ascending original ids), plus provenance.

    The new id of an expert is its position in its layer's list.

    Example:
        >>> plan = Plan({"1": [0, 2, 3, 7], "2": [1, 2, 5, 6]})
        >>> plan.save("plan.json")
    """

    keep: dict[str, list[int]]
    extra: dict = field(default_factory=dict)
    origin: str = field(default="plan", compare=False)  # the file it came from, for messages

    @property
    def num_experts(self) -> int:
        """Experts every layer keeps; where stacks keep their own counts (Qwen3-Omni's talker),
        the main stack's, whose keys are bare layer numbers (as `inspect`'s `num_experts`);
        -1 when even those disagree (a plan `validate_plan` refuses).

        Example:
            >>> Plan({"0": [1, 2, 5, 7], "talker.0": [0, 2, 3]}).num_experts
            4
        """
        counts = {len(v) for v in self.keep.values()}
        if len(counts) != 1:
            counts = {len(v) for k, v in self.keep.items() if k.isdigit()}
        return counts.pop() if len(counts) == 1 else -1

    def to_json(self) -> dict:
        """The plan file's JSON: `num_experts` (see the property) unless undefined, then `extra`
        (provenance; `make_plan` adds `num_experts_by_config` for several expert counts)."""
        body: dict[str, object] = {"format": PLAN_FORMAT, "keep": {k: list(v) for k, v in self.keep.items()}}
        if self.keep and self.num_experts >= 0:
            body["num_experts"] = self.num_experts
        for k, v in self.extra.items():
            if k not in body:
                body[k] = v
        return body

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    def sha256(self) -> str:
        return hashlib.sha256(self.dumps().encode()).hexdigest()

    def save(self, path: str | Path) -> None:
        """Write the plan atomically and durably (temp file, fsync, rename, fsync of the folder).
        It replaces `path`; `make_plan(out=...)` is the call that refuses to overwrite inputs."""
        from shardcut.format.durable import atomic_write_text

        atomic_write_text(path, self.dumps())

    @classmethod
    def from_json(cls, data: object, source: str | Path = "plan") -> Plan:
        if not isinstance(data, dict):
            raise PlanError("a plan must be a JSON object", source)
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(f"format must be {PLAN_FORMAT!r}, got {data.get('format')!r}", source)
        keep = data.get("keep")
        if not isinstance(keep, dict) or not keep:
            raise PlanError("'keep' must be a non-empty object mapping layer keys to expert id lists", source)
        parsed: dict[str, list[int]] = {}
        for key, ids in keep.items():
            if not is_plan_key(key):
                raise PlanError(f"layer key {key[:40]!r} {PLAN_KEY_RULE}", source)
            if not isinstance(ids, list) or not all(type(i) is int for i in ids):
                raise PlanError(f"layer {key}: kept experts must be a list of integers", source)
            parsed[str(key)] = ids
        extra = {k: v for k, v in data.items() if k not in ("format", "keep")}
        return cls(parsed, extra, str(source))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        try:
            from shardcut.format.checkpoint import read_regular_file  # by stat: a FIFO is never opened

            data = json.loads(read_regular_file(path).decode("utf-8"))
        except FileNotFoundError:
            raise PlanError("file not found", path) from None
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise PlanError(f"not valid JSON ({type(exc).__name__})", path) from None
        return cls.from_json(data, path)


def check_replaceable_plan(out: str | Path) -> None:
    """An existing plan output is replaced (with overwrite) only when it is a plan file itself,
    never another file (a config.json or a shard of a model the planner was not given)."""
    out = Path(out)
    if not out.exists():
        return
    try:
        ok = (
            out.is_file() and out.stat().st_size < 1 << 30 and json.loads(out.read_bytes()).get("format") == PLAN_FORMAT
        )
    except (OSError, ValueError, AttributeError, RecursionError):
        ok = False
    if not ok:
        from shardcut.format.errors import OutputError

        raise OutputError(f"exists and is not a {PLAN_FORMAT} file: refusing to replace it, even with overwrite", out)


def validate_plan(plan: Plan, info: ModelInfo, source: str | Path = "plan") -> None:
    """Refuse a plan that the model's routing cannot run; the message names layer and rule.

    Checks: every MoE layer (MTP included) present and no others; ids unique, in range and
    ascending; one count for all layers sharing a config count (stacks with their own config,
    such as Qwen3-Omni's talker, have their own); top_k <= E'; for grouped routing, the same
    number kept in every group, >= 2 per group, and topk_group * E'/n_group >= top_k.
    """
    expected = [layer.key for layer in info.layers]
    for key in expected:
        if key not in plan.keep:
            raise PlanError(f"layer {key} is a MoE layer of the model but the plan does not list it", source)
    for key in plan.keep:
        if key not in info.layer_by_key:
            raise PlanError(f"layer {key} is not a MoE layer of the model (MoE layers: {span(expected)})", source)
    for layer in info.layers:
        ids, key, E = plan.keep[layer.key], layer.key, layer.num_experts
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise PlanError(f"layer {key}: duplicate expert ids {dup[:5]}", source)
        bad = [i for i in ids if not 0 <= i < E]
        if bad:
            raise PlanError(f"layer {key}: expert ids {bad[:5]} out of range 0..{E - 1}", source)
        if ids != sorted(ids):
            raise PlanError(f"layer {key}: kept expert ids must be ascending", source)
    for path, layers in info.layers_by_config().items():
        counts: dict[int, str] = {}
        for layer in layers:
            counts.setdefault(len(plan.keep[layer.key]), layer.key)
        if len(counts) > 1:
            (n1, k1), (n2, k2) = list(counts.items())[:2]
            where = f" ({'.'.join(path)})" if len(info.layers_by_config()) > 1 else ""
            raise PlanError(
                f"unequal counts: layer {k1} keeps {n1} experts, layer {k2} keeps {n2} "
                f"(one expert count per config{where}: "
                "every MoE layer sharing it must keep the same number)",
                source,
            )
        kept = next(iter(counts))
        if kept < layers[0].top_k:
            raise PlanError(
                f"layer {layers[0].key}: keeps {kept} expert{'s' if kept != 1 else ''}, "
                f"fewer than top_k={layers[0].top_k}",
                source,
            )
    if info.arch.top_k_exact and info.top_k != info.arch.top_k_exact:
        raise PlanError(f"{info.arch.name} needs top_k == {info.arch.top_k_exact}", source)
    if info.grouped:
        main = info.layers_by_config()[info.layers[0].config_path]
        _validate_groups(
            Plan({layer.key: plan.keep[layer.key] for layer in main}), info, len(plan.keep[main[0].key]), source
        )


def _validate_groups(plan: Plan, info: ModelInfo, kept: int, source) -> None:
    G, E = info.n_group, info.num_experts
    if E % G:
        raise PlanError(f"n_group={G} does not divide num_experts={E}", source)
    size = E // G
    if kept % G:
        raise PlanError(f"grouped routing: {kept} kept experts cannot split evenly over n_group={G}", source)
    per = kept // G
    for key, ids in plan.keep.items():
        in_group = [sum(1 for i in ids if i // size == g) for g in range(G)]
        if len(set(in_group)) != 1:
            raise PlanError(
                f"layer {key}: not group-balanced (kept per group {in_group}); grouped routing with "
                f"n_group={G} needs the same number kept in every group",
                source,
            )
    if per < 2:
        raise PlanError(f"grouped routing: {per} expert(s) kept per group, at least 2 needed", source)
    if info.topk_group * per < info.top_k:
        raise PlanError(f"grouped routing: topk_group={info.topk_group} x {per} per group < top_k={info.top_k}", source)
