"""`inspect`: what a checkpoint is, from its config and shard headers only."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from shardcut.model import describe


def inspect_model(model: str | Path) -> dict:
    """A JSON-ready description of a MoE checkpoint: architecture, MoE layers (with their plan
    keys), experts, top-k, routing, dtypes, quantization, sizes and shards.

    Example:
        >>> inspect_model("Qwen3-30B-A3B")["num_experts"]
        128
    """
    from shardcut.hub import open_model

    ckpt = open_model(model)  # headers only: a Hub repo's shards are never downloaded
    info = describe(ckpt)
    dtype_bytes: Counter[str] = Counter()
    expert_bytes = 0
    per_layer: Counter[str] = Counter()
    for name, (_, t) in ckpt.tensors.items():
        dtype_bytes[t.dtype] += t.nbytes
        role = info.classify(name)
        if role.kind != "copy":
            expert_bytes += t.nbytes
            per_layer[role.layer.key] += t.nbytes
    quant = info.config.get("quantization_config") or info.text_config.get("quantization_config")
    out = info.summary()
    out.update({
        "path": str(ckpt.root),
        "layers": [
            {"key": layer.key, "prefix": layer.prefix.rstrip("."), "mtp": layer.mtp,
             "expert_bytes": per_layer[layer.key]}
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
        "quantization": (quant or {}).get("quant_method") if isinstance(quant, dict) else None,
        "total_bytes": ckpt.total_bytes,
        "expert_bytes": expert_bytes,
        "bytes_per_expert": expert_bytes // max(1, info.num_experts * len(info.layers)),
        "shards": len(ckpt.shards),
        "tensors": len(ckpt.tensors),
    })
    return out
