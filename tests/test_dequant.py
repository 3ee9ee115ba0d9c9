"""`shardcut.moe.dequant.dequantize` turns one layer's FP8-block or compressed-tensors INT4 tensors into
the float weights the fixtures were quantized from (within the format's rounding), under their
plain `.weight` names, as the calibrator needs them."""

from __future__ import annotations

import json

import pytest
from fixtures.families import load_tensors

from shardcut.format.errors import ShardcutError

torch = pytest.importorskip("torch")

# |dequantized - float| / max|float| the format's rounding allows
_TOLERANCE = {"fp8_block": 0.07, "ct_int4": 0.15, "ct_int4_asym": 0.07}


def _layer(tensors: dict, prefix: str) -> dict:
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.mark.parametrize("name", list(_TOLERANCE))
def test_dequantize_gives_the_float_weights(quantized, name):
    if name.startswith("ct_"):
        pytest.importorskip("compressed_tensors")
    from shardcut.moe.dequant import dequantize

    built = quantized(name)
    qc = json.loads((built.source / "config.json").read_text())["quantization_config"]
    source, floats = load_tensors(built.source), load_tensors(built.float_dir)
    reference = built.scheme.dequantize(source, qc)  # the fixture's own dequantizer
    for prefix in built.scheme.family.moe_layers.values():
        layer = _layer(source, prefix)
        got = dequantize(layer, qc, "cpu")
        assert set(got) == set(_layer(floats, prefix)), "companions left over or weights missing"
        quantized_modules = 0
        for key, value in got.items():
            f = floats[key].float()
            assert value.shape == f.shape and value.dtype in (torch.float32, f.dtype), key
            if layer.get(key) is not None and layer[key].dtype == value.dtype and layer[key].equal(value):
                continue  # not quantized: passed through
            quantized_modules += 1
            assert torch.allclose(value, reference[key].float(), atol=1e-6, rtol=0), key
            error = ((value - f).abs().max() / f.abs().max()).item()
            assert 0 < error <= _TOLERANCE[name], (key, error)
        assert quantized_modules >= 3 * 8, quantized_modules  # every expert projection of the layer


def test_dequantize_to_bfloat16_and_back_of_a_float_checkpoint(quantized):
    from shardcut.moe.dequant import dequantize

    built = quantized("fp8_block")
    qc = json.loads((built.source / "config.json").read_text())["quantization_config"]
    layer = _layer(load_tensors(built.source), "model.layers.1.")
    got = dequantize(layer, qc, "cpu", torch.bfloat16)
    assert got["model.layers.1.mlp.experts.0.down_proj.weight"].dtype == torch.bfloat16
    assert got["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # unquantized: untouched
    plain = {"a.weight": torch.ones(2, 2)}
    assert dequantize(plain, None)["a.weight"].equal(plain["a.weight"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_dequantize_on_the_device(quantized):
    from shardcut.moe.dequant import dequantize

    built = quantized("fp8_block")
    qc = json.loads((built.source / "config.json").read_text())["quantization_config"]
    layer = _layer(load_tensors(built.source), "model.layers.1.")
    on_gpu = dequantize(layer, qc, "cuda")
    on_cpu = dequantize(layer, qc, "cpu")
    assert all(t.device.type == "cuda" for t in on_gpu.values())
    assert all(torch.allclose(on_gpu[k].cpu(), on_cpu[k]) for k in on_cpu)


def test_bad_quantized_layers_are_refused():
    from shardcut.moe.dequant import dequantize

    with pytest.raises(ShardcutError, match="has no x.weight"):
        dequantize({"x.weight_scale_inv": torch.ones(1, 1)}, {"quant_method": "fp8", "weight_block_size": [16, 16]})
    with pytest.raises(ShardcutError, match="cannot dequantize quant_method 'awq'"):
        dequantize({"x.qweight": torch.zeros(1, 1, dtype=torch.int32)}, {"quant_method": "awq"})
    pytest.importorskip("compressed_tensors")
    qc = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "g": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
            }
        },
    }
    with pytest.raises(ShardcutError, match=r"companion tensors \['weight_scale', 'weight_shape'\] are missing"):
        dequantize({"x.weight_packed": torch.zeros(4, 4, dtype=torch.int32)}, qc)
