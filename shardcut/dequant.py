"""Dequantize one layer's quantized tensors on the device, for calibrating quantized checkpoints
without a float copy on disk.

Handles FP8 block (`quant_method: "fp8"`: `weight` float8 + `weight_scale_inv`, block from
`weight_block_size`; DeepSeek-V3, Kimi-K2) and compressed-tensors (`quant_method:
"compressed-tensors"`: `pack-quantized` INT4 as in Kimi-K2-Thinking / K2.5, and every other
format the library registers). Both use the compressed-tensors library's own decompression
(`FP8BlockDequantizer`, the format's registered compressor); FP8 block falls back to a reference
implementation when the library is not installed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from shardcut.errors import ShardcutError

_FP8_COMPANIONS = (".weight_scale_inv", ".activation_scale", ".input_scale")


def dequantize(name_to_tensors: Mapping[str, torch.Tensor], quant_config: Mapping | None,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Float weights of one layer's tensors, under their plain `.weight` names, on `device`.

    Quantized modules (`X.weight` + `X.weight_scale_inv`, or `X.weight_packed` + its companions)
    become `X.weight` in `dtype`; their companions are consumed; every other tensor is returned
    as it is, moved to `device`. `quant_config` is the checkpoint's `quantization_config` (None or
    {} for a float checkpoint). Names are the checkpoint's, with or without a layer prefix.

    Example:
        >>> qc = json.load(open("Kimi-K2-Thinking/config.json"))["quantization_config"]
        >>> layer = {n: f.get_tensor(n) for n in names_of_layer_3}   # weight_packed, weight_scale, ...
        >>> w = dequantize(layer, qc, "cuda", torch.bfloat16)
        >>> w["model.layers.3.mlp.experts.0.down_proj.weight"].shape
        torch.Size([7168, 2048])
    """
    tensors = {name: t.to(device) for name, t in name_to_tensors.items()}
    method = (quant_config or {}).get("quant_method")
    if not method:
        return tensors
    if method == "fp8":
        return _fp8_block(tensors, quant_config, dtype)
    if method == "compressed-tensors":
        return _compressed_tensors(tensors, quant_config, dtype)
    raise ShardcutError(f"cannot dequantize quant_method {method!r} for calibration "
                        "(supported: fp8 block, compressed-tensors)", "config.json")


def fp8_block_reference(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
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
            out[f"{module}.weight"] = fp8_block_reference(out[f"{module}.weight"], out.pop(f"{module}.weight_scale_inv"),
                                                          block, dtype)
    for module in modules:
        for companion in _FP8_COMPANIONS:
            out.pop(module + companion, None)
    return out


def _compressed_tensors(tensors: dict, quant_config: Mapping, dtype: torch.dtype) -> dict:
    try:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.compressors.format import infer_module_format
        from compressed_tensors.config import CompressionFormat
        from compressed_tensors.quantization import QuantizationConfig
        from compressed_tensors.utils.match import match_name
    except ImportError:
        raise ShardcutError("dequantizing a compressed-tensors checkpoint needs the compressed-tensors package "
                            "(pip install compressed-tensors)") from None
    try:
        config = QuantizationConfig.model_validate(dict(quant_config))
    except Exception as exc:  # pydantic's ValidationError: one line naming the problem
        raise ShardcutError(f"quantization_config is not a compressed-tensors config "
                            f"({str(exc).splitlines()[0][:100]})", "config.json") from None
    out = dict(tensors)
    for scheme in config.config_groups.values():
        fmt = scheme.format or config.format
        if fmt in (None, "mixed-precision"):
            fmt = infer_module_format(torch.nn.Linear, scheme)
        compressor = BaseCompressor.get_value_from_registry(CompressionFormat(fmt).value)
        names = compressor.compression_param_names(scheme)
        roots = [n.removesuffix("." + names[0]) for n in out if n.endswith("." + names[0])]
        for module in roots:
            if any(match_name(module, ignored) for ignored in config.ignore or ()):
                continue
            if not ("Linear" in scheme.targets or any(match_name(module, target) for target in scheme.targets)):
                continue
            missing = [p for p in names if f"{module}.{p}" not in out]
            if missing:
                raise ShardcutError(f"{module}.{names[0]}: companion tensors {missing} are missing")
            state = {p: out.pop(f"{module}.{p}") for p in names}
            out[f"{module}.weight"] = compressor.decompress(state, scheme)["weight"].to(dtype)
    return out

