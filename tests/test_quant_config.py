"""Quantized checkpoints: companions travel with their expert, configs naming experts are renumbered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardcut.format.checkpoint import open_checkpoint
from shardcut.format.errors import ShardcutError
from shardcut.ops.synthetic import SyntheticSpec, write_synthetic_checkpoint
from shardcut.ops.verification import verify
from shardcut.plans.plan import Plan
from shardcut.rewrite.writer import prune

SPEC = SyntheticSpec(layers=3, experts=8, top_k=2, hidden=64, moe_inter=32, int4=True, shards=3)
KEEP = {"1": [0, 2, 3, 7], "2": [1, 2, 5, 6]}
P = "model.layers"


@pytest.fixture
def int4(tmp_path) -> Path:
    return write_synthetic_checkpoint(tmp_path / "int4", SPEC)


def set_quant(ckpt: Path, **fields) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"].update(fields)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def raw(entry) -> bytes:
    shard, t = entry
    with open(shard.path, "rb") as f:
        f.seek(t.start)
        return f.read(t.nbytes)


def test_int4_companions_travel_with_their_expert(int4, tmp_path):
    out = tmp_path / "out"
    prune(int4, out, Plan(KEEP))
    assert verify(out, source=int4).ok
    src, dst = open_checkpoint(int4).tensors, open_checkpoint(out).tensors
    for layer, kept in KEEP.items():
        for new, old in enumerate(kept):
            for proj in ("gate_proj", "down_proj"):
                for suffix in ("weight_packed", "weight_scale", "weight_shape"):
                    a = f"{P}.{layer}.mlp.experts.{old}.{proj}.{suffix}"
                    b = f"{P}.{layer}.mlp.experts.{new}.{proj}.{suffix}"
                    assert raw(src[a]) == raw(dst[b])
        assert f"{P}.{layer}.mlp.experts.4.gate_proj.weight_packed" not in dst


def test_ignore_lists_and_targets_are_renumbered(int4, tmp_path):
    set_quant(
        int4,
        ignore=[
            "lm_head",
            f"{P}.1.mlp.gate",
            f"{P}.1.mlp.experts.4.down_proj",
            f"re:{P}\\.2\\.mlp\\.experts\\.5\\.up_proj$",
        ],
        modules_to_not_convert=[f"{P}.2.mlp.experts.3.gate_proj"],
    )
    cfg = json.loads((int4 / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_1"] = {"targets": [f"{P}.1.mlp.experts.7.up_proj"]}
    (int4 / "config.json").write_text(json.dumps(cfg))
    # Expert 5 of layer 2 excluded alone would give that layer two schemes: exclude all its kept experts.
    set_quant(
        int4,
        ignore=["lm_head", f"{P}.1.mlp.gate", f"{P}.1.mlp.experts.4.down_proj"]
        + [f"re:{P}\\.2\\.mlp\\.experts\\.{e}\\.up_proj$" for e in KEEP["2"]],
    )
    out = tmp_path / "out"
    prune(int4, out, Plan(KEEP))
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["ignore"] == ["lm_head", f"{P}.1.mlp.gate"] + [
        f"re:{P}\\.2\\.mlp\\.experts\\.{e}\\.up_proj$" for e in range(4)
    ]
    assert q["modules_to_not_convert"] == []  # expert 3 of layer 2 was pruned
    assert q["config_groups"]["group_1"]["targets"] == [f"{P}.1.mlp.experts.3.up_proj"]
    assert (
        q["config_groups"]["group_0"]
        == json.loads((int4 / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    )  # a generic regex stays as it is


def test_partly_excluded_layer_is_refused(int4, tmp_path):
    set_quant(int4, ignore=[f"{P}.1.mlp.experts.2.down_proj"])
    with pytest.raises(ShardcutError, match=r"layer 1: experts \[1\] \(down_proj\) are excluded .* expert 0"):
        prune(int4, tmp_path / "out", Plan(KEEP))
    assert not (tmp_path / "out").exists()


def test_regex_with_expert_range_is_refused(int4, tmp_path):
    set_quant(int4, ignore=[f"re:{P}\\.1\\.mlp\\.experts\\.(1[0-9])\\.down_proj"])
    with pytest.raises(ShardcutError, match="cannot be renumbered mechanically"):
        prune(int4, tmp_path / "out", Plan(KEEP))


def test_modelopt_side_file_and_gptq_dynamic(int4, tmp_path):
    (int4 / "hf_quant_config.json").write_text(
        json.dumps(
            {
                "quantization": {
                    "quant_algo": "MIXED_PRECISION",
                    "quantized_layers": {f"{P}.1.mlp.experts.{e}.down_proj": {"quant_algo": "NVFP4"} for e in range(8)},
                }
            }
        )
    )
    set_quant(int4, dynamic={f"-:{P}\\.2\\.mlp\\.experts\\.{e}\\.gate_proj": {} for e in range(8)})
    out = tmp_path / "out"
    prune(int4, out, Plan(KEEP))
    side = json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quantized_layers"]
    assert sorted(side) == sorted(f"{P}.1.mlp.experts.{e}.down_proj" for e in range(4))
    dynamic = json.loads((out / "config.json").read_text())["quantization_config"]["dynamic"]
    assert sorted(dynamic) == sorted(f"-:{P}\\.2\\.mlp\\.experts\\.{e}\\.gate_proj" for e in range(4))
