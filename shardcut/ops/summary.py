"""`inspect`: what a checkpoint is, from its config and shard headers only.

Besides the MoE structure it reports, per tensor group (experts, routers, everything else), the
quantization scheme the stored tensors are in (recognised from their companion suffixes and
dtypes, e.g. `weight` F8_E4M3 + `weight_scale_inv` is FP8 block), and the bytes pruning saves for
every expert removed, per layer and in total.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from shardcut.moe.model import Copied, ExpertAxisSlice, ExpertTensor, ModelInfo, describe
from shardcut.moe.parameters import GROUPS, ct_bits, split_companion, tensor_group


# Tensor-name endings that belong to one quantized Linear (longest first): the module is the rest.
def scheme_of(suffixes: dict[str, str], quant: dict) -> str:
    """The quantization scheme of one module from its companions (suffix -> dtype) and the config."""
    s = set(suffixes)
    main = suffixes.get(".weight") or suffixes.get("") or next(iter(suffixes.values()))
    bits = quant.get("bits") or ct_bits(quant)
    if "_blocks" in s:
        return "mxfp4"
    if ".qweight" in s:
        method = quant.get("quant_method") if quant.get("quant_method") in ("gptq", "awq") else "gptq/awq"
        return f"{method} int{bits or 4}"
    if ".weight.absmax" in s:
        return "bitsandbytes " + ("fp4" if ".weight.quant_state.bitsandbytes__fp4" in s else "nf4")
    if ".SCB" in s:
        return "bitsandbytes int8"
    if ".weight_packed" in s:
        if suffixes[".weight_packed"] == "I32":
            return f"int{bits or '?'} pack-quantized"
        return "nvfp4" if ".weight_global_scale" in s else "mxfp4 (compressed-tensors)"
    if ".weight_scale_inv" in s or "_scale_inv" in s or (".scale" in s and main.startswith("F8")):
        block = quant.get("weight_block_size")
        return "fp8 block" + (f" {list(block)}" if block else "")
    if ".weight_scale_2" in s:
        return "nvfp4 (modelopt)"
    if ".weight_scale" in s:
        return {"F8_E4M3": "fp8", "I8": "int8"}.get(main, f"{main.lower()} scaled")
    return main.lower()


def quantization_groups(info: ModelInfo, tensors: dict, quant: dict) -> dict:
    """Per group (expert / router / other): schemes with their module counts, and the companion
    suffixes with their dtypes and bytes."""
    modules: dict[str, dict[str, str]] = defaultdict(dict)
    group_of: dict[str, str] = {}
    out: dict[str, dict[str, Any]] = {
        g: {"tensors": 0, "bytes": 0, "schemes": Counter(), "companions": {}} for g in GROUPS
    }
    for name, (_, t) in tensors.items():
        group = tensor_group(info.classify(name))
        module, suffix = split_companion(name)
        modules[module][suffix] = t.dtype
        group_of[module] = group
        g = out[group]
        g["tensors"] += 1
        g["bytes"] += t.nbytes
        entry = g["companions"].setdefault(suffix or "(fused)", {"dtypes": [], "tensors": 0, "bytes": 0})
        if t.dtype not in entry["dtypes"]:
            entry["dtypes"].append(t.dtype)
        entry["tensors"] += 1
        entry["bytes"] += t.nbytes
    for module, suffixes in modules.items():
        out[group_of[module]]["schemes"][scheme_of(suffixes, quant)] += 1
    for g in out.values():
        g["schemes"] = dict(g["schemes"].most_common())
        g["companions"] = dict(sorted(g["companions"].items()))
    return {g: v for g, v in out.items() if v["tensors"]}


def savings_per_expert(info: ModelInfo, tensors: dict) -> dict[str, float]:
    """Plan key -> bytes one fewer expert in that layer saves (its expert tensors, its rows of the
    routers and fused tensors); zero-computation router rows are not counted (they stay)."""
    saved: dict[str, float] = {layer.key: 0.0 for layer in info.layers}
    for name, (_, t) in tensors.items():
        role = info.classify(name)
        if isinstance(role, ExpertTensor):
            saved[role.layer.key] += t.nbytes / role.layer.num_experts
        elif isinstance(role, ExpertAxisSlice):
            for layer in role.owners:
                saved[layer.key] += t.nbytes / role.blocks / len(role.owners)
    return saved


def inspect_model(model: str | Path) -> dict:
    """A JSON-ready description of a MoE checkpoint: architecture, MoE layers (with their plan
    keys), experts, top-k, routing, dtypes, quantization per tensor group, sizes and shards, and
    the bytes pruning saves per expert removed.

    Example:
        >>> d = inspect_model("Kimi-K2-Thinking")
        >>> d["num_experts"], d["quantization_groups"]["expert"]["schemes"]
        (384, {'int4 pack-quantized': 46080})
        >>> d["bytes_saved_per_expert_removed"]["total"]   # one expert fewer in every MoE layer
    """
    from shardcut.format.hub import open_model

    ckpt = open_model(model)  # headers only: a Hub repo's shards are never downloaded
    info = describe(ckpt)
    dtype_bytes: Counter[str] = Counter()
    expert_bytes = 0
    per_layer: Counter[str] = Counter()
    for name, (_, t) in ckpt.tensors.items():
        dtype_bytes[t.dtype] += t.nbytes
        role = info.classify(name)
        if not isinstance(role, Copied):
            expert_bytes += t.nbytes
            per_layer[role.layer.key] += t.nbytes
    quant = info.config.get("quantization_config") or info.text_config.get("quantization_config")
    quant = quant if isinstance(quant, dict) else {}
    saved = savings_per_expert(info, ckpt.tensors)
    out = info.summary()
    out.update(
        {
            "path": str(ckpt.root),
            "layers": [
                {
                    "key": layer.key,
                    "prefix": layer.prefix.rstrip("."),
                    "mtp": layer.mtp,
                    "expert_bytes": per_layer[layer.key],
                    "bytes_saved_per_expert_removed": round(saved[layer.key]),
                }
                for layer in info.layers
            ],
            "routing": {
                "scoring": info.arch.scoring,
                "grouped": info.grouped,
                "n_group": info.n_group,
                "topk_group": info.topk_group,
                "selection_bias": info.arch.selection_bias,
            },
            "dtypes": dict(sorted(dtype_bytes.items())),
            "quantization": quant.get("quant_method"),
            "quantization_groups": quantization_groups(info, ckpt.tensors, quant),
            "total_bytes": ckpt.total_bytes,
            "expert_bytes": expert_bytes,
            "bytes_per_expert": expert_bytes // max(1, info.num_experts * len(info.layers)),
            "bytes_saved_per_expert_removed": {
                "total": round(sum(saved.values())),
                "per_layer_min": round(min(saved.values())),
                "per_layer_max": round(max(saved.values())),
            },
            "shards": len(ckpt.shards),
            "tensors": len(ckpt.tensors),
        }
    )
    return out
