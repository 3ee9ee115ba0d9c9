"""Calibration at scale, in miniature: FP8 block-quantized checkpoints (DeepSeek-V3 / Kimi-K2
releases) and data parallelism under torchrun (gloo on the CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures.calib_fixtures import run_two_ranks, write_ids_jsonl

from shardcut.ops.calibration.runner import calibrate
from shardcut.plans.scores import FIELDS, Scores

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
BLOCK = 16


def test_dequantize_fp8_applies_one_scale_per_block():
    from shardcut.moe.dequant import dequantize  # what the calibrator dequantises FP8 block weights with

    gen = torch.Generator().manual_seed(0)
    w8 = torch.randn(6, 10, generator=gen).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 3, generator=gen) + 0.5  # blocks of 4 x 4, the last ones partial
    got = dequantize(
        {"m.weight": w8, "m.weight_scale_inv": scale}, {"quant_method": "fp8", "weight_block_size": [4, 4]}
    )["m.weight"]
    for r in range(6):
        for c in range(10):
            assert got[r, c].item() == (w8[r, c].float() * scale[r // 4, c // 4]).item()


def _fp8_twins(source: Path, fp8: Path, plain: Path) -> int:
    """Write `source` twice: with every decoder-layer projection as FP8 + block scales, and with
    those weights replaced by their exact dequantised float32 values. Returns how many were quantized."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    for shard in sorted(source.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    quantized, dequantized = {}, {}
    for name, t in tensors.items():
        if ".layers." in name and name.endswith("_proj.weight") and t.ndim == 2:
            rows, cols = t.shape
            scale = torch.empty((-(-rows // BLOCK), -(-cols // BLOCK)))
            for i in range(scale.shape[0]):
                for j in range(scale.shape[1]):
                    tile = t[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
                    scale[i, j] = tile.abs().max().clamp(min=1e-8) / 448.0
            full = scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
            w8 = (t / full).to(torch.float8_e4m3fn)
            quantized[name], quantized[name + "_scale_inv"] = w8, scale
            dequantized[name] = w8.float() * full
        else:
            quantized[name] = dequantized[name] = t
    config = json.loads((source / "config.json").read_text())
    for path, weights, quant in ((fp8, quantized, True), (plain, dequantized, False)):
        path.mkdir()
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        cfg = dict(config)
        if quant:
            cfg["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [BLOCK, BLOCK],
            }
        (path / "config.json").write_text(json.dumps(cfg))
    return sum(1 for n in quantized if n.endswith("_scale_inv"))


def test_fp8_checkpoint_calibrates_like_its_dequantized_twin(families, tmp_path):
    n = _fp8_twins(families("deepseek_v3").source, tmp_path / "fp8", tmp_path / "plain")
    assert n > 20
    data = tmp_path / "ids.jsonl"
    write_ids_jsonl(data, [12, 30, 7, 22], 96)
    a = calibrate(tmp_path / "fp8", str(data), tmp_path / "a.safetensors", max_length=64)
    b = calibrate(tmp_path / "plain", str(data), tmp_path / "b.safetensors", max_length=64)
    for f in (*FIELDS, "tokens"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert a.count.sum() == 2 * a.tokens.sum()


_RANK_SCRIPT = """
import sys
from shardcut.ops.calibration.runner import calibrate
calibrate(sys.argv[1], sys.argv[2], sys.argv[3], max_length=64, batch_tokens=96, device="cpu")
"""


def test_torchrun_two_ranks_equal_one_process(families, tmp_path):
    data = tmp_path / "ids.jsonl"
    write_ids_jsonl(data, [3, 17, 40, 9, 64, 25, 33], 96, seed=3)
    source = families("qwen3_moe").source
    single = calibrate(source, str(data), tmp_path / "one.safetensors", max_length=64, batch_tokens=96)
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    out = tmp_path / "two.safetensors"
    run_two_ranks(script, str(source), str(data), str(out))
    two = Scores.load(out)
    assert two.metadata["samples"] == "7" and two.metadata["tokens"] == str(sum([3, 17, 40, 9, 64, 25, 33]))
    np.testing.assert_array_equal(two.count, single.count)
    np.testing.assert_array_equal(two.tokens, single.tokens)
    for f in ("gate_sum", "norm_sum", "reap_sum", "act_max"):
        np.testing.assert_allclose(getattr(two, f), getattr(single, f), rtol=1e-6, err_msg=f)
    assert not (tmp_path / "two.safetensors.calib").exists()
