"""Dequantize one layer's quantized tensors on the device, for calibrating quantized checkpoints
without a float copy on disk.

Handles FP8 block (`quant_method: "fp8"`: `weight` float8 + `weight_scale_inv`, block from
`weight_block_size`; DeepSeek-V3, Kimi-K2), compressed-tensors (`quant_method:
"compressed-tensors"`: `pack-quantized` INT4 as in Kimi-K2-Thinking / K2.5, and every other
format the library registers) and gpt-oss MXFP4 (`quant_method: "mxfp4"`: fused `*_blocks` +
`*_scales` expert tensors). FP8 block and compressed-tensors use the compressed-tensors library's own
decompression (`FP8BlockDequantizer`, the format's registered compressor; FP8 block falls back to a
reference implementation when the library is not installed), MXFP4 transformers' own
`convert_moe_packed_tensors`. `check_dequantizable` refuses every other scheme up front.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from shardcut.format.errors import ShardcutError

_FP8_COMPANIONS = (".weight_scale_inv", ".activation_scale", ".input_scale")


def dequantize(
    name_to_tensors: Mapping[str, torch.Tensor],
    quant_config: Mapping | None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Float weights of one layer's tensors, under their plain `.weight` names, on `device`.

    Quantized modules (`X.weight` + `X.weight_scale_inv`, or `X.weight_packed` + its companions)
    become `X.weight` in `dtype`, MXFP4 `X_blocks` + `X_scales` become `X`; companions are
    consumed; every other tensor is returned as it is, moved to `device`. `quant_config` is the
    checkpoint's `quantization_config` (None or {} for a float checkpoint). Names are the
    checkpoint's, with or without a layer prefix.

    Example:
        >>> qc = json.load(open("Kimi-K2-Thinking/config.json"))["quantization_config"]
        >>> layer = {n: f.get_tensor(n) for n in names_of_layer_3}   # weight_packed, weight_scale, ...
        >>> w = dequantize(layer, qc, "cuda", torch.bfloat16)
        >>> w["model.layers.3.mlp.experts.0.down_proj.weight"].shape
        torch.Size([7168, 2048])
    """
    tensors = {name: t.to(device) for name, t in name_to_tensors.items()}
    method = (quant_config or {}).get("quant_method")
    if not method or quant_config is None:
        return tensors
    if method == "fp8":
        return _fp8_block(tensors, quant_config, dtype)
    if method == "compressed-tensors":
        return _compressed_tensors(tensors, quant_config, dtype)
    if method == "mxfp4":
        return _mxfp4(tensors, dtype)
    raise ShardcutError(
        f"cannot dequantize quant_method {method!r} for calibration (supported: fp8 block, compressed-tensors, mxfp4)",
        "config.json",
    )


def check_dequantizable(quant_config: Mapping | None, path: str | Path = "config.json") -> None:
    """Raise a one-line `ShardcutError` naming the scheme when `dequantize` cannot read checkpoints
    quantized with `quant_config` (None or {}: a float checkpoint, fine). Cheap: reads no tensor.

    Example:
        >>> check_dequantizable({"quant_method": "gptq", "bits": 4})
        ShardcutError: config.json: cannot dequantize quant_method 'gptq' for calibration (...)
    """
    method = (quant_config or {}).get("quant_method")
    if not method or quant_config is None or method in ("fp8", "mxfp4"):
        return
    if method != "compressed-tensors":
        raise ShardcutError(
            f"cannot dequantize quant_method {method!r} for calibration "
            "(supported: fp8 block, compressed-tensors, mxfp4)",
            path,
        )
    config, _ = _ct_config(quant_config, path)
    for name, scheme in config.config_groups.items():
        _ct_compressor(scheme, config, path, name)
    sparsity = (quant_config.get("sparsity_config") or {}).get("format")
    if sparsity not in (None, "dense"):
        raise ShardcutError(f"cannot dequantize compressed-tensors sparsity format {sparsity!r} for calibration", path)
    if quant_config.get("transform_config"):
        raise ShardcutError(
            "cannot calibrate a compressed-tensors checkpoint with a transform_config (rotated "
            "weights: their dequantized values are not the model's)",
            path,
        )


