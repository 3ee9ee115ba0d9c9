"""What a checkpoint's MoE structure is: its layers, expert count, top-k, routing, and the role
of every tensor. Derived from config.json and tensor names through the architecture table.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TypeGuard

from shardcut.format.checkpoint import CONFIG_NAME, Checkpoint
from shardcut.format.errors import ShardcutError
from shardcut.moe.architectures import Architecture, Stack, find_architecture, supported_model_types
from shardcut.moe.config_check import check_config
from shardcut.moe.roles import (  # noqa: F401 (the roles are imported from here too)
    COPIED,
    Copied,
    ExpertAxisSlice,
    ExpertTensor,
    MoELayer,
    Role,
)

_EXPERT_SEGMENT = re.compile(r"(?:^|\.)experts(?:\.|$)")


def sub_config(config: dict, path: tuple[str, ...]) -> dict:
    """The config node at `path` (`("text_config",)`), or the deepest existing node on the way."""
    node = config
    for key in path:
        child = node.get(key)
        if not isinstance(child, dict):
            return config if node is config else node
        node = child
    return node


@dataclass
class ModelInfo:
    """The MoE facts of a checkpoint that planning, rewriting and verifying rely on.

    num_experts / top_k / text_config are the main stack's; a layer's own are on the layer.
    """

    arch: Architecture
    config: dict
    text_config: dict
    layers: list[MoELayer]
    num_experts: int
    top_k: int
    n_group: int
    topk_group: int

    @property
    def grouped(self) -> bool:
        return self.n_group > 1

    @cached_property
    def layer_by_key(self) -> dict[str, MoELayer]:
        return {layer.key: layer for layer in self.layers}

    @cached_property
    def _patterns(self) -> list[tuple[int, re.Pattern]]:
        out = []
        for s_idx, stack in enumerate(self.arch.stacks):
            alt = "|".join(re.escape(p) for p in stack.layer_prefixes)
            out.append((s_idx, re.compile(rf"^(?:{alt})\.(\d+)\.(.+)$")))
        return out

    @cached_property
    def _layer_at(self) -> dict[tuple[int, str], MoELayer]:
        index = {id(stack): i for i, stack in enumerate(self.arch.stacks)}
        return {(index[id(layer.stack)], layer.prefix): layer for layer in self.layers}

    @cached_property
    def _siblings(self) -> dict[str, tuple[MoELayer, ...]]:
        """Layer prefix -> the MoE layers sharing it, by `expert_block` (one unless halves)."""
        out: dict[str, list[MoELayer]] = {}
        for layer in sorted(self.layers, key=lambda x: x.stack.expert_block):
            out.setdefault(layer.prefix, []).append(layer)
        return {prefix: tuple(layers) for prefix, layers in out.items()}

    def _layer_of(self, name: str) -> Iterator[tuple[MoELayer, str]]:
        """(MoE layer, rest of the name) for each stack whose MoE layer `name` lies in."""
        for s_idx, pattern in self._patterns:
            m = pattern.match(name)
            if m:
                rest = m.group(2)
                layer = self._layer_at.get((s_idx, name[: len(name) - len(rest)]))
                if layer is not None:  # else a dense layer of this stack
                    yield layer, rest

    def classify(self, name: str) -> Role:
        """The role of tensor `name`; raises for an expert-looking tensor the table does not know."""
        for layer, rest in self._layer_of(name):
            role = self._role_in(layer, rest)
            if role is not None:
                return role
        if _EXPERT_SEGMENT.search(name):
            raise ShardcutError(
                f"tensor {name!r} looks like an expert tensor of a layout the {self.arch.name!r} "
                "table entry does not describe"
            )
        return COPIED

    def expert_of(self, module: str) -> ExpertTensor | None:
        """The expert a per-expert module or tensor name belongs to (`suffix` may be empty:
        `…experts.7`), or None for anything else; never raises (quantization configs name
        modules the table need not know)."""
        for layer, rest in self._layer_of(module):
            experts = layer.stack.experts
            if experts and rest.startswith(experts + "."):
                head, _, suffix = rest[len(experts) + 1 :].partition(".")
                if head.isdigit():
                    owner, local = self._owner(layer, int(head))
                    return ExpertTensor(owner, local, suffix)
        return None

    def _role_in(self, layer: MoELayer, rest: str) -> Role | None:
        stack, E = layer.stack, layer.num_experts
        if rest in stack.expert_rows:
            return ExpertAxisSlice(layer, axis=0, blocks=E + layer.zero_experts, is_router=True)
        if rest in stack.expert_cols:
            return ExpertAxisSlice(layer, axis=1, blocks=E + layer.zero_experts, is_router=True)
        if rest in stack.block_cols:
            rows = self._siblings[layer.prefix]
            return ExpertAxisSlice(rows[0], axis=1, blocks=E, is_router=True, rows=rows)
        if any(rest.startswith(f + ".") for f in stack.fused):
            return ExpertAxisSlice(layer, axis=0, blocks=E, is_router=False)
        if stack.experts and rest.startswith(stack.experts + "."):
            head, _, suffix = rest[len(stack.experts) + 1 :].partition(".")
            if head.isdigit() and suffix:
                owner, local = self._owner(layer, int(head))
                return ExpertTensor(owner, local, suffix)
            if not head.isdigit():
                return ExpertAxisSlice(layer, axis=0, blocks=E, is_router=False)  # fused [E, ...] tensor
        return None

    def _owner(self, layer: MoELayer, expert: int) -> tuple[MoELayer, int]:
        """The layer owning ModuleList entry `expert`, and its id within that layer's stack."""
        siblings = self._siblings[layer.prefix]
        if len(siblings) > 1:
            block = expert // layer.num_experts
            for sib in siblings:
                if sib.stack.expert_block == block and sib.stack.experts == layer.stack.experts:
                    return sib, expert - block * layer.num_experts
        return layer, expert

    def new_expert_id(self, layer: MoELayer, expert: int, keep: Mapping[str, list[int]]) -> int | None:
        """The id expert `expert` of `layer` gets in the pruned ModuleList (None when pruned).

        Example:
            >>> info.new_expert_id(info.layer_by_key["3"], 7, {"3": [2, 7, 9]})
            1
        """
        try:
            position = keep[layer.key].index(expert)
        except ValueError:
            return None
        before = [s for s in self._siblings[layer.prefix] if s.stack.expert_block < layer.stack.expert_block]
        return sum(len(keep[s.key]) for s in before) + position

    def kept_blocks(self, role: ExpertAxisSlice, keep: Mapping[str, list[int]]) -> list[int] | list[list[int]]:
        """The blocks of a sliced tensor that stay, in output order: the kept experts, then any
        zero-computation rows; for a tensor with `rows`, one such list per row."""
        if role.rows:
            return [list(keep[layer.key]) for layer in role.rows]
        zero = range(role.layer.num_experts, role.blocks)
        return list(keep[role.layer.key]) + list(zero)

    def layers_by_config(self) -> dict[tuple[str, ...], list[MoELayer]]:
        """MoE layers by the config node holding their expert count (each keeps one count)."""
        out: dict[tuple[str, ...], list[MoELayer]] = {}
        for layer in self.layers:
            out.setdefault(layer.config_path, []).append(layer)
        return out

    def expert_name(self, layer: MoELayer, expert: int, suffix: str) -> str:
        """The name of expert `expert`'s tensor (or module, when `suffix` is empty) in `layer`."""
        return f"{layer.prefix}{layer.stack.experts}.{expert}" + (f".{suffix}" if suffix else "")

    def summary(self) -> dict:
        out = {
            "architecture": self.arch.name,
            "model_type": self.config.get("model_type"),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "scoring": self.arch.scoring,
            "moe_layers": [layer.key for layer in self.layers],
            "mtp_layers": [layer.key for layer in self.layers if layer.mtp],
        }
        counts = {".".join(path) or "config": group[0].num_experts for path, group in self.layers_by_config().items()}
        if len(counts) > 1:
            out["num_experts_by_config"] = counts
        return out


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _first_int(
    cfg: dict, keys: tuple[str, ...], what: str, arch: Architecture, element: int = 0, largest: bool = False
) -> int:
    """The first integer among `keys`; a list of integers gives its `element` entry (ERNIE-VL's
    `[text, vision]` counts) or, with `largest`, its maximum (per-layer top-k lists)."""
    for key in keys:
        value = cfg.get(key)
        if _is_int(value):
            return value
        if isinstance(value, list) and value and all(_is_int(v) for v in value):
            return max(value) if largest else value[min(element, len(value) - 1)]
    raise ShardcutError(f"{arch.name} config has no integer {what} (looked for {', '.join(keys)})", CONFIG_NAME)


