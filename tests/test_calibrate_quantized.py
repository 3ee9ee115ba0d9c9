"""The calibrator reads quantized checkpoints as they ship, dequantising each layer a few modules
at a time on the device (`shardcut.moe.dequant`): FP8 block (DeepSeek-V3 / Kimi-K2), compressed-tensors
pack-quantized INT4 (Kimi-K2-Thinking / K2.5; symmetric, and asymmetric with zero points) and gpt-oss
MXFP4. Its statistics equal those of the float model holding the dequantized weights: the streaming
calibrator on a float checkpoint of those weights (exactly) and the hook reference of
tests/fixtures/calib_fixtures.py on that model loaded by transformers (to 1e-6). Schemes it cannot
dequantize are refused with one line naming the scheme.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures.calib_fixtures import reference_statistics, write_ids_jsonl
from fixtures.families import TOP_K, E, load_tensors, save_sharded

from shardcut.format.errors import ShardcutError
from shardcut.ops.calibration.runner import calibrate
from shardcut.plans.scores import FIELDS, Scores

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

SCHEMES = ["fp8_block", "ct_int4", "ct_int4_asym", "mxfp4"]
LENGTHS = [5, 23, 40, 12, 31, 9]
BATCH_TOKENS = 64  # several padded batches


def _vocab(path: Path) -> int:
    return json.loads((path / "config.json").read_text())["vocab_size"]


def _run(model: Path, data: Path, out: Path, **kwargs) -> Scores:
    return calibrate(model, str(data), out, max_length=64, batch_tokens=BATCH_TOKENS, device="cpu", **kwargs)


def _float_twin(built, path: Path) -> Path:
    """A float checkpoint holding the quantized source's weights as dequantized by the fixture's own
    reference dequantizer (FP8: its block multiply; INT4: the compressed-tensors library; MXFP4:
    transformers'), config without `quantization_config`."""
    config = json.loads((built.source / "config.json").read_text())
    qc = config.pop("quantization_config")
    path.mkdir()
    save_sharded(path, built.scheme.dequantize(load_tensors(built.source), qc))
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


@pytest.fixture(scope="module")
def runs(quantized, tmp_path_factory):
    """`runs(scheme)` -> (built, float twin, data, samples, scores of the quantized source, of the twin)."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            if name.startswith("ct_"):
                pytest.importorskip("compressed_tensors")
            built = quantized(name)
            tmp = tmp_path_factory.mktemp(f"calib-q-{name}")
            twin = _float_twin(built, tmp / "float-twin")
            data = tmp / "ids.jsonl"
            samples = write_ids_jsonl(data, LENGTHS, _vocab(built.source), seed=1)
            q = _run(built.source, data, tmp / "quantized.safetensors")
            f = _run(twin, data, tmp / "twin.safetensors")
            cache[name] = (built, twin, data, samples, q, f)
        return cache[name]

    return get


@pytest.mark.parametrize("name", SCHEMES)
def test_quantized_checkpoint_calibrates_like_its_dequantized_float_model(name, runs):
    from transformers import AutoModelForCausalLM

    built, twin, _, samples, q, f = runs(name)
    assert q.layers == f.layers and len(q.layers) >= 2
    for field in (*FIELDS, "tokens"):
        np.testing.assert_array_equal(getattr(q, field), getattr(f, field), err_msg=field)
    np.testing.assert_array_equal(q.count.sum(axis=1), TOP_K * q.tokens)
    assert (q.tokens == sum(LENGTHS)).all() and (q.norm_sum > 0).sum() > E

    model = AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()
    keys = {int(k): k for k in built.scheme.family.runs}
    ref = reference_statistics(model, samples, keys, E)
    for key in q.layers:
        r = q.row(key)
        assert q.tokens[r] == ref[key]["tokens"]
        np.testing.assert_array_equal(q.count[r], ref[key]["count"], err_msg=f"layer {key} count")
        for field in ("gate_sum", "norm_sum", "reap_sum", "act_max"):
            np.testing.assert_allclose(
                getattr(q, field)[r], ref[key][field], rtol=1e-6, atol=1e-9, err_msg=f"layer {key} {field}"
            )


def test_dequantizing_one_module_at_a_time_changes_nothing(runs, monkeypatch, tmp_path):
    """With a chunk budget of one byte every `dequantize` call gets one module (a weight and its
    companions): the bounded-memory path gives the same statistics as whole-layer chunks."""
    from shardcut.ops.calibration import stream

    built, _, data, _, whole, _ = runs("ct_int4")
    modules_per_call = []
    original = stream.TensorReader.dequantize

    def spy(self, raw, names, device, dtype):
        modules_per_call.append(len({n.rpartition(".")[0] for n in names}))
        return original(self, raw, names, device, dtype)

    monkeypatch.setattr(stream, "DEQUANT_CHUNK_BYTES", 1)
    monkeypatch.setattr(stream.TensorReader, "dequantize", spy)
    one = _run(built.source, data, tmp_path / "one.safetensors")
    assert set(modules_per_call) == {1} and len(modules_per_call) > 3 * E
    for field in (*FIELDS, "tokens"):
        np.testing.assert_array_equal(getattr(one, field), getattr(whole, field), err_msg=field)


def test_bfloat16_dequantization_rounds_like_the_float_twin(runs, tmp_path):
    """In bfloat16 the FP8 weights are dequantised straight to bfloat16: the same values as the
    float32 twin's weights cast to bfloat16."""
    built, twin, data, _, _, _ = runs("fp8_block")
    q = _run(built.source, data, tmp_path / "q.safetensors", dtype="bfloat16")
    f = _run(twin, data, tmp_path / "f.safetensors", dtype="bfloat16")
    for field in (*FIELDS, "tokens"):
        np.testing.assert_array_equal(getattr(q, field), getattr(f, field), err_msg=field)


def _ct_fp8_twins(float_dir: Path, quant_dir: Path, twin_dir: Path) -> int:
    """compressed-tensors `float-quantized` FP8 per-channel (the RedHat "FP8-dynamic" releases:
    targets Linear, ignore the head and routers), quantized by the library; and its float twin
    (w8 * scale). Norms and the embedding stay plain `weight`s with no companion. Returns how many
    modules were quantized."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="float-quantized")
    compressor = BaseCompressor.get_value_from_registry("float-quantized")
    quantized, twin = {}, {}
    for name, t in load_tensors(float_dir).items():
        if t.ndim == 2 and name.endswith("_proj.weight"):
            scale, zero = calculate_qparams(t.amin(1, keepdim=True), t.amax(1, keepdim=True), args)
            packed = compressor.compress({"weight": t, "weight_scale": scale, "weight_zero_point": zero}, scheme)
            quantized.update({f"{name.removesuffix('weight')}{k}": v for k, v in packed.items()})
            twin[name] = packed["weight"].float() * packed["weight_scale"]
        else:
            quantized[name] = twin[name] = t
    config = json.loads((float_dir / "config.json").read_text())
    qc = QuantizationConfig(
        config_groups={"group_0": scheme},
        format="float-quantized",
        quantization_status="compressed",
        ignore=["lm_head", r"re:.*mlp\.gate$"],
    )
    for path, tensors, quant in ((quant_dir, quantized, True), (twin_dir, twin, False)):
        path.mkdir()
        save_sharded(path, tensors)
        cfg = (
            {
                **config,
                "quantization_config": {
                    "quant_method": "compressed-tensors",
                    "sparsity_config": {},
                    "transform_config": {},
                    **qc.model_dump(exclude=["quant_method"]),
                },
            }
            if quant
            else config
        )
        (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return sum(1 for n in quantized if n.endswith(".weight_scale"))


def test_compressed_tensors_fp8_with_plain_norms_calibrates_like_its_twin(runs, tmp_path):
    """Any format the compressed-tensors library decompresses reads the same way: per-channel FP8
    `float-quantized`, where a targeted module's `weight` is FP8 + `weight_scale`, while norms and
    the embedding keep a bare float `weight`."""
    pytest.importorskip("compressed_tensors")
    built, _, data, _, _, _ = runs("ct_int4")
    n = _ct_fp8_twins(built.float_dir, tmp_path / "fp8", tmp_path / "twin")
    assert n > 3 * E
    q = _run(tmp_path / "fp8", data, tmp_path / "q.safetensors")
    f = _run(tmp_path / "twin", data, tmp_path / "f.safetensors")
    for field in (*FIELDS, "tokens"):
        np.testing.assert_array_equal(getattr(q, field), getattr(f, field), err_msg=field)
    np.testing.assert_array_equal(q.count.sum(axis=1), TOP_K * q.tokens)


_CT_INT4 = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "config_groups": {
        "g": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
        }
    },
}


@pytest.mark.parametrize(
    "quant, message",
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 16}, "cannot dequantize quant_method 'gptq'"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "cannot dequantize quant_method 'bitsandbytes'"),
        ({**_CT_INT4, "format": "marlin-24"}, "cannot dequantize compressed-tensors format 'marlin-24'"),
        (
            {**_CT_INT4, "sparsity_config": {"format": "sparse-bitmask"}},
            "cannot dequantize compressed-tensors sparsity format 'sparse-bitmask'",
        ),
        ({**_CT_INT4, "transform_config": {"config_groups": {"u": {"type": "hadamard"}}}}, "transform_config"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "not a compressed-tensors config"),
    ],
)
def test_schemes_it_cannot_dequantize_are_refused(quant, message, families, tmp_path):
    if quant["quant_method"] == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    model = tmp_path / "model"
    shutil.copytree(families("qwen3_moe").source, model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = quant
    (model / "config.json").write_text(json.dumps(config))
    data = tmp_path / "ids.jsonl"
    write_ids_jsonl(data, [5], _vocab(model))
    with pytest.raises(ShardcutError, match=message) as err:
        _run(model, data, tmp_path / "s.safetensors")
    assert "\n" not in str(err.value) and str(model / "config.json") in str(err.value)
    assert not (tmp_path / "s.safetensors").exists()