def fp8_block_reference(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """`weight * scale_inv`, each scale covering a `block` of the (zero-padded) weight; a scalar
    scale covers the whole weight."""
    w = weight.to(torch.float32)
    s = scale_inv.to(torch.float32)
    if s.numel() == 1 or block is None:
        return (w * s.reshape(())).to(dtype)
    bo, bi = block
    s = s.repeat_interleave(bo, dim=0).repeat_interleave(bi, dim=1)[: w.shape[0], : w.shape[1]]
    return (w * s).to(dtype)


def _fp8_block(tensors: dict, quant_config: Mapping, dtype: torch.dtype) -> dict:
    block = quant_config.get("weight_block_size")
    block = tuple(block) if block else None
    modules = [n.removesuffix(".weight_scale_inv") for n in tensors if n.endswith(".weight_scale_inv")]
    for module in modules:
        if f"{module}.weight" not in tensors:
            raise ShardcutError(f"{module}.weight_scale_inv has no {module}.weight to scale")
    if not modules:
        return tensors
    try:
        from compressed_tensors.entrypoints.convert.converters import FP8BlockDequantizer
    except ImportError:
        FP8BlockDequantizer = None  # noqa: N806
    if FP8BlockDequantizer is not None and block is not None:
        # the library's own: matches exactly the modules given, pads partial blocks
        out = FP8BlockDequantizer(targets=modules, weight_block_size=block, dtype=dtype).process(dict(tensors))
    else:
        out = dict(tensors)
        for module in modules:
            out[f"{module}.weight"] = fp8_block_reference(
                out[f"{module}.weight"], out.pop(f"{module}.weight_scale_inv"), block, dtype
            )
    for module in modules:
        for companion in _FP8_COMPANIONS:
            out.pop(module + companion, None)
    return out


def _ct_config(quant_config: Mapping, path: str | Path = "config.json"):
    """The parsed compressed-tensors `QuantizationConfig` and the library's `match_name`."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
        from compressed_tensors.utils.match import match_name
    except ImportError:
        raise ShardcutError(
            "dequantizing a compressed-tensors checkpoint needs the compressed-tensors package "
            "(pip install compressed-tensors)"
        ) from None
    try:
        config = QuantizationConfig.model_validate(dict(quant_config))
    except Exception as exc:  # pydantic's ValidationError: one line naming the problem
        raise ShardcutError(
            f"quantization_config is not a compressed-tensors config ({str(exc).splitlines()[0][:100]})", path
        ) from None
    return config, match_name


def _ct_compressor(scheme, config, path: str | Path = "config.json", group: str = ""):
    """The library's registered compressor for one config group's format."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format

    fmt = scheme.format or config.format
    if fmt in (None, "mixed-precision"):
        fmt = infer_module_format(torch.nn.Linear, scheme)
    fmt = getattr(fmt, "value", fmt)
    try:
        return BaseCompressor.get_value_from_registry(fmt)
    except Exception:  # the registry raises ValueError/KeyError for formats it has no compressor for
        raise ShardcutError(
            f"cannot dequantize compressed-tensors format {fmt!r} (config group {group!r}) for calibration", path
        ) from None


def _compressed_tensors(tensors: dict, quant_config: Mapping, dtype: torch.dtype) -> dict:
    config, match_name = _ct_config(quant_config)
    out = dict(tensors)
    for group, scheme in config.config_groups.items():
        compressor = _ct_compressor(scheme, config, group=group)
        names = compressor.compression_param_names(scheme)
        if tuple(names) == ("weight",):
            continue  # dense: stored as it is
        roots = [n.removesuffix("." + names[0]) for n in out if n.endswith("." + names[0])]
        for module in roots:
            if any(match_name(module, ignored) for ignored in config.ignore or ()):
                continue
            if not ("Linear" in scheme.targets or any(match_name(module, target) for target in scheme.targets)):
                continue
            missing = [p for p in names if f"{module}.{p}" not in out]
            if names[0] == "weight" and len(missing) == len(names) - 1:
                continue  # a plain `weight` with no companion (a norm, an embedding): not quantized
            if missing:
                raise ShardcutError(f"{module}.{names[0]}: companion tensors {missing} are missing")
            state = {p: out.pop(f"{module}.{p}") for p in names}
            out[f"{module}.weight"] = compressor.decompress(state, scheme)["weight"].to(dtype)
    return out


def _mxfp4(tensors: dict, dtype: torch.dtype) -> dict:
    """gpt-oss MXFP4: `X_blocks` uint8 [E, out, in/32, 16] + `X_scales` E8M0 [E, out, in/32] -> `X`
    [E, in, out], the float layout transformers' GptOssExperts holds (transformers' own dequantizer)."""
    blocks = [n for n in tensors if n.endswith("_blocks")]
    if not blocks:
        return tensors
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out = dict(tensors)
    for name in blocks:
        base = name.removesuffix("_blocks")
        if base + "_scales" not in out:
            raise ShardcutError(f"{name} has no {base}_scales")
        packed, scales = out.pop(name), out.pop(base + "_scales")
        if packed.ndim != 4 or tuple(packed.shape[:-1]) != tuple(scales.shape):
            raise ShardcutError(
                f"{name} {list(packed.shape)} / {base}_scales {list(scales.shape)}: not gpt-oss "
                "MXFP4 expert blocks [E, out, in/32, 16] and scales [E, out, in/32]"
            )
        out[base] = convert_moe_packed_tensors(packed, scales, dtype=dtype)
    return out
