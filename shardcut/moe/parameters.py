"""Parameter counts of a checkpoint from its headers, split so they can be stated for any expert
count (the model card's table, `push`).

Counts are real parameters, not stored words: a packed INT4 word holds 32/bits of them (the
`weight_shape` companion, a few bytes read from the shard, gives the exact unpacked shape), an
MXFP4 / NVFP4 / bitsandbytes 4-bit byte two; scales, zero points and other quantization
companions are none. Fused expert tensors are expert parameters (`inspect`'s tensor groups, from
the architecture table). A pruned checkpoint holds one expert's share of every expert tensor, so
the counts for the original expert count follow exactly without the source: `ParameterCounts.at(E)` for
any E (or one E per layer, for models whose stacks have their own counts, such as Qwen3-Omni's
talker).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from shardcut.format.checkpoint import Checkpoint
from shardcut.moe.model import Copied, ExpertAxisSlice, ModelInfo, Role

_COMPANIONS = (
    ".weight.quant_state.bitsandbytes__nf4",
    ".weight.quant_state.bitsandbytes__fp4",
    ".weight.nested_quant_map",
    ".weight.nested_absmax",
    ".weight.quant_map",
    ".weight.absmax",
    ".weight_scale_inv",
    ".weight_global_scale",
    ".weight_zero_point",
    ".weight_scale_2",
    ".weight_packed",
    ".weight_format",
    ".weight_g_idx",
    ".weight_scale",
    ".weight_shape",
    ".input_global_scale",
    ".input_zero_point",
    ".input_scale",
    ".activation_scale",
    ".qscale_weight",
    ".qscale_act",
    ".qweight",
    ".qzeros",
    ".scales",
    ".g_idx",
    ".SCB",
    ".scale",
    ".weight",
    ".bias",
    "_scale_inv",
    "_blocks",
    "_scales",
    "_bias",
)  # a leading "_" marks companions of fused projections (`gate_up_proj_blocks`)


GROUPS = ("expert", "router", "other")


def split_companion(name: str) -> tuple[str, str]:
    """(module, companion suffix) of a tensor name; a bare fused tensor is its own module.

    Example:
        >>> split_companion("model.layers.3.mlp.experts.7.down_proj.weight_packed")
        ('model.layers.3.mlp.experts.7.down_proj', '.weight_packed')
    """
    for suffix in _COMPANIONS:
        if name.endswith(suffix) and len(name) > len(suffix):
            module = name[: -len(suffix)]
            if suffix.startswith("_") and not module.endswith("proj"):
                continue  # `_blocks`, `_bias`…: only on fused projections (gpt-oss `gate_up_proj_blocks`)
            return module, suffix
    return name, ""


def ct_bits(quant: dict) -> int | None:
    """Bits of a compressed-tensors config's weights (its first config group that says)."""
    for group in (quant.get("config_groups") or {}).values():
        weights = group.get("weights") if isinstance(group, dict) else None
        if isinstance(weights, dict) and weights.get("num_bits"):
            return weights["num_bits"]
    return None


def tensor_group(role: Role) -> str:
    """expert: per-expert and fused expert tensors; router: router rows, selection biases, scales."""
    match role:
        case Copied():
            return "other"
        case ExpertAxisSlice(is_router=True):
            return "router"
        case _:
            return "expert"


@dataclass
class ParameterCounts:
    """Tensor elements and bytes of a checkpoint, split so they can be stated for any expert count.

    base: everything outside the routed experts (attention, embeddings, shared experts, norms).
    expert / router: per MoE layer key, one routed expert's elements (its FFN, fused shares
    included) and its share of the router tensors (rows computed for every token).
    Elements are real parameters (`tensor_parameters`): packed values unpacked, quantization
    companions (scales, zero points, shapes) not counted; bytes are as stored.
    layer_top_k: a layer's own top-k where its stack has one (default `top_k`).
    """

    top_k: int
    base: tuple[int, int]  # (elements, bytes)
    base_active: int  # base elements one token runs through (MTP layers excluded)
    expert: dict[str, tuple[int, int]] = field(default_factory=dict)
    router: dict[str, tuple[int, int]] = field(default_factory=dict)
    mtp: set[str] = field(default_factory=set)
    layer_top_k: dict[str, int] = field(default_factory=dict)

    def at(self, num_experts: int | Mapping[str, int]) -> dict[str, int]:
        """Total and active parameters and tensor bytes with `num_experts` experts per layer
        (one count, or one per MoE layer key).

        Example:
            >>> counts.at({"0": 8, "1": 8, "talker.0": 6, "talker.1": 6})["total"]
        """
        keys = self.expert.keys() | self.router.keys()
        E = {k: num_experts[k] if isinstance(num_experts, Mapping) else num_experts for k in keys}
        per = {
            k: [a + b for a, b in zip(self.expert.get(k, (0, 0)), self.router.get(k, (0, 0)), strict=True)]
            for k in keys
        }
        total = self.base[0] + sum(E[k] * p[0] for k, p in per.items())
        size = self.base[1] + sum(E[k] * p[1] for k, p in per.items())
        active = self.base_active + sum(
            min(self.layer_top_k.get(k, self.top_k), E[k]) * self.expert.get(k, (0, 0))[0]
            + E[k] * self.router.get(k, (0, 0))[0]
            for k in keys
            if k not in self.mtp
        )
        return {"total": total, "active": active, "bytes": size}


