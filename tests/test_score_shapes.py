"""Published scores in every shape `scores import` reads, each checked to give the plan the native
scores give; provenance-aware merge; plan warnings at ties and for scores of another model."""

from __future__ import annotations

import json
import shutil
import sys
import types

import numpy as np
import pytest
from fixtures.scores_fixtures import model_info, mtp_model, random_scores, synthetic_model
from typer.testing import CliRunner

from shardcut.format.checkpoint import layout_fingerprint, open_checkpoint
from shardcut.format.errors import ShardcutError
from shardcut.ops.planning import make_plan
from shardcut.plans.plan import Plan
from shardcut.plans.score_import import import_scores
from shardcut.plans.score_merge import merge_scores
from shardcut.plans.scores import GATE_APPLIED, Scores, provenance
from shardcut.plans.select import criterion_values
from shardcut_cli.main import app

torch = pytest.importorskip("torch")
runner = CliRunner()
E = 8


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """DeepSeek-V3 shaped: MoE layers 1, 2, 3 and MTP layer 4; 8 experts, top-2."""
    base = tmp_path_factory.getbasetemp() / "scores-models"
    return mtp_model(base)


@pytest.fixture(scope="session")
def native(model) -> Scores:
    scores = random_scores(model_info(model), seed=5)
    scores.metadata.update({"model": str(model), **provenance(open_checkpoint(model), GATE_APPLIED)})
    return scores


def _keep(model, scores, criterion=None) -> dict:
    plan, _ = make_plan(model, scores, experts=4, mtp_policy="reuse-last", criterion=criterion)
    return plan.keep


def _observer(native: Scores, keys) -> dict:
    """The native sums as the REAP reference's observer names them, under `keys`."""
    out = {}
    for key, r in zip(keys, range(len(native.layers)), strict=True):
        out[key] = {
            "total_tokens": torch.tensor(int(native.tokens[r])),
            "expert_frequency": torch.tensor(native.count[r]).long(),
            "ean_sum": torch.tensor(native.norm_sum[r]),
            "weighted_ean_sum": torch.tensor(native.reap_sum[r]),
            "weighted_expert_frequency_sum": torch.tensor(native.gate_sum[r]),
            "max_activations": torch.tensor(native.act_max[r]).float(),
        }
    return out


def _shapes(native: Scores) -> dict[str, object]:
    reap = criterion_values(native, "reap")
    t = torch.tensor(reap)
    return {
        "int_keys.pt": {1: t[0], 2: t[1], 3: t[2]},
        "name_keys.pt": {"model.layers.1.mlp": t[0], "model.layers.2.mlp": t[1], "model.layers.3.mlp": t[2]},
        "wrapped_scores.pt": {"scores": {"1": t[0], "2": t[1], "3": t[2]}, "criterion": "reap"},
        "wrapped_layers.pt": {"layers": [t[0], t[1], t[2]], "metric": "reap"},
        "stacked.pt": t,
        "stat_dicts.pt": {1: {"reap": t[0]}, 2: {"reap": t[1]}, 3: {"reap": t[2]}},
        "positions.pt": {0: t[0], 1: t[1], 2: t[2]},  # counted from the first MoE layer
    }


def test_every_torch_shape_gives_the_native_plan(model, native, tmp_path):
    want = _keep(model, native)
    for name, obj in _shapes(native).items():
        path = tmp_path / f"reap_{name}"  # the criterion word in the file name names bare values
        torch.save(obj, path)
        scores, report = import_scores(path, model)
        assert _keep(model, scores) == want, name
        if name == "positions.pt":
            assert any("read as positions" in n and "0 -> 1" in n for n in report.notes)
    # observer sums under every key spelling: a full, mergeable score file
    for keys in ((1, 2, 3), ("1", "2", "3"), ("model.layers.1", "model.layers.2", "model.layers.3"), (0, 1, 2)):
        torch.save(_observer(native, keys), tmp_path / "obs.pt")
        scores, _ = import_scores(tmp_path / "obs.pt", model)
        assert scores.has_sums and _keep(model, scores) == want
        np.testing.assert_allclose(scores.reap_sum, native.reap_sum)


def test_layer_offset_and_unnamed_values(model, native, tmp_path):
    t = torch.tensor(criterion_values(native, "reap"))
    torch.save({0: t[0], 1: t[1], 2: t[2]}, tmp_path / "scores.pt")
    with pytest.raises(ShardcutError, match="does not name its criterion"):
        import_scores(tmp_path / "scores.pt", model)
    scores, report = import_scores(tmp_path / "scores.pt", model, criterion="reap", layer_offset=1)
    assert _keep(model, scores) == _keep(model, native) and "+1 added" in report.notes[0]
    with pytest.raises(ShardcutError, match=r"layers \['4'\] are not MoE layers|no scores"):
        import_scores(tmp_path / "scores.pt", model, criterion="reap", layer_offset=2)


