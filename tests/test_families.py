"""Pruning every supported family is right: the DESIGN.md logits oracle, plus direct checks of
the files (transformers loads gapped expert numbering silently, so logits alone are not enough).

Expected outputs are derived from the source bytes and the layout facts in
tests/fixtures/families.py, never from shardcut's own architecture table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from fixtures.families import (
    COUNT_NAMES,
    FAMILY_NAMES,
    LOGIT_DIFFS,
    SIDE_FILES,
    TOP_K,
    E,
    assert_pruned_bytes,
    load,
    read_tensors,
)
from safetensors import safe_open

from shardcut.format.checkpoint import open_checkpoint
from shardcut.moe.model import describe


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_table_describes_family(families, name):
    b = families(name)
    info = describe(open_checkpoint(b.source))
    assert [layer.key for layer in info.layers] == list(b.family.moe_layers)
    assert [layer.prefix for layer in info.layers] == list(b.family.moe_layers.values())
    assert (info.num_experts, info.top_k, info.n_group) == (E, TOP_K, b.family.n_group)
    assert [layer.num_experts for layer in info.layers] == [b.family.experts_of(k) for k in b.family.moe_layers]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_pruned_logits_equal_masked_original(families, name):
    torch = pytest.importorskip("torch")
    from shardcut.moe.oracle import forbid_pruned_experts

    b = families(name)
    small, loading = load(b.family, b.pruned)
    assert not loading["missing_keys"] and not loading["mismatched_keys"], loading
    mtp = b.family.mtp_copy[1] if b.family.mtp_copy else None
    assert all(mtp and k.startswith(mtp) for k in loading["unexpected_keys"]), loading["unexpected_keys"]

    fam = b.family
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(7))
    run = fam.forward or (lambda model, ids: model(ids).logits)
    counts = {k: fam.experts_of(k) for k in b.keep}
    with torch.no_grad():
        base = run(b.model, ids)
        with forbid_pruned_experts(b.model, b.keep, counts, fam.oracle_key, fam.zero_experts) as masked_routers:
            masked = run(b.model, ids)
        got = run(small, ids)
        again = run(b.model, ids)
    assert masked_routers == len(b.family.runs)
    assert torch.equal(again, base), "the oracle left the original model changed"
    effect = (base - masked).abs().max().item()
    assert effect > 1e-3, "masking the pruned experts did not change the original's logits"
    diff = (got - masked).abs().max().item()
    LOGIT_DIFFS[name] = diff
    print(f"{name}: max |pruned - masked original| = {diff:.3e} (masking effect {effect:.3e})")
    assert diff < 1e-5


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_pruned_tensors_are_the_source_bytes(families, name):
    b = families(name)
    fam, keep = b.family, b.keep
    src, out = read_tensors(b.source), read_tensors(b.pruned)
    for key, prefix in fam.moe_layers.items():  # the fixture's facts hold for the source
        for rel in sum(fam.tensors_of(key), ()) + fam.block_cols:
            assert prefix + rel in src, f"{prefix + rel} not in the source checkpoint"
        if fam.experts:
            found = {
                n[len(prefix + fam.experts) + 1 :].split(".")[0]
                for n in src
                if n.startswith(prefix + fam.experts + ".")
            }
            assert found >= {str(e) for e in range(fam.experts_of(key) * len(fam.halves(key)))}, (key, found)
    assert any(len({s for n, (s, *_) in src.items() if n.startswith(p)}) > 1 for p in fam.moe_layers.values()), (
        "no MoE layer straddles two source shards"
    )

    assert_pruned_bytes(fam, keep, src, out)
    if fam.experts:
        for key, prefix in fam.moe_layers.items():
            ids = {
                int(n[len(prefix + fam.experts) + 1 :].split(".")[0])
                for n in out
                if n.startswith(prefix + fam.experts + ".") and n[len(prefix + fam.experts) + 1].isdigit()
            }
            total = sum(fam.kept_of(k) for k in fam.halves(key))
            assert ids == set(range(total)), f"layer {key}: expert ids {sorted(ids)}"


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    else:
        yield path, node


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_config_changes_only_expert_counts(families, name):
    b = families(name)
    src = dict(_leaves(json.loads((b.source / "config.json").read_text())))
    out = dict(_leaves(json.loads((b.pruned / "config.json").read_text())))
    assert set(src) == set(out)
    sizes = {b.family.experts_of(k) for k in b.family.moe_layers}
    counts = {p for p, v in src.items() if p[-1] in COUNT_NAMES and v in sizes}
    assert counts, "no expert count found in the source config"
    for path, value in src.items():
        assert out[path] == (value // 2 if path in counts else value), ".".join(path)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_index_and_side_files(families, name):
    b = families(name)
    index = json.loads((b.pruned / "model.safetensors.index.json").read_text())
    tensors = read_tensors(b.pruned)
    shard_files = sorted(p.name for p in b.pruned.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == shard_files and len(shard_files) > 1
    held = {}
    for shard in shard_files:
        with safe_open(b.pruned / shard, "numpy") as f:
            held.update(dict.fromkeys(f.keys(), shard))
    assert index["weight_map"] == held
    assert index["metadata"]["total_size"] == sum(a.nbytes for *_, a in tensors.values())
    side = [*SIDE_FILES, "generation_config.json"]
    for rel in side:
        if (b.source / rel).exists():
            assert (b.pruned / rel).read_bytes() == (b.source / rel).read_bytes(), rel

    def others(root):
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix != ".safetensors"}

    extra = others(b.pruned) - others(b.source)
    assert extra <= {"shardcut-plan.json"}, f"unexpected files in the output: {sorted(extra)}"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_verify_with_source_passes(families, name):
    from typer.testing import CliRunner

    from shardcut_cli.main import app

    b = families(name)
    result = CliRunner().invoke(app, ["verify", str(b.pruned), "--source", str(b.source)])
    assert result.exit_code == 0, result.output
    assert "byte-identical" in result.output


def _tiny_checkpoint(path: Path, config: dict, tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    return path


def _experts(prefix: str, n: int, names=("w1", "w2", "w3")) -> dict[str, np.ndarray]:
    return {f"{prefix}.{e}.{w}.weight": np.zeros((4, 8), np.float32) for e in range(n) for w in names}


@pytest.mark.parametrize("case", ["jetmoe", "deepseek_v4_hash"])
def test_unprunable_layouts_are_refused_with_the_reason(tmp_path, case):
    from shardcut.format.errors import ShardcutError
    from shardcut.plans.plan import Plan
    from shardcut.rewrite.writer import prune

    if case == "jetmoe":  # one count shared by FFN experts and attention (MoA) experts
        src = _tiny_checkpoint(
            tmp_path / "src",
            {"model_type": "jetmoe", "num_hidden_layers": 1, "num_local_experts": 4, "num_experts_per_tok": 2},
            {
                "model.layers.0.mlp.router.layer.weight": np.zeros((4, 8), np.float32),
                "model.layers.0.mlp.input_linear.weight": np.zeros((4, 6, 8), np.float32),
            },
        )
        keep, reason = {"0": [0, 1, 3]}, "attention (MoA) experts"
    else:  # a hash-routed layer fixes each token's experts in gate.tid2eid
        src = _tiny_checkpoint(
            tmp_path / "src",
            {
                "model_type": "deepseek_v4",
                "num_hidden_layers": 2,
                "n_routed_experts": 4,
                "num_experts_per_tok": 2,
                "mlp_layer_types": ["hash_moe", "moe"],
            },
            {
                **{f"layers.{L}.ffn.gate.weight": np.zeros((4, 8), np.float32) for L in range(2)},
                "layers.0.ffn.gate.tid2eid": np.zeros((16, 2), np.int64),
                "layers.1.ffn.gate.bias": np.zeros(4, np.float32),
                **_experts("layers.0.ffn.experts", 4),
                **_experts("layers.1.ffn.experts", 4),
            },
        )
        keep, reason = {"0": [0, 1, 3], "1": [0, 1, 2]}, "MoE layer 0 is hash-routed"
    with pytest.raises(ShardcutError, match=re.escape(reason)):
        prune(src, tmp_path / "out", Plan(keep))
    assert not (tmp_path / "out").exists()


def test_stacks_with_their_own_count_are_validated_separately(families):
    """Qwen3-Omni: thinker and talker keep different counts; within a stack counts must agree.
    ERNIE-VL: text and vision halves share one count, so they must keep as many."""
    from shardcut.format.errors import ShardcutError
    from shardcut.plans.plan import Plan, validate_plan

    omni = families("qwen3_omni_moe")
    info = describe(open_checkpoint(omni.source))
    validate_plan(Plan(omni.keep), info)  # 4 of 8 in the thinker, 3 of 6 in the talker
    uneven = {**omni.keep, "talker.1": omni.keep["talker.1"][:2]}
    with pytest.raises(ShardcutError, match="unequal counts.*talker"):
        validate_plan(Plan(uneven), info)
    ernie = families("ernie4_5_vl_moe")
    info = describe(open_checkpoint(ernie.source))
    lopsided = {k: (ids[:3] if k.startswith("vision.") else ids) for k, ids in ernie.keep.items()}
    with pytest.raises(ShardcutError, match="unequal counts"):
        validate_plan(Plan(lopsided), info)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_inspect_savings_match_the_prune(families, name):
    """`inspect`'s bytes saved per expert removed, times the experts the plan removed, is what the prune saved."""
    from shardcut.ops.summary import inspect_model

    b = families(name)
    report = inspect_model(b.source)
    saved = {layer["key"]: layer["bytes_saved_per_expert_removed"] for layer in report["layers"]}
    expected = sum(saved[k] * (b.family.experts_of(k) - b.family.kept_of(k)) for k in b.family.moe_layers)
    actual = report["total_bytes"] - inspect_model(b.pruned)["total_bytes"]
    assert expected == pytest.approx(actual, abs=len(saved) * E)
