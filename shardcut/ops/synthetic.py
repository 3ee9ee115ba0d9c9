"""Synthetic MoE checkpoints written straight to safetensors, for tests and benchmarks.

They have a real family's tensor population and config (DeepSeek-V3 / Kimi-K2 shaped, with
optional INT4 compressed-tensors companions) but pseudo-random bytes, so a 1T-shaped
population or a multi-GB checkpoint can be laid out in seconds without transformers or torch.
Not for logits checks: use tiny transformers models for those.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardcut.format.checkpoint import CONFIG_NAME, INDEX_NAME
from shardcut.format.container import tensor_nbytes


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of a DeepSeek-V3-style checkpoint (grouped sigmoid routing, shared experts, MTP)."""

    layers: int = 4
    first_dense: int = 1
    experts: int = 16
    top_k: int = 4
    n_group: int = 1
    topk_group: int = 1
    hidden: int = 64
    moe_inter: int = 32
    dense_inter: int = 96
    vocab: int = 256
    mtp_layers: int = 0
    dtype: str = "BF16"
    int4: bool = False  # experts as compressed-tensors pack-quantized (weight_packed/scale/shape)
    group_size: int = 32
    shards: int = 4
    model_type: str = "deepseek_v3"


def _tensors(spec: SyntheticSpec) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    H, I, D, dt = spec.hidden, spec.moe_inter, spec.dense_inter, spec.dtype
    yield "model.embed_tokens.weight", dt, (spec.vocab, H)
    for L in range(spec.layers + spec.mtp_layers):
        p = f"model.layers.{L}"
        yield f"{p}.input_layernorm.weight", dt, (H,)
        yield f"{p}.post_attention_layernorm.weight", dt, (H,)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{p}.self_attn.{proj}.weight", dt, (H, H)
        if L < spec.first_dense:
            yield f"{p}.mlp.gate_proj.weight", dt, (D, H)
            yield f"{p}.mlp.up_proj.weight", dt, (D, H)
            yield f"{p}.mlp.down_proj.weight", dt, (H, D)
            continue
        yield f"{p}.mlp.gate.weight", dt, (spec.experts, H)
        yield f"{p}.mlp.gate.e_score_correction_bias", "F32", (spec.experts,)
        for e in range(spec.experts):
            for proj, (out_f, in_f) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                q = f"{p}.mlp.experts.{e}.{proj}"
                if spec.int4:
                    yield f"{q}.weight_packed", "I32", (out_f, in_f // 8)
                    yield f"{q}.weight_scale", dt, (out_f, in_f // spec.group_size)
                    yield f"{q}.weight_shape", "I32", (2,)
                else:
                    yield f"{q}.weight", dt, (out_f, in_f)
        for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            yield f"{p}.mlp.shared_experts.{proj}.weight", dt, shape
    yield "model.norm.weight", dt, (H,)
    yield "lm_head.weight", dt, (spec.vocab, H)


def synthetic_config(spec: SyntheticSpec) -> dict:
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": spec.model_type,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.dense_inter,
        "moe_intermediate_size": spec.moe_inter,
        "num_hidden_layers": spec.layers,
        "first_k_dense_replace": spec.first_dense,
        "moe_layer_freq": 1,
        "n_routed_experts": spec.experts,
        "num_experts_per_tok": spec.top_k,
        "n_shared_experts": 1,
        "n_group": spec.n_group,
        "topk_group": spec.topk_group,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "num_nextn_predict_layers": spec.mtp_layers,
        "vocab_size": spec.vocab,
        "torch_dtype": "bfloat16",
    }
    if spec.int4:
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["re:.*mlp\\.experts\\.\\d+\\.(gate|up|down)_proj$"],
                    "weights": {"num_bits": 4, "group_size": spec.group_size, "strategy": "group", "symmetric": True},
                }
            },
            "ignore": ["lm_head"],
        }
    return config


def write_synthetic_checkpoint(path: str | Path, spec: SyntheticSpec = SyntheticSpec(), seed: int = 0) -> Path:
    """Write config.json, shards and index of a synthetic checkpoint; returns the folder.

    Example:
        >>> write_synthetic_checkpoint("/tmp/ds3", SyntheticSpec(layers=8, experts=64, shards=6))
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = list(_tensors(spec))
    total = sum(tensor_nbytes(d, s) for _, d, s in tensors)
    budget = -(-total // spec.shards)
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + tensor_nbytes(t[1], t[2]) > budget:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += tensor_nbytes(t[1], t[2])
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        _write_raw_shard(path / name, group, rng)
        weight_map.update({t[0]: name for t in group})
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / CONFIG_NAME).write_text(json.dumps(synthetic_config(spec), indent=2))
    (path / "generation_config.json").write_text('{"bos_token_id": 0, "eos_token_id": 1}\n')
    (path / "tokenizer_config.json").write_text('{"model_max_length": 4096}\n')
    return path


def _write_raw_shard(path: Path, tensors: list[tuple[str, str, tuple[int, ...]]], rng: np.random.Generator) -> None:
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in tensors:
        n = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        left = offset
        while left:  # distinct random bytes everywhere, so a misplaced range cannot go unnoticed
            n = min(left, 8 << 20)
            f.write(rng.bytes(n))
            left -= n
