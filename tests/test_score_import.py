"""Importers (shardcut.plans.score_import): REAP observer .pt, JSON saliency reports, keep-lists; `scores import`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures.scores_fixtures import mtp_model
from typer.testing import CliRunner

from shardcut.format.errors import ShardcutError
from shardcut.ops.planning import make_plan
from shardcut.plans.score_import import import_scores
from shardcut.plans.score_merge import merge_scores
from shardcut.plans.scores import Scores
from shardcut.plans.select import criterion_values
from shardcut_cli.main import app

runner = CliRunner()
E = 8
OBSERVER_KEYS = ("expert_frequency", "ean_sum", "weighted_ean_sum", "weighted_expert_frequency_sum", "max_activations")


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """DeepSeek-V3 shaped: MoE layers 1, 2, 3 and MTP layer 4; 8 experts, top-2."""
    base = tmp_path_factory.getbasetemp() / "scores-models"
    return mtp_model(base)


def observer_state(layers=(1, 2, 3), experts=E, seed=0) -> dict:
    """What the REAP reference's observer saves: {layer_index: {statistic: tensor}}."""
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in layers:
        freq = torch.randint(0, 50, (experts,), generator=g)
        state[layer] = {
            "total_tokens": torch.tensor(100),
            "expert_frequency": freq,
            "pairwise_expert_frequency": freq[:, None] + freq[None, :],
            "ean_sum": torch.rand(experts, generator=g, dtype=torch.float64) * freq,
            "ean_mean": torch.rand(experts, generator=g),
            "weighted_ean_sum": torch.rand(experts, generator=g, dtype=torch.float64) * freq,
            "reap": torch.rand(experts, generator=g),
            "weighted_expert_frequency_sum": torch.rand(experts, generator=g, dtype=torch.float64) * freq,
            "max_activations": torch.randn(experts, generator=g) * 5,  # signed, as the reference stores it
            "ttm_similarity_matrix": torch.rand(experts, experts, generator=g),
        }
    return state


def save_pt(path, obj):
    import torch

    torch.save(obj, path)
    return path


def test_reap_observer_maps_every_statistic(model, tmp_path):
    state = observer_state()
    state[2]["max_activations"][3] = -2.5  # a negative signed max
    scores, report = import_scores(save_pt(tmp_path / "observations_8_cosine-seed_42.pt", state), model)
    assert report.format == "reap-observer" and scores.layers == ["1", "2", "3"] and scores.has_sums
    for r, layer in enumerate((1, 2, 3)):
        st = state[layer]
        np.testing.assert_array_equal(scores.count[r], st["expert_frequency"].numpy())
        np.testing.assert_allclose(scores.norm_sum[r], st["ean_sum"].numpy())
        np.testing.assert_allclose(scores.reap_sum[r], st["weighted_ean_sum"].numpy())
        np.testing.assert_allclose(scores.gate_sum[r], st["weighted_expert_frequency_sum"].numpy())
        np.testing.assert_allclose(scores.act_max[r], np.maximum(st["max_activations"].double().numpy(), 0))
        assert scores.tokens[r] == 100
    assert scores.act_max[1, 3] == 0.0 and "signed max" in scores.metadata["act_max"]
    reap = criterion_values(scores, "reap")
    freq = state[1]["expert_frequency"].numpy()
    np.testing.assert_allclose(
        reap[0], np.where(freq > 0, state[1]["weighted_ean_sum"].numpy() / np.maximum(freq, 1), 0)
    )
    plan, _ = make_plan(model, scores, ratio=0.25, mtp_policy="reuse-last")
    assert plan.num_experts == 6
    scores.save(tmp_path / "s.safetensors")
    merged = merge_scores([(Scores.load(tmp_path / "s.safetensors"), 1.0), (scores, 1.0)])  # sums merge
    np.testing.assert_allclose(merged.count, 2 * scores.count)


