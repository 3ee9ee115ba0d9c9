"""What a checkpoint's MoE structure is: its layers, expert count, top-k, routing, and the role
of every tensor. Derived from config.json and tensor names through the architecture table.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

from shardcut.architectures import Architecture, Stack, find_architecture, supported_model_types
from shardcut.checkpoint import CONFIG_NAME, Checkpoint
from shardcut.errors import ShardcutError

_EXPERT_SEGMENT = re.compile(r"(?:^|\.)experts(?:\.|$)")


@dataclass(frozen=True)
class MoELayer:
    """One MoE block: its plan key, the tensor-name prefix of its layer, and whether it is MTP."""

    key: str
    index: int
    prefix: str  # e.g. "model.layers.3."
    stack: Stack
    mtp: bool


@dataclass(frozen=True)
class Role:
    """What the rewrite does with one tensor.

    kind: "copy" (unchanged), "expert" (belongs to expert `expert` of `layer`: dropped or
    renamed), or "slice" (one block per expert along `axis`, sliced to the kept experts).
    """

    kind: str
    layer: MoELayer | None = None
    expert: int = -1
    suffix: str = ""
    axis: int = 0


COPY = Role("copy")


def _sub_config(config: dict, path: tuple[str, ...]) -> dict:
    node = config
    for key in path:
        child = node.get(key)
        if not isinstance(child, dict):
            return config if node is config else node
        node = child
    return node


@dataclass
class ModelInfo:
    """The MoE facts of a checkpoint that planning, rewriting and verifying rely on."""

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
    def _patterns(self) -> list[tuple[Stack, re.Pattern]]:
        out = []
        for stack in self.arch.stacks:
            alt = "|".join(re.escape(p) for p in stack.layer_prefixes)
            out.append((stack, re.compile(rf"^(?:{alt})\.(\d+)\.(.+)$")))
        return out

    @cached_property
    def _by_prefix(self) -> dict[str, MoELayer]:
        return {layer.prefix: layer for layer in self.layers}

    def classify(self, name: str) -> Role:
        """The role of tensor `name`; raises for an expert-looking tensor the table does not know."""
        for stack, pattern in self._patterns:
            m = pattern.match(name)
            if not m:
                continue
            rest = m.group(2)
            layer = self._by_prefix.get(name[: len(name) - len(rest)])
            if layer is None:
                break  # a dense layer of this stack
            if rest in stack.expert_rows:
                return Role("slice", layer, axis=0)
            if rest in stack.expert_cols:
                return Role("slice", layer, axis=1)
            if stack.experts and rest.startswith(stack.experts + "."):
                tail = rest[len(stack.experts) + 1 :]
                head, _, suffix = tail.partition(".")
                if head.isdigit() and suffix:
                    return Role("expert", layer, expert=int(head), suffix=suffix)
                if not head.isdigit():
                    return Role("slice", layer, axis=0)  # fused [E, ...] tensor
            break
        if _EXPERT_SEGMENT.search(name):
            raise ShardcutError(
                f"tensor {name!r} looks like an expert tensor of a layout the {self.arch.name!r} "
                "table entry does not describe"
            )
        return COPY

    def expert_name(self, layer: MoELayer, expert: int, suffix: str) -> str:
        return f"{layer.prefix}{layer.stack.experts}.{expert}.{suffix}"

    def summary(self) -> dict:
        return {
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


def _first_int(cfg: dict, keys: tuple[str, ...], what: str, arch: Architecture) -> int:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ShardcutError(f"{arch.name} config has no integer {what} (looked for {', '.join(keys)})", CONFIG_NAME)


def describe(ckpt: Checkpoint) -> ModelInfo:
    """Derive the MoE structure of a checkpoint from its config and tensor names.

    Example:
        >>> info = describe(open_checkpoint("DeepSeek-V3"))
        >>> info.num_experts, info.top_k, info.n_group, info.layers[0].key
        (256, 8, 8, '3')
    """
    config = ckpt.config
    cfg_file = ckpt.root / CONFIG_NAME
    arch = find_architecture(config)
    if arch is None:
        raise ShardcutError(
            f"unsupported architecture model_type={config.get('model_type')!r}; "
            f"supported: {', '.join(supported_model_types())}",
            cfg_file,
        )
    text = _sub_config(config, arch.config_path)
    try:
        num_experts = _first_int(text, arch.expert_keys, "expert count", arch)
        top_k = _first_int(text, arch.top_k_keys, "top-k", arch)
        num_hidden = _first_int(text, ("num_hidden_layers", "n_layers"), "layer count", arch)
    except ShardcutError as exc:
        raise ShardcutError(str(exc).removeprefix(f"{CONFIG_NAME}: "), cfg_file) from None
    n_group = topk_group = 1
    if arch.group_keys and (arch.grouped_when is None or text.get("topk_method") in arch.grouped_when):
        n_group = int(text.get(arch.group_keys[0]) or 1)
        topk_group = int(text.get(arch.group_keys[1]) or 1)

    layers = _find_layers(ckpt, arch, text, num_hidden, cfg_file)
    return ModelInfo(arch, config, text, layers, num_experts, top_k, n_group, topk_group)


def _find_layers(ckpt: Checkpoint, arch: Architecture, text: dict, num_hidden: int, cfg_file) -> list[MoELayer]:
    """MoE layers are those whose marker tensor (the first of `expert_rows`) exists; the main
    stack's layers below num_hidden_layers must match the config's rule exactly."""
    found: dict[tuple[int, int], MoELayer] = {}
    for s_idx, stack in enumerate(arch.stacks):
        marker = stack.expert_rows[0]
        for prefix in stack.layer_prefixes:
            pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.{re.escape(marker)}$")
            for name in ckpt.tensors:
                m = pattern.match(name)
                if not m:
                    continue
                idx = int(m.group(1))
                if (s_idx, idx) in found:
                    continue
                mtp = stack.follows_rule and idx >= num_hidden or not stack.follows_rule
                key = f"{stack.plan_prefix}{idx}"
                found[(s_idx, idx)] = MoELayer(key, idx, f"{prefix}.{idx}.", stack, mtp)
    layers = [found[k] for k in sorted(found)]
    main = {layer.index for layer in layers if layer.stack.follows_rule and not layer.mtp}
    expected = {i for i in range(num_hidden) if arch.moe_rule(text, i)}
    if main != expected:
        missing, extra = sorted(expected - main), sorted(main - expected)
        detail = []
        if missing:
            detail.append(f"config makes layers {missing[:5]} MoE but the checkpoint has no router there")
        if extra:
            detail.append(f"layers {extra[:5]} have a router but the config says they are dense")
        raise ShardcutError("; ".join(detail), cfg_file)
    if not layers:
        raise ShardcutError(f"no MoE layers found for architecture {arch.name}", cfg_file)
    dup = [k for k, n in Counter(layer.key for layer in layers).items() if n > 1]
    if dup:
        raise ShardcutError(f"MoE layer key {dup[0]!r} appears twice", cfg_file)
    return layers
