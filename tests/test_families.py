"""Pruning every supported family is right: the DESIGN.md logits oracle, plus direct checks of
the files (transformers loads gapped expert numbering silently, so logits alone are not enough).

Expected outputs are derived from the source bytes and the layout facts in
tests/fixtures/families.py, never from shardcut's own architecture table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures.families import COUNT_NAMES, FAMILY_NAMES, KEPT, LOGIT_DIFFS, SIDE_FILES, TOP_K, E, Family, load
from safetensors import safe_open

from shardcut.checkpoint import open_checkpoint
from shardcut.model import describe

INDEX = "model.safetensors.index.json"


def read_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (shard file name, array) for every tensor the index lists."""
    index = json.loads((path / INDEX).read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(path / shard, "numpy") as f:
            out.update({k: (shard, f.get_tensor(k)) for k in f.keys()})
    return out


def expected_layout(fam: Family, keep: dict[str, list[int]], names) -> dict[str, tuple[str, int | None, str]]:
    """Pruned tensor name -> (source name, sliced axis or None, plan key) under `keep`."""
    out = {}
    for name in names:
        key = next((k for k, p in fam.moe_layers.items() if name.startswith(p)), None)
        if key is None:
            out[name] = (name, None, "")
            continue
        prefix = fam.moe_layers[key]
        rel = name[len(prefix):]
        if rel in fam.rows or rel in fam.cols:
            out[name] = (name, 0 if rel in fam.rows else 1, key)
        elif fam.experts and rel.startswith(fam.experts + "."):
            expert, rest = rel[len(fam.experts) + 1:].split(".", 1)
            if int(expert) in keep[key]:
                out[f"{prefix}{fam.experts}.{keep[key].index(int(expert))}.{rest}"] = (name, None, key)
        else:
            out[name] = (name, None, key)
    return out


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_table_describes_family(families, name):
    b = families(name)
    info = describe(open_checkpoint(b.source))
    assert [layer.key for layer in info.layers] == list(b.family.moe_layers)
    assert [layer.prefix for layer in info.layers] == list(b.family.moe_layers.values())
    assert (info.num_experts, info.top_k, info.n_group) == (E, TOP_K, b.family.n_group)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_pruned_logits_equal_masked_original(families, name):
    torch = pytest.importorskip("torch")
    from shardcut.oracle import forbid_pruned_experts

    b = families(name)
    small, loading = load(b.family, b.pruned)
    assert not loading["missing_keys"] and not loading["mismatched_keys"], loading
    mtp = b.family.mtp_copy[1] if b.family.mtp_copy else None
    assert all(mtp and k.startswith(mtp) for k in loading["unexpected_keys"]), loading["unexpected_keys"]

    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        base = b.model(ids).logits
        with forbid_pruned_experts(b.model, b.keep, E) as masked_routers:
            masked = b.model(ids).logits
        got = small(ids).logits
        again = b.model(ids).logits
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
        for rel in fam.rows + fam.cols:
            assert prefix + rel in src, f"{prefix + rel} not in the source checkpoint"
        if fam.experts:
            found = {n[len(prefix + fam.experts) + 1:].split(".")[0] for n in src if n.startswith(prefix + fam.experts + ".")}
            assert found >= {str(e) for e in range(E)}, (key, found)
    assert any(len({s for n, (s, _) in src.items() if n.startswith(p)}) > 1 for p in fam.moe_layers.values()), \
        "no MoE layer straddles two source shards"

    expected = expected_layout(fam, keep, src)
    assert set(out) == set(expected)
    for new_name, (old_name, axis, key) in expected.items():
        old, new = src[old_name][1], out[new_name][1]
        want = old if axis is None else np.take(old, keep[key], axis=axis)
        assert new.dtype == want.dtype and new.shape == want.shape, new_name
        assert new.tobytes() == want.tobytes(), f"{new_name} differs from {old_name}"
    if fam.experts:
        for key, prefix in fam.moe_layers.items():
            ids = {int(n[len(prefix + fam.experts) + 1:].split(".")[0]) for n in out
                   if n.startswith(prefix + fam.experts + ".") and n[len(prefix + fam.experts) + 1].isdigit()}
            assert ids == set(range(KEPT)), f"layer {key}: expert ids {sorted(ids)}"


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
    counts = {p for p, v in src.items() if p[-1] in COUNT_NAMES and v == E}
    assert counts, "no expert count found in the source config"
    for path, value in src.items():
        assert out[path] == (KEPT if path in counts else value), ".".join(path)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_index_and_side_files(families, name):
    b = families(name)
    index = json.loads((b.pruned / INDEX).read_text())
    tensors = read_tensors(b.pruned)
    shard_files = sorted(p.name for p in b.pruned.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == shard_files and len(shard_files) > 1
    held = {}
    for shard in shard_files:
        with safe_open(b.pruned / shard, "numpy") as f:
            held.update(dict.fromkeys(f.keys(), shard))
    assert index["weight_map"] == held
    assert index["metadata"]["total_size"] == sum(a.nbytes for _, a in tensors.values())
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
