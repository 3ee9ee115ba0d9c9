"""The checkpoints REAP users prune, shaped as they ship, go calibrate -> plan -> prune -> verify
with no renaming or file surgery, and the pruned model passes the logits oracle:

- Kimi-K2.5: the multimodal wrapper (`kimi_k25`, DeepSeek-V3 backbone under `language_model.`,
  counts in `text_config`, Hub `kimi_k2` text model_type), 384 experts top-8, experts in
  compressed-tensors pack-quantized INT4 (symmetric, group 32, as Kimi-K2-Thinking / K2.5 ship)
  with a quantization config naming `language_model.` modules. Calibration equals the float twin
  holding the library's dequantization exactly, and the twin equals the float64 hook reference.
- DeepSeek-V3.2: 256 experts top-8, n_group 8, topk_group 4, an MTP layer, the sparse-attention
  indexer (run by transformers' DeepseekV32 code) keeping 4 keys per query of samples up to 40 tokens.

Hidden sizes are scaled down (hidden 64, expert width 32, 3 decoder layers of which 2 MoE, vocab 96);
expert counts, top-k and grouping are the real ones.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from fixtures.calib_fixtures import reference_statistics, write_ids_jsonl
from fixtures.families import build, family, load, load_tensors, save_sharded

from shardcut.ops.calibration.runner import calibrate
from shardcut.plans.scores import FIELDS, Scores

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

LENGTHS = [6, 23, 40, 11, 31]
DIMS = dict(hidden_size=64, moe_intermediate_size=32, intermediate_size=96)


def _k25_family():
    fam = family("kimi_k25")
    text = {**fam.config["text_config"], **DIMS, "n_routed_experts": 384, "num_experts_per_tok": 8}
    return dataclasses.replace(
        fam, name="kimi_k25_shaped", config={**fam.config, "text_config": text}, counts={"": 384}
    )


def _v32_family():
    fam = family("deepseek_v32")
    cfg = {**fam.config, **DIMS, "n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4}
    return dataclasses.replace(fam, name="deepseek_v32_shaped", config=cfg, n_group=8, counts={"": 256})


def _k25_int4(float_dir: Path, source: Path) -> None:
    """Kimi-K2.5's INT4 layout: routed experts pack-quantized by the compressed-tensors library, the
    config's targets and ignore list spelled with the wrapper's `language_model.` names."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig
    from fixtures.quant_fixtures import _ct_quantize, ct_scheme

    source.mkdir()
    save_sharded(source, _ct_quantize(load_tensors(float_dir), symmetric=True))
    scheme = ct_scheme(True)
    scheme.targets = [r"re:language_model\.model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj$"]
    qc = QuantizationConfig(
        config_groups={"group_0": scheme},
        format="pack-quantized",
        quantization_status="compressed",
        ignore=[
            "language_model.lm_head",
            r"re:vision_tower.*",
            r"re:mm_projector.*",
            r"re:language_model\.model\.layers\.\d+\.self_attn.*",
        ],
    )
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **qc.model_dump(exclude=["quant_method"]),
    }
    (source / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _dequantized(path: Path) -> Path:
    """`path` with its INT4 experts dequantized by the compressed-tensors library (float twin)."""
    from fixtures.quant_fixtures import _ct_dequantize

    out = path.parent / f"{path.name}-float"
    out.mkdir()
    config = json.loads((path / "config.json").read_text())
    save_sharded(out, _ct_dequantize(load_tensors(path), config.pop("quantization_config")))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _assert_reference(scores: Scores, model, samples, num_experts: int) -> None:
    keys = {int(k): k for k in scores.layers}
    ref = reference_statistics(model, samples, keys, num_experts)
    for key in scores.layers:
        r = scores.row(key)
        np.testing.assert_array_equal(scores.count[r], ref[key]["count"], err_msg=f"layer {key} count")
        for f in ("gate_sum", "norm_sum", "reap_sum", "act_max"):
            np.testing.assert_allclose(
                getattr(scores, f)[r], ref[key][f], rtol=1e-6, atol=1e-9, err_msg=f"layer {key} {f}"
            )


def _plan_prune_verify_oracle(
    fam, source: Path, scores_path: Path, tmp: Path, original, pruned_float=None, mtp_policy: str | None = None
) -> dict:
    """plan -> prune -> verify on `source` (no renaming), then the logits oracle on the float
    models (`original` loaded from the source or its float twin; the pruned one likewise)."""
    from shardcut.moe.oracle import forbid_pruned_experts
    from shardcut.ops.planning import make_plan
    from shardcut.ops.verification import verify
    from shardcut.rewrite.writer import prune

    plan, report = make_plan(source, scores_path, ratio=0.5, mtp_policy=mtp_policy)
    out = tmp / "pruned"
    prune(source, out, plan)
    checked = verify(out, source=source)
    assert checked.ok, checked.problems
    small, loading = load(fam, pruned_float(out) if pruned_float else out)
    assert not loading["missing_keys"] and not loading["mismatched_keys"], loading
    E = fam.experts_of("1")
    assert all(len(v) == E // 2 for v in plan.keep.values())
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(7))
    run = fam.forward or (lambda model, ids: model(ids).logits)
    with torch.no_grad():
        base = run(original, ids)
        with forbid_pruned_experts(original, plan.keep, {k: E for k in plan.keep}) as masked_routers:
            masked = run(original, ids)
        got = run(small, ids)
    assert masked_routers == len(fam.runs)
    assert (base - masked).abs().max().item() > 1e-3, "masking the pruned experts did not change the logits"
    assert (got - masked).abs().max().item() < 1e-5
    return plan.keep


def test_kimi_k25_int4_wrapper_calibrates_plans_prunes_and_verifies(tmp_path):
    pytest.importorskip("compressed_tensors")
    fam = _k25_family()
    build(fam, tmp_path / "float")
    source = tmp_path / "source"
    _k25_int4(tmp_path / "float", source)
    (source / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    twin = _dequantized(source)
    data = tmp_path / "ids.jsonl"
    samples = write_ids_jsonl(data, LENGTHS, 96, seed=2)

    q = calibrate(source, str(data), tmp_path / "q.safetensors", max_length=64, batch_tokens=64, device="cpu")
    f = calibrate(twin, str(data), tmp_path / "f.safetensors", max_length=64, batch_tokens=64, device="cpu")
    assert q.layers == ["1", "2"] and q.num_experts == 384 and q.metadata["top_k"] == "8"
    assert "image tokens" in q.metadata["text_only"]
    for field in (*FIELDS, "tokens"):
        np.testing.assert_array_equal(getattr(q, field), getattr(f, field), err_msg=field)
    np.testing.assert_array_equal(q.count.sum(axis=1), 8 * q.tokens)
    assert (q.count > 0).sum(axis=1).min() > 5 * 8  # routing spreads over many of the 384 experts

    model, _ = load(fam, twin)
    _assert_reference(q, model, samples, 384)
    _plan_prune_verify_oracle(fam, source, tmp_path / "q.safetensors", tmp_path, model, pruned_float=_dequantized)


def test_deepseek_v32_grouped_mtp_calibrates_plans_prunes_and_verifies(tmp_path):
    from fixtures.families import INDEX_TOPK

    fam = _v32_family()
    source = tmp_path / "source"
    model = build(fam, source)
    assert model.config.index_topk == INDEX_TOPK < max(LENGTHS)
    data = tmp_path / "ids.jsonl"
    samples = write_ids_jsonl(data, LENGTHS, 96, seed=3)

    scores = calibrate(source, str(data), tmp_path / "s.safetensors", max_length=64, batch_tokens=64, device="cpu")
    assert scores.layers == ["1", "2"] and scores.num_experts == 256  # the MTP layer 3 is not run
    np.testing.assert_array_equal(scores.count.sum(axis=1), 8 * scores.tokens)
    _assert_reference(scores, model, samples, 256)
    keep = _plan_prune_verify_oracle(fam, source, tmp_path / "s.safetensors", tmp_path, model, mtp_policy="reuse-last")
    for ids in keep.values():  # grouped routing: 16 of each group of 32
        assert np.bincount(np.asarray(ids) // 32, minlength=8).tolist() == [16] * 8
    assert set(keep) == {"1", "2", "3"} and keep["3"] == keep["2"]  # MTP ranked with the last layer's scores