def test_accumulator_checkpoints_with_running_mean_trackers(model, native, tmp_path):
    """The reference's layer-wise `block_NNN_metrics.pt` hold OnlineStatsTracker objects: read with
    weights_only=True through a stand-in class, never the reference's own code."""
    module = types.ModuleType("reap.metrics")

    class OnlineStatsTracker:  # the reference's fields, for pickling only
        def __init__(self, mean):
            self.shape, self.count_shape, self.device, self.dtype = (E,), 1, torch.device("cpu"), torch.float32
            self.count, self.mean, self.mean_compensation = torch.zeros(1, dtype=torch.long), mean, torch.zeros(E)

    OnlineStatsTracker.__module__, OnlineStatsTracker.__qualname__ = "reap.metrics", "OnlineStatsTracker"
    module.OnlineStatsTracker = OnlineStatsTracker
    saved = {k: sys.modules.get(k) for k in ("reap", "reap.metrics")}
    sys.modules["reap"], sys.modules["reap.metrics"] = types.ModuleType("reap"), module
    folder = tmp_path / "layerwise"
    folder.mkdir()
    try:
        torch.save({}, folder / "block_000_metrics.pt")  # the dense layer
        for key, stats in _observer(native, (1, 2, 3)).items():
            stats["reap"] = OnlineStatsTracker(torch.rand(E))
            torch.save(stats, folder / f"block_{key:03d}_metrics.pt")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    scores, report = import_scores(folder, model)
    assert report.format == "reap-accumulators" and scores.has_sums
    assert _keep(model, scores) == _keep(model, native)


def test_json_reports(model, native, tmp_path):
    reap, freq = criterion_values(native, "reap"), native.count
    path = tmp_path / "report.json"  # llm-compressor's REAPPruningModifier report: layers in order
    path.write_text(json.dumps({"saliency": reap.tolist(), "count": freq.tolist(), "topk_weights": [[[0.5, 0.5]]]}))
    scores, report = import_scores(path, model)
    assert report.format == "llm-compressor" and set(scores.values) == {"reap", "frequency"}
    assert _keep(model, scores, "reap") == _keep(model, native)
    assert _keep(model, scores, "frequency") == _keep(model, native, "frequency")
    kept = _keep(model, native)
    meta = tmp_path / "pruning_metadata.json"  # a pruned model's record of what it kept
    meta.write_text(
        json.dumps(
            {
                "original_model": "org/m",
                "experts_kept_per_layer": {f"model.layers.{k}": v for k, v in kept.items() if k != "4"},
            }
        )
    )
    scores, report = import_scores(meta, model)
    assert report.format == "keep-list" and _keep(model, scores, "keep") == kept


def test_layer_names_from_the_architecture_table(families, tmp_path):
    """Nemotron-H (`backbone.layers.N.mixer`) and DBRX (`transformer.blocks.N.ffn`) key names."""
    for fam, spell in (("nemotron_h", "backbone.layers.{}.mixer"), ("dbrx", "transformer.blocks.{}.ffn")):
        src = families(fam).source
        info = model_info(src)
        keys = [layer.key for layer in info.layers]
        rng = np.random.default_rng(1)
        values = {spell.format(k): torch.tensor(rng.random(info.num_experts)) for k in keys}
        torch.save(values, tmp_path / f"{fam}_reap.pt")
        scores, _ = import_scores(tmp_path / f"{fam}_reap.pt", src)
        assert scores.layers == keys
        np.testing.assert_allclose(scores.values["reap"][0], values[spell.format(keys[0])].numpy())


def test_a_shape_with_two_readings_is_refused(tmp_path):
    square = synthetic_model(
        tmp_path,
        "square",
        layers=8,
        first_dense=0,
        experts=8,
        top_k=2,
        shards=1,
        hidden=16,
        moe_inter=8,
        dense_inter=16,
        vocab=32,
    )
    m = torch.rand(8, 8)
    torch.save(m, tmp_path / "reap.pt")
    with pytest.raises(ShardcutError, match=r"reads both as \[layers, experts\] and as \[experts, layers\]"):
        import_scores(tmp_path / "reap.pt", square)
    rows, _ = import_scores(tmp_path / "reap.pt", square, layout="layers-experts")
    cols, report = import_scores(tmp_path / "reap.pt", square, layout="experts-layers")
    np.testing.assert_allclose(rows.values["reap"], m.double().numpy())
    np.testing.assert_allclose(cols.values["reap"], m.double().numpy().T)


# -- merge with provenance ----------------------------------------------------------------------------