def count_parameters(ckpt: Checkpoint, info: ModelInfo) -> ParameterCounts:
    """Split `ckpt`'s parameters (`tensor_parameters`) and bytes into base, per-expert and
    per-router-row shares; fused expert tensors are expert parameters (the tensor groups of
    `inspect`, from the architecture table).

    Example:
        >>> c = count_parameters(open_checkpoint("pruned"), describe(open_checkpoint("pruned")))
        >>> c.at(128)["total"], c.at(64)["total"]
    """

    params = tensor_parameters(ckpt, info)
    mtp_prefixes = tuple(layer.prefix for layer in info.layers if layer.mtp)
    base = [0, 0]
    base_active = 0
    expert: dict[str, list[int]] = {}
    router: dict[str, list[int]] = {}
    for name, (_, t) in ckpt.tensors.items():
        n = params[name]
        role = info.classify(name)
        group = tensor_group(role)
        if isinstance(role, Copied):
            base[0] += n
            base[1] += t.nbytes
            if not (mtp_prefixes and name.startswith(mtp_prefixes)):
                base_active += n
            continue
        acc = (expert if group == "expert" else router).setdefault(role.layer.key, [0, 0])
        acc[0] += n
        acc[1] += t.nbytes
    E = {layer.key: layer.num_experts for layer in info.layers}  # a stack's own count (Qwen3-Omni's talker)
    per = lambda d: {k: (v[0] // E[k], v[1] // E[k]) for k, v in d.items()}  # noqa: E731
    return ParameterCounts(
        info.top_k,
        (base[0], base[1]),
        base_active,
        per(expert),
        per(router),
        {layer.key for layer in info.layers if layer.mtp},
        {layer.key: layer.top_k for layer in info.layers if layer.top_k != info.top_k},
    )


# Companions of a quantized module's weight that are not parameters: scales, zero points,
# group indices, shapes, lookup tables (bitsandbytes), activation scales: every companion but
# the (packed) weights and biases themselves.
_NOT_PARAMETERS = frozenset(_COMPANIONS) - {".weight", ".weight_packed", ".qweight", "_blocks", ".bias", "_bias"}
_FLOAT = ("F64", "F32", "F16", "BF16")


def tensor_parameters(ckpt: Checkpoint, info: ModelInfo) -> dict[str, int]:
    """Tensor name -> the real parameters it holds: its elements in a float module; in a
    quantized one (a module as `inspect` splits names, `summary.split_companion`, holding a
    non-float tensor) its weight unpacked (compressed-tensors `weight_packed` by its
    `weight_shape` companion where that agrees with the packed shape, else 32/bits per int32;
    GPTQ `qweight` 32/bits per int32; MXFP4 `_blocks`, NVFP4 and bitsandbytes 4-bit: two a
    byte; FP8 and int8: one each), its biases as they are, its other companions zero."""

    quant = info.config.get("quantization_config") or info.text_config.get("quantization_config")
    quant = quant if isinstance(quant, dict) else {}
    bits = int(quant.get("bits") or ct_bits(quant) or 4)
    split = {name: split_companion(name) for name in ckpt.tensors}
    modules: dict[str, dict[str, str]] = {}
    for name, (_, t) in ckpt.tensors.items():
        module, suffix = split[name]
        modules.setdefault(module, {})[suffix] = t.dtype
    shapes = _shape_companions(ckpt)
    out = {}
    for name, (_, t) in ckpt.tensors.items():
        n = math.prod(t.shape)
        module, suffix = split[name]
        companions = modules[module]
        if all(d in _FLOAT for d in companions.values()):
            out[name] = n  # a float module: every tensor is parameters (a norm's `.scale` too)
        elif suffix in _NOT_PARAMETERS:
            out[name] = 0
        elif suffix == ".weight_packed":
            out[name] = _packed_parameters(shapes.get(module), t, bits if t.dtype == "I32" else 4)
        elif suffix == ".qweight" or (t.dtype == "I32" and suffix in (".weight", "")):
            out[name] = n * (32 // bits)
        elif t.dtype == "U8" and suffix in (".weight", "", "_blocks"):
            out[name] = n * 2  # two 4-bit values a byte (MXFP4 blocks, NVFP4, bitsandbytes NF4/FP4)
        else:
            out[name] = n
    return out


def _shape_companions(ckpt: Checkpoint) -> dict[str, list[int]]:
    """Module -> the values of its `weight_shape` companion (a few bytes each; every shard opened
    once, read in file order)."""
    import numpy as np

    by_shard: dict = {}
    for name, (shard, t) in ckpt.tensors.items():
        dtype = {"I64": "<i8", "I32": "<i4", "I16": "<i2"}.get(t.dtype)
        if name.endswith(".weight_shape") and dtype and len(t.shape) == 1 and 0 < t.shape[0] <= 8:
            by_shard.setdefault(shard.path, []).append((t.start, t.nbytes, dtype, name.removesuffix(".weight_shape")))
    out = {}
    for path, items in by_shard.items():
        with open(path, "rb") as f:
            for start, size, dtype, module in sorted(items):
                f.seek(start)
                out[module] = [int(x) for x in np.frombuffer(f.read(size), dtype=dtype)]
    return out


def _packed_parameters(shape: list[int] | None, packed, bits: int) -> int:
    """Values a packed tensor holds: its `weight_shape` where that agrees with the packed shape
    (same leading dims, last dim packed into ceil(in / per) words), else every word full."""
    per = (32 if packed.dtype == "I32" else 8) // bits
    guess = math.prod(packed.shape) * per
    if not shape:
        return guess
    full = list(packed.shape[: max(0, len(packed.shape) - len(shape))]) + shape  # fused [E, …], per-expert shape
    if (
        len(full) == len(packed.shape)
        and full[:-1] == list(packed.shape[:-1])
        and -(-full[-1] // per) == packed.shape[-1]
    ):
        return math.prod(full)
    return guess