def _layer_count(config: dict, path: tuple[str, ...], arch: Architecture) -> int:
    """The decoder layer count, from the sub-config at `path` or the nearest parent holding it."""
    for depth in range(len(path), -1, -1):
        node = sub_config(config, path[:depth])
        for key in arch.layer_count_keys:
            value = node.get(key)
            if _is_int(value):
                return value
            if isinstance(value, (list, str)) and value:  # a per-layer list or pattern: its length
                return len(value)
    raise ShardcutError(
        f"{arch.name} config has no integer layer count (looked for {', '.join(arch.layer_count_keys)})", CONFIG_NAME
    )


def _group_value(cfg: dict, spellings: str | tuple[str, ...]) -> int:
    for key in (spellings,) if isinstance(spellings, str) else spellings:
        if cfg.get(key) is not None:
            return int(cfg[key] or 1)
    return 1


@dataclass(frozen=True)
class _StackCounts:
    path: tuple[str, ...]
    cfg: dict
    num_experts: int
    top_k: int
    num_hidden: int
    zero_experts: int


def _stack_counts(config: dict, arch: Architecture, stack: Stack) -> _StackCounts:
    path = arch.config_path if stack.config_path is None else stack.config_path
    cfg = sub_config(config, path)
    E = _first_int(cfg, arch.expert_keys, "expert count", arch, element=stack.expert_block)
    top_k = _first_int(cfg, arch.top_k_keys, "top-k", arch, largest=True)
    zero = cfg.get(stack.zero_experts_key) if stack.zero_experts_key else 0
    return _StackCounts(path, cfg, E, top_k, _layer_count(config, path, arch), zero if _is_int(zero) else 0)