def test_merge_refuses_softmax_gates_with_applied_gates(model, native, tmp_path):
    torch.save(_observer(native, (1, 2, 3)), tmp_path / "observations.pt")
    imported, _ = import_scores(tmp_path / "observations.pt", model)
    assert imported.metadata["gate_convention"] == "softmax-logits"
    with pytest.raises(ShardcutError, match="weight their gate sums differently"):
        merge_scores([(native, 1.0), (imported, 1.0)])
    merged = merge_scores([(native, 1.0), (imported, 1.0)], force=True)
    caveats = json.loads(merged.metadata["caveats"])
    assert merged.metadata["gate_convention"] == "mixed" and any("gate conventions" in c for c in caveats)
    assert any("signed max" in c for c in caveats)  # the imported file's caveat survives
    native.save(tmp_path / "n.safetensors")
    imported.save(tmp_path / "i.safetensors")
    args = [
        "scores",
        "merge",
        str(tmp_path / "n.safetensors"),
        str(tmp_path / "i.safetensors"),
        "-o",
        str(tmp_path / "m.safetensors"),
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "gate sums differently" in r.output and not (tmp_path / "m.safetensors").exists()
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    assert "caveats" in Scores.load(tmp_path / "m.safetensors").metadata


def test_merge_identifies_the_model_by_fingerprint_not_name(model, native, tmp_path):
    copy = tmp_path / "renamed-local-copy"
    shutil.copytree(model, copy)
    assert layout_fingerprint(open_checkpoint(copy)) == native.metadata["model_fingerprint"]
    other = Scores(**{**vars(native), "metadata": {**native.metadata, "model": "org/Some-Hub-Name"}})
    local = Scores(**{**vars(native), "metadata": {**native.metadata, "model": str(copy)}})
    merge_scores([(other, 1.0), (local, 1.0)])  # names differ, fingerprints agree
    changed = Scores(**{**vars(native), "metadata": {**native.metadata, "model_fingerprint": "layout-sha256:0"}})
    with pytest.raises(ShardcutError, match="model_fingerprint"):
        merge_scores([(native, 1.0), (changed, 1.0)])


# -- plan warnings ------------------------------------------------------------------------------------


def test_tie_warning_on_never_routed_experts(model, native, tmp_path):
    scores = Scores(**{**vars(native), "metadata": dict(native.metadata)})
    for name in ("count", "gate_sum", "norm_sum", "reap_sum", "act_max"):
        arr = getattr(scores, name).copy()
        arr[1, :6] = 0.0  # layer 2: six experts never routed, four must go
        setattr(scores, name, arr)
    plan, report = make_plan(model, scores, experts=4, mtp_policy="reuse-last")
    row = next(r for r in report.rows if r.layer == "2")
    assert plan.keep["2"][:2] == [0, 1] and row.decided_by_id == 6 and row.never_routed_at_cut == 6
    assert row.tie_value == 0.0 and row.lowest_kept == row.highest_pruned == 0.0
    assert any(
        "layer 2: the cut falls among 6 experts with zero scores, 6 of them never routed" in w for w in report.warnings
    )
    plan.save(tmp_path / "plan.json")
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["decided_by_id_order"] >= 6 and any("never routed" in w for w in saved["warnings"])
    assert Plan.load(tmp_path / "plan.json").keep == plan.keep
    clean, clean_report = make_plan(model, native, experts=4, mtp_policy="reuse-last")
    assert not clean_report.warnings and "warnings" not in clean.extra
    scores.save(tmp_path / "s.safetensors")
    r = runner.invoke(
        app,
        [
            "plan",
            str(model),
            "--scores",
            str(tmp_path / "s.safetensors"),
            "--experts",
            "4",
            "--mtp-policy",
            "reuse-last",
        ],
    )
    assert r.exit_code == 0 and "warning:" in r.output and "never routed" in r.output


def test_plan_warns_for_scores_of_another_model(model, native, tmp_path):
    other = synthetic_model(
        tmp_path,
        "other",
        layers=4,
        first_dense=1,
        experts=8,
        top_k=2,
        mtp_layers=1,
        shards=2,
        hidden=32,
        moe_inter=8,
        dense_inter=16,
        vocab=32,
    )  # same layers and experts, other shapes
    _, report = make_plan(other, native, experts=4, mtp_policy="reuse-last")
    assert any("computed on another model" in w and "model_fingerprint" in w for w in report.warnings)
    _, same = make_plan(model, native, experts=4, mtp_policy="reuse-last")
    assert not same.warnings


def test_super_expert_rule_is_configurable_and_recorded(model, native):
    scores = Scores(**{**vars(native), "metadata": dict(native.metadata)})
    act = scores.act_max.copy()
    act[2, 5] = 1000.0  # an outlier in the last scored layer
    scores.act_max = act
    plan, report = make_plan(model, scores, experts=4, mtp_policy="reuse-last", protect_super_experts=True)
    assert "super_experts" in plan.extra and plan.extra["super_experts"]["layer_fraction"] == 0.75
    assert "3" not in plan.extra.get("protected", {})  # the last layer is outside the first 75%
    plan, _ = make_plan(
        model,
        scores,
        experts=4,
        mtp_policy="reuse-last",
        protect_super_experts=True,
        super_layer_fraction=1.0,
        super_percentile=90.0,
    )
    assert 5 in plan.extra["protected"]["3"] and plan.extra["super_experts"]["percentile"] == 90.0
    with pytest.raises(ShardcutError, match="layer fraction"):
        make_plan(model, scores, experts=4, mtp_policy="reuse-last", protect_super_experts=True, super_layer_fraction=0)