class Payload:
    """An object whose unpickling would run code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_observer_needing_arbitrary_unpickling_is_refused_unrun(model, tmp_path):
    marker = tmp_path / "was-unpickled"
    state = observer_state()
    state[1]["extra"] = Payload(str(marker))
    path = save_pt(tmp_path / "evil.pt", state)
    with pytest.raises(ShardcutError, match=r"needs arbitrary unpickling \(it references io.open") as exc:
        import_scores(path, model)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(str(path))
    assert not marker.exists()
    r = runner.invoke(
        app, ["scores", "import", str(path), "--model", str(model), "-o", str(tmp_path / "s.safetensors")]
    )
    assert r.exit_code == 2 and "arbitrary unpickling" in r.output and len(r.output.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "s.safetensors").exists()


def _only_frequency():
    import torch

    return {i: {"expert_frequency": torch.zeros(8), "total_tokens": 5} for i in (1, 2, 3)}


@pytest.mark.parametrize(
    "make_state, message",
    [
        (lambda: observer_state(experts=16), "16 experts, the model has 8"),
        (
            lambda: observer_state(layers=(0, 2, 3)),
            r"layers \['0'\] are not MoE layers",
        ),  # neither indices nor positions
        (lambda: observer_state(layers=(1, 2)), r"no scores for MoE layers \['3'\]"),
        (_only_frequency, "layer 1: missing statistics"),
        (lambda: [1, 2, 3], "does not name its criterion"),
    ],
)
def test_observer_for_another_model_is_refused(model, tmp_path, make_state, message):
    with pytest.raises(ShardcutError, match=message):
        import_scores(save_pt(tmp_path / "o.pt", make_state()), model)


def test_observer_nan_and_garbage_are_refused(model, tmp_path):
    state = observer_state()
    state[3]["ean_sum"][0] = float("nan")
    with pytest.raises(ShardcutError, match="ean_sum holds NaN"):
        import_scores(save_pt(tmp_path / "nan.pt", state), model)
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file at all" * 3)
    with pytest.raises(ShardcutError, match="not a readable torch file"):
        import_scores(tmp_path / "garbage.pt", model)


def test_saliency_json_values_only(model, tmp_path):
    rng = np.random.default_rng(0)
    values = {f"model.layers.{i}": rng.random(E).round(4).tolist() for i in (1, 2, 3)}
    path = tmp_path / "saliency.json"
    path.write_text(json.dumps({"criterion": "reap", "layers": values}))
    scores, report = import_scores(path, model)
    assert not scores.has_sums and report.criterion == "reap" and "merging is impossible" in report.notes[0]
    np.testing.assert_array_equal(scores.values["reap"][1], values["model.layers.2"])
    plan, _ = make_plan(model, scores, experts=4, mtp_policy="same-ids-as:3")
    assert plan.keep["2"] == sorted(np.argsort(-np.array(values["model.layers.2"]), kind="stable")[:4].tolist())
    with pytest.raises(ShardcutError, match="only imported 'reap' values"):
        make_plan(model, scores, experts=4, criterion="ean", mtp_policy="reuse-last")
    with pytest.raises(ShardcutError, match="merging is impossible"):
        merge_scores([(scores, 1.0), (scores, 1.0)])
    scores.save(tmp_path / "v.safetensors")
    r = runner.invoke(
        app,
        [
            "scores",
            "merge",
            str(tmp_path / "v.safetensors"),
            str(tmp_path / "v.safetensors"),
            "-o",
            str(tmp_path / "m.safetensors"),
        ],
    )
    assert r.exit_code == 2 and "merging is impossible" in r.output


def test_saliency_json_bare_mapping_needs_a_criterion(model, tmp_path):
    path = tmp_path / "bare.json"
    path.write_text(json.dumps({str(i): [0.5] * E for i in (1, 2, 3)}))
    with pytest.raises(ShardcutError, match="does not name its criterion"):
        import_scores(path, model)
    scores, _ = import_scores(path, model, criterion="ean_mean")
    assert list(scores.values) == ["ean_mean"]


def test_saliency_json_with_sums_is_a_full_score_file(model, tmp_path):
    rng = np.random.default_rng(1)
    layers = {}
    for i in (1, 2, 3):
        count = rng.integers(1, 20, E)
        layers[str(i)] = {
            "expert_frequency": count.tolist(),
            "gate_sum": (count * 0.3).tolist(),
            "ean_sum": (count * 2.0).tolist(),
            "reap_sum": (count * 0.5).tolist(),
            "act_max": rng.random(E).tolist(),
            "tokens": 40,
        }
    path = tmp_path / "sums.json"
    path.write_text(json.dumps({"layers": layers}))
    scores, report = import_scores(path, model, fmt="saliency-json")
    assert scores.has_sums and report.has_sums and scores.tokens.tolist() == [40, 40, 40]
    np.testing.assert_allclose(criterion_values(scores, "reap"), 0.5)
    np.testing.assert_allclose(criterion_values(scores, "ean_mean"), 2.0)


@pytest.mark.parametrize(
    "body, message",
    [
        (
            {"criterion": "reap", "layers": {"1": [0.1] * 7, "2": [0.1] * 8, "3": [0.1] * 8}},
            "7 experts, the model has 8",
        ),
        ({"criterion": "reap", "layers": {"1": [0.1] * 8, "2": [0.1] * 8}}, r"no scores for MoE layers \['3'\]"),
        ({"criterion": "reap", "layers": {"9": [0.1] * 8, "1": [0.1] * 8}}, r"layers \['9'\] are not MoE layers"),
        ({"criterion": "reap", "layers": {"1": [-0.1] * 8, "2": [0.1] * 8, "3": [0.1] * 8}}, "negative"),
        ({"criterion": "reap", "layers": {"1": ["x"] * 8, "2": [0.1] * 8, "3": [0.1] * 8}}, "expected a list of 8"),
        ({"criterion": "reap", "layers": [[0.1] * 8] * 5}, r"shape \[5, 8\]; the model has 3 MoE layers"),
        ({"criterion": "reap", "layers": {"layer one": [0.1] * 8}}, "cannot read 'layer one' as a layer"),
    ],
)
def test_bad_saliency_json_is_refused(model, tmp_path, body, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(body))
    with pytest.raises(ShardcutError, match=message):
        import_scores(path, model)


def test_saliency_json_nan_is_refused(model, tmp_path):
    path = tmp_path / "nan.json"
    ones = ", ".join(["1"] * 8)
    path.write_text(
        f'{{"criterion": "reap", "layers": {{"1": [NaN, 1, 1, 1, 1, 1, 1, 1], "2": [{ones}], "3": [{ones}]}}}}'
    )
    with pytest.raises(ShardcutError, match="NaN"):
        import_scores(path, model)
    path.write_text("{not json")
    with pytest.raises(ShardcutError, match="not valid JSON"):
        import_scores(path, model)


def test_keep_list_reproduces_the_published_choice(model, tmp_path):
    kept = {"1": [0, 2, 5, 7], "2": [1, 2, 3, 4], "3": [0, 1, 6, 7]}
    path = tmp_path / "keep.json"
    path.write_text(json.dumps({"kept_experts": kept}))
    scores, report = import_scores(path, model)
    assert report.format == "keep-list" and list(scores.values) == ["keep"]
    plan, _ = make_plan(model, scores, experts=4, criterion="keep", mtp_policy="same-ids-as:3")
    assert plan.keep == {**kept, "4": kept["3"]}
    pruned = {k: sorted(set(range(E)) - set(v)) for k, v in kept.items()}
    path.write_text(json.dumps({"pruned_experts": pruned}))
    plan2, _ = make_plan(model, import_scores(path, model)[0], experts=4, criterion="keep", mtp_policy="reuse-last")
    assert {k: plan2.keep[k] for k in kept} == kept
    path.write_text(json.dumps(kept))  # a bare mapping of short id lists
    assert import_scores(path, model)[1].format == "keep-list"
    path.write_text(json.dumps({"1": [0, 9], "2": [1], "3": [2]}))
    with pytest.raises(ShardcutError, match=r"expert ids \[9\] out of range"):
        import_scores(path, model)


def test_import_command(model, tmp_path):
    pt = save_pt(tmp_path / "observations.pt", observer_state())
    out = tmp_path / "s.safetensors"
    r = runner.invoke(app, ["scores", "import", str(pt), "--model", str(model), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["format"] == "reap-observer" and data["layers"] == ["1", "2", "3"] and data["has_sums"]
    s = Scores.load(out)
    assert s.metadata["num_experts"] == "8" and s.metadata["imported_from"] == "reap-observer:observations.pt"
    r = runner.invoke(app, ["plan", str(model), "--scores", str(out), "--ratio", "0.5"])
    assert r.exit_code == 2 and "4 (MTP)" in r.output  # MTP layer 4 is never guessed
    r = runner.invoke(app, ["plan", str(model), "--scores", str(out), "--ratio", "0.5", "--mtp-policy", "reuse-last"])
    assert r.exit_code == 0 and "layer 4 has no scores, ranked with the scores of layer 3" in r.output
    r = runner.invoke(
        app, ["scores", "import", str(pt), "--model", str(model), "-o", str(tmp_path / "x"), "--format", "csv"]
    )
    assert r.exit_code == 2 and "unknown import format" in r.output


def test_keep_list_through_the_cli_uses_its_own_criterion(model, tmp_path):
    kept = {"1": [0, 2, 5, 7], "2": [1, 2, 3, 4], "3": [0, 1, 6, 7]}
    (tmp_path / "keep.json").write_text(json.dumps({"keep": kept}))
    out = tmp_path / "k.safetensors"
    r = runner.invoke(app, ["scores", "import", str(tmp_path / "keep.json"), "-m", str(model), "-o", str(out)])
    assert r.exit_code == 0 and "keep-list" in r.output and "merging is impossible" in r.output
    r = runner.invoke(app, ["scores", "show", str(out), "--json"])
    assert json.loads(r.output)["criterion"] == "keep" and json.loads(r.output)["layers"][0]["tokens"] is None
    r = runner.invoke(
        app, ["plan", str(model), "-s", str(out), "--experts", "4", "--mtp-policy", "same-ids-as:3", "--json"]
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["plan"]["criterion"] == "keep" and data["plan"]["keep"] == {**kept, "4": kept["3"]}
    r = runner.invoke(
        app, ["plan", str(model), "-s", str(out), "--experts", "4", "-c", "reap", "--mtp-policy", "reuse-last"]
    )
    assert r.exit_code == 2 and "use --criterion keep" in r.output