def describe(ckpt: Checkpoint) -> ModelInfo:
    """Derive the MoE structure of a checkpoint from its config and tensor names.

    Example:
        >>> info = describe(open_checkpoint("DeepSeek-V3"))
        >>> info.num_experts, info.top_k, info.n_group, info.layers[0].key
        (256, 8, 8, '3')
    """
    config = ckpt.config
    cfg_file = ckpt.root / CONFIG_NAME
    check_config(config, cfg_file, ckpt.tensors)  # every field read below: type, range, the embedding's shape
    arch = find_architecture(config)
    if arch is None:
        raise ShardcutError(
            f"unsupported architecture model_type={config.get('model_type')!r}; "
            f"supported: {', '.join(supported_model_types())}",
            cfg_file,
        )
    if arch.unsupported:
        raise ShardcutError(f"cannot prune {arch.name}: {arch.unsupported}", cfg_file)
    try:
        main = _stack_counts(config, arch, arch.stacks[0])
        layers = _find_layers(ckpt, arch, main, cfg_file)
    except ShardcutError as exc:
        if exc.path != CONFIG_NAME:
            raise
        raise ShardcutError(str(exc).removeprefix(f"{CONFIG_NAME}: "), cfg_file) from None
    text = main.cfg
    n_group = topk_group = 1
    if arch.group_keys and (arch.grouped_when is None or text.get("topk_method") in arch.grouped_when):
        n_group = _group_value(text, arch.group_keys[0])
        topk_group = _group_value(text, arch.group_keys[1])
    return ModelInfo(arch, config, text, layers, main.num_experts, main.top_k, n_group, topk_group)


