"""Pruning quantized checkpoints in their real formats keeps every expert's quantized tensors and
companions byte for byte, renumbers experts contiguously, rewrites the configs, and gives the logits
of the masked original (tests/fixtures/quant_fixtures.py builds the formats).

The logits oracle loads the quantized checkpoints with transformers where it loads the format on
CPU (FP8 block, compressed-tensors symmetric INT4, MXFP4: it dequantizes them on load); otherwise
it runs on both checkpoints dequantized by the fixture's reference dequantizer.
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from fixtures.families import LOGIT_DIFFS, assert_pruned_bytes, load, read_tensors
from fixtures.quant_fixtures import SCHEME_NAMES, dequantized_copy, expert_modules

from shardcut.format.checkpoint import open_checkpoint
from shardcut.moe.model import describe


@pytest.fixture(params=SCHEME_NAMES)
def built(request, quantized):
    if request.param.startswith("ct_"):
        pytest.importorskip("compressed_tensors")
    return quantized(request.param)


def _companions(names, experts: str) -> dict[tuple[str, int], set[str]]:
    """(module path inside the expert, expert id) -> the tensor suffixes stored for it."""
    out: dict[tuple[str, int], set[str]] = {}
    for name in names:
        m = re.search(rf"\.{re.escape(experts)}\.(\d+)\.(\w+)\.(.+)$", name)
        if m:
            out.setdefault((name[: m.start()] + "." + m.group(2), int(m.group(1))), set()).add(m.group(3))
    return out


def test_kept_tensors_and_companions_are_the_source_bytes(built):
    sc, fam = built.scheme, built.scheme.family
    src, out = read_tensors(built.source), read_tensors(built.pruned)
    if fam.experts:  # the fixture is in the scheme's format: every expert projection has its companions
        stored = _companions(src, fam.experts)
        assert stored and all(s == set(sc.companions) for s in stored.values()), set(map(frozenset, stored.values()))
    else:  # fused (MXFP4): blocks and scales per fused tensor
        assert {n.rsplit("_", 1)[1] for n in src if n.endswith(("_blocks", "_scales"))} == {"blocks", "scales"}

    assert_pruned_bytes(fam, built.keep, src, out)
    if fam.experts:
        kept = _companions(out, fam.experts)
        for key, prefix in fam.moe_layers.items():
            ids = {e for (module, e) in kept if module.startswith(prefix)}
            assert ids == set(range(fam.kept_of(key))), f"layer {key}: expert ids {sorted(ids)}"
        assert all(s == set(sc.companions) for s in kept.values())


def test_config_and_quantization_config(built):
    sc, fam = built.scheme, built.scheme.family
    src = json.loads((built.source / "config.json").read_text())
    out = json.loads((built.pruned / "config.json").read_text())
    kept = fam.kept_of(next(iter(fam.moe_layers)))
    counts = [k for k in ("num_experts", "num_local_experts", "n_routed_experts") if k in src]
    assert counts and all(out[k] == kept for k in counts)
    others = (*counts, "quantization_config")
    assert {k: v for k, v in out.items() if k not in others} == {k: v for k, v in src.items() if k not in others}

    qc_src, qc_out = src["quantization_config"], out["quantization_config"]
    side = built.source / "hf_quant_config.json"
    if sc.name != "modelopt_nvfp4":
        assert qc_out == qc_src  # names no expert: unchanged
        return
    # ModelOpt MIXED_PRECISION names every expert module: the kept ones, under their new ids
    renamed = {}
    for module in expert_modules(read_tensors(built.float_dir)):
        prefix, expert, proj = re.match(rf"(.*)\.{fam.experts}\.(\d+)\.(\w+)$", module).groups()
        key = next(k for k, p in fam.moe_layers.items() if p == prefix + ".")
        if int(expert) in built.keep[key]:
            renamed[f"{prefix}.{fam.experts}.{built.keep[key].index(int(expert))}.{proj}"] = {
                "quant_algo": "NVFP4",
                "group_size": 16,
            }
    assert qc_out["quantized_layers"] == renamed and len(renamed) < len(qc_src["quantized_layers"])
    assert {k: v for k, v in qc_out.items() if k != "quantized_layers"} == {
        k: v for k, v in qc_src.items() if k != "quantized_layers"
    }
    side_out = json.loads((built.pruned / "hf_quant_config.json").read_text())
    assert side_out["quantization"]["quantized_layers"] == renamed
    assert side_out["producer"] == json.loads(side.read_text())["producer"]


def test_pruned_logits_equal_masked_original(built):
    torch = pytest.importorskip("torch")
    from shardcut.moe.oracle import forbid_pruned_experts

    sc = built.scheme
    fam = sc.family
    if sc.transformers_loads and importlib.util.find_spec("accelerate"):  # transformers' quantizers need it
        original, pruned = built.source, built.pruned
    else:
        original, pruned = dequantized_copy(sc, built.source), dequantized_copy(sc, built.pruned)
    model, _ = load(fam, original)
    small, loading = load(fam, pruned)
    assert not loading["missing_keys"] and not loading["mismatched_keys"], loading

    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        base = model(ids).logits
        with forbid_pruned_experts(model, built.keep, {k: fam.experts_of(k) for k in built.keep}) as masked_routers:
            masked = model(ids).logits
        got = small(ids).logits
        reference = built.model(ids).logits  # the float model the checkpoint was quantized from
    assert masked_routers == len(fam.runs)
    assert (base - masked).abs().max().item() > 1e-3, "masking the pruned experts did not change the logits"
    assert (base - reference).abs().max().item() > 0, "the checkpoint is not quantized"
    diff = (got - masked).abs().max().item()
    LOGIT_DIFFS[f"quantized {sc.name}"] = diff
    assert diff < 1e-5


# The largest |dequantized - float| / max|float| per weight a scheme's rounding allows.
_TOLERANCE = {
    "fp8_block": 0.07,
    "ct_int4": 0.15,
    "ct_int4_asym": 0.07,
    "mxfp4": 0.35,
    "gptq": 0.07,
    "bnb_nf4": 0.2,
    "modelopt_nvfp4": 0.35,
}


def test_reference_dequantization_recovers_the_float_weights(built):
    """The fixtures really are quantizations of the float model (not random bytes with the right names)."""
    from fixtures.families import load_tensors

    sc = built.scheme
    floats = load_tensors(built.float_dir)
    qc = json.loads((built.source / "config.json").read_text())["quantization_config"]
    dequantized = sc.dequantize(load_tensors(built.source), qc)
    assert set(dequantized) == set(floats)
    worst, changed = 0.0, 0
    for name, f in floats.items():
        d = dequantized[name].float()
        assert d.shape == f.shape, name
        if not d.equal(f.float()):
            changed += 1
            worst = max(worst, ((d - f.float()).abs().max() / f.float().abs().max()).item())
    experts = [n for n in floats if ".experts." in n and not n.endswith("bias")]
    assert experts and all(not dequantized[n].float().equal(floats[n].float()) for n in experts), (
        "experts not quantized"
    )
    assert changed >= len(experts) and 0 < worst <= _TOLERANCE[sc.name], (changed, worst)


def test_verify_with_source_passes(built):
    from shardcut.ops.verification import verify

    report = verify(built.pruned, source=built.source)
    assert report.ok, report.problems
    info = describe(open_checkpoint(built.pruned))
    assert info.num_experts == built.scheme.family.kept_of(info.layers[0].key)


_LABELS = {
    "fp8_block": "fp8 block [16, 16]",
    "ct_int4": "int4 pack-quantized",
    "ct_int4_asym": "int4 pack-quantized",
    "mxfp4": "mxfp4",
    "gptq": "gptq int4",
    "bnb_nf4": "bitsandbytes nf4",
    "modelopt_nvfp4": "nvfp4 (modelopt)",
}


def test_inspect_reports_the_scheme_and_the_bytes_pruning_saves(built):
    from shardcut.ops.summary import inspect_model

    sc, fam = built.scheme, built.scheme.family
    report = inspect_model(built.source)
    experts = report["quantization_groups"]["expert"]
    assert list(experts["schemes"]) == [_LABELS[sc.name]]
    suffixes = {s.lstrip("._") for s in experts["companions"]}
    assert {c.lstrip("._") for c in sc.companions} <= suffixes, suffixes
    assert list(report["quantization_groups"]["router"]["schemes"]) == ["f32"]  # routers stay unquantized
    # one expert fewer in every layer saves `total`: the prune removed E - E' from each
    removed = fam.experts_of(next(iter(fam.moe_layers))) - fam.kept_of(next(iter(fam.moe_layers)))
    before, after = report["total_bytes"], inspect_model(built.pruned)["total_bytes"]
    assert report["bytes_saved_per_expert_removed"]["total"] * removed == pytest.approx(
        before - after, abs=len(fam.moe_layers)
    )


def test_inspect_command_shows_schemes_and_savings(quantized):
    pytest.importorskip("compressed_tensors")
    from typer.testing import CliRunner

    from shardcut_cli.main import app

    built = quantized("ct_int4")
    result = CliRunner().invoke(app, ["inspect", str(built.source)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "int4 pack-quantized x72" in result.output and ".weight_packed I32" in result.output
    assert "per expert removed from every MoE layer" in result.output