def _find_layers(ckpt: Checkpoint, arch: Architecture, main: _StackCounts, cfg_file) -> list[MoELayer]:
    """MoE layers are those whose marker tensor (the stack's router) exists; each rule-following
    stack's layers below its num_hidden_layers must match its config's rule exactly."""
    found: dict[tuple[int, int], MoELayer] = {}
    for s_idx, stack in enumerate(arch.stacks):
        hits: list[tuple[str, int]] = []
        for prefix in stack.layer_prefixes:
            pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.{re.escape(stack.marker)}$")
            hits += [(prefix, int(m.group(1))) for name in ckpt.tensors if (m := pattern.match(name))]
        if not hits and s_idx > 0:
            continue  # an optional stack (MTP, a talker) this checkpoint does not have
        counts = main if s_idx == 0 else _stack_counts(ckpt.config, arch, stack)
        for prefix, idx in hits:
            if (s_idx, idx) in found:
                continue
            mtp = stack.follows_rule and idx >= counts.num_hidden or not stack.follows_rule
            key = f"{stack.plan_prefix}{idx}"
            found[(s_idx, idx)] = MoELayer(
                key,
                idx,
                f"{prefix}.{idx}.",
                stack,
                mtp,
                counts.num_experts,
                counts.top_k,
                counts.zero_experts,
                counts.path,
            )
        if stack.follows_rule:
            _check_mtp_count(
                ckpt.config,
                stack,
                counts,
                sorted(i for (s, i), layer in found.items() if s == s_idx and layer.mtp),
                cfg_file,
            )
            _check_rule(
                arch, stack, counts, {i for (s, i), layer in found.items() if s == s_idx and not layer.mtp}, cfg_file
            )
    layers = [found[k] for k in sorted(found)]
    if not layers:
        raise ShardcutError(f"no MoE layers found for architecture {arch.name}", cfg_file)
    _check_counts(ckpt, arch, layers, cfg_file)
    dup = [k for k, n in Counter(layer.key for layer in layers).items() if n > 1]
    if dup:
        raise ShardcutError(f"MoE layer key {dup[0]!r} appears twice", cfg_file)
    for layer in layers:
        for rel, reason in layer.stack.unprunable:
            if layer.prefix + rel in ckpt.tensors:
                raise ShardcutError(f"cannot prune {arch.name}: MoE layer {layer.key} {reason}", cfg_file)
    return layers


_MTP_COUNT_KEYS = ("num_nextn_predict_layers", "num_mtp_modules")
# `<layer prefix ending in its index>.<path>.<expert id>.` of a per-expert tensor name
_EXPERT_ID = re.compile(r"^(.+?\.\d+\..+?\.)(\d+)\.")


def _count_field(config: dict, path: tuple[str, ...], keys: tuple[str, ...]) -> str:
    """The dotted config field an expert count or top-k was read from, for messages."""
    node = sub_config(config, path)
    where = next((".".join(path[:i]) for i in range(len(path), 0, -1) if sub_config(config, path[:i]) is node), "")
    key = next((k for k in keys if _is_int(node.get(k)) or isinstance(node.get(k), list)), keys[0])
    return f"{where}.{key}" if where else key


def _check_counts(ckpt: Checkpoint, arch: Architecture, layers: list[MoELayer], cfg_file) -> None:
    """The config's counts must be what the tensors say: an expert count that merely divides the
    real one (gpt-oss 4 for 8) would otherwise slice fused tensors into blocks of two experts
    and write a checkpoint contradicting its own config."""
    for layer in layers:
        E, k, zero, stack = layer.num_experts, layer.top_k, layer.zero_experts, layer.stack
        field = _count_field(ckpt.config, layer.config_path, arch.expert_keys)
        if E < 1:
            raise ShardcutError(f"{field} = {E}: a MoE layer needs at least one expert", cfg_file)
        if not 1 <= k <= E + zero:
            raise ShardcutError(
                f"{_count_field(ckpt.config, layer.config_path, arch.top_k_keys)} = {k}: top-k must "
                f"be in [1, {E + zero}] (the experts of layer {layer.key})",
                cfg_file,
            )
        name = layer.prefix + stack.marker
        found = ckpt.tensors.get(name)
        axis = 0 if stack.marker in stack.expert_rows else 1
        if found is None or found[1].dtype not in _FLOAT_DTYPES or len(found[1].shape) <= axis:
            continue  # a packed (quantized) router does not show its rows
        rows = found[1].shape[axis]
        if rows != E + zero:
            said = f"{E} (+ {zero} zero-computation)" if zero else str(E)
            raise ShardcutError(
                f"{field} = {said} but layer {layer.key}'s router {name} has {rows} expert "
                f"{'rows' if axis == 0 else 'columns'} (shape {list(found[1].shape)})",
                cfg_file,
            )
    expected: dict[str, tuple[int, MoELayer]] = {}
    for layer in layers:
        if layer.stack.experts:
            prefix = f"{layer.prefix}{layer.stack.experts}."
            n, first = expected.get(prefix, (0, layer))
            expected[prefix] = (n + layer.num_experts, first)  # halves sharing one ModuleList add up
    ids: dict[str, set[int]] = {}
    for tname in ckpt.tensors:
        m = _EXPERT_ID.match(tname)
        if m and m.group(1) in expected:
            ids.setdefault(m.group(1), set()).add(int(m.group(2)))
    for prefix, present in ids.items():
        n, layer = expected[prefix]
        if present != set(range(n)):
            field = _count_field(ckpt.config, layer.config_path, arch.expert_keys)
            raise ShardcutError(
                f"{field} = {layer.num_experts} but layer {layer.key} holds expert ids "
                f"{min(present)}..{max(present)} ({len(present)} experts) under {prefix}",
                cfg_file,
            )


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def _check_mtp_count(config: dict, stack: Stack, counts: _StackCounts, extra: list[int], cfg_file) -> None:
    """Layers at num_hidden_layers + i are MTP layers only when the config says it has MTP layers;
    otherwise num_hidden_layers is smaller than the layers the checkpoint holds."""
    if not extra:
        return
    found = [v for node in (counts.cfg, config) for k in _MTP_COUNT_KEYS if _is_int(v := node.get(k))]
    declared = found[0] if found else 0
    if len(extra) > declared:
        where = f"{stack.plan_prefix.rstrip('.')} " if stack.plan_prefix else ""
        raise ShardcutError(
            f"num_hidden_layers = {counts.num_hidden} but the checkpoint has {where}MoE layers "
            f"{extra[:5]} beyond it, more than the {declared} MTP layer(s) the config declares "
            f"({' / '.join(_MTP_COUNT_KEYS)})",
            cfg_file,
        )


def _check_rule(arch: Architecture, stack: Stack, counts: _StackCounts, present: set[int], cfg_file) -> None:
    expected = {i for i in range(counts.num_hidden) if arch.moe_rule(counts.cfg, i)}
    if present == expected:
        return
    missing, extra = sorted(expected - present), sorted(present - expected)
    where = f"{stack.plan_prefix.rstrip('.')} " if stack.plan_prefix else ""
    detail = []
    if missing:
        detail.append(f"config makes {where}layers {missing[:5]} MoE but the checkpoint has no router there")
    if extra:
        detail.append(f"{where}layers {extra[:5]} have a router but the config says they are dense")
    raise ShardcutError("; ".join(detail), cfg_file)


@dataclass
class CountGroup:
    """MoE layers sharing one config expert count, and the routing facts of that count.

    name: the config node holding the count, as `inspect --json`'s `num_experts_by_config`
    names it ("thinker_config.text_config"; "config" for the top level). Grouped routing
    (n_group > 1) belongs to the main stack's group only, as `validate_plan` checks it.
    """

    name: str
    layers: list[MoELayer]
    num_experts: int
    top_k: int
    n_group: int = 1
    topk_group: int = 1


def count_groups(info: ModelInfo) -> list[CountGroup]:
    """The model's count groups, the main stack's first (one group for most models).

    Example:
        >>> [(g.name, g.num_experts) for g in count_groups(describe(open_checkpoint("tiny-qwen3-omni")))]
        [('thinker_config.text_config', 8), ('talker_config.text_config', 6)]
    """
    main = info.layers[0].config_path
    return [
        CountGroup(
            ".".join(path) or "config",
            layers,
            layers[0].num_experts,
            layers[0].top_k,
            *((info.n_group, info.topk_group) if path == main else (1, 1)),
        )
        for path, layers in info.layers_by_config().items()
    ]


def experts_by_config(info: ModelInfo, keep: dict[str, list[int]]) -> dict[str, list[int]]:
    """`{count group: [experts before, kept]}` for a model with several expert counts; `{}` for one.

    Example:
        >>> experts_by_config(info, plan.keep)
        {'thinker_config.text_config': [8, 4], 'talker_config.text_config': [6, 3]}
    """
    groups = count_groups(info)
    if len(groups) < 2:
        return {}
    return {g.name: [g.num_experts, len(keep[g.layers[0].key])] for g in groups if g.layers[0].key in keep}
