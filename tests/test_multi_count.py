"""Models whose MoE stacks have their own expert counts (Qwen3-Omni: thinker 8 experts, talker 6):
score files holding both stacks, plans rounded per count group, the prune report, plan.json,
the logits oracle and the pushed card's numbers.

Expected values come from the fixture's facts (tests/fixtures/families.py: talker 6 experts)
and from hand-made scores, never from shardcut's own selection.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from fixtures.families import COUNT_NAMES, load
from fixtures.hub_fixtures import FakeHubApi, set_token
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from shardcut.format.checkpoint import open_checkpoint
from shardcut.format.container import read_header
from shardcut.format.errors import ShardcutError
from shardcut.moe.model import describe
from shardcut.ops.planning import make_plan
from shardcut.plans.plan import Plan, validate_plan
from shardcut.plans.score_merge import merge_scores
from shardcut.plans.scores import Scores
from shardcut_cli.main import app

THINKER, TALKER = "thinker_config.text_config", "talker_config.text_config"
KEYS, COUNTS = ["0", "1", "talker.0", "talker.1"], [8, 8, 6, 6]
runner = CliRunner()


def hand_scores(seed: int = 0) -> tuple[Scores, dict[str, list[float]]]:
    """Scores for both stacks, each layer's reap values a distinct shuffle of 1..E (no ties)."""
    s = Scores.zeros(KEYS, COUNTS, {"model": "tiny-omni"})
    rng = np.random.default_rng(seed)
    reap = {}
    for r, (key, E) in enumerate(zip(KEYS, COUNTS, strict=True)):
        reap[key] = (rng.permutation(E) + 1.0).tolist()
        s.count[r, :E] = rng.integers(3, 40, E)
        s.reap_sum[r, :E] = s.count[r, :E] * np.array(reap[key])
        s.gate_sum[r, :E] = s.count[r, :E] * 0.4
        s.norm_sum[r, :E] = s.count[r, :E] * 2.5
        s.act_max[r, :E] = rng.random(E) + 0.5
        s.tokens[r] = s.count[r].sum() / 2
    return s, reap


def best(values: list[float], kept: int) -> list[int]:
    return sorted(sorted(range(len(values)), key=lambda i: -values[i])[:kept])


def squash(text: str) -> str:
    return " ".join(text.split())  # rich wraps long titles at the terminal width


@pytest.fixture(scope="module")
def omni(families):
    return families("qwen3_omni_moe")


@pytest.fixture(scope="module")
def planned(omni, tmp_path_factory):
    """Hand-made scores -> plan at ratio 0.5 -> pruned checkpoint (the library calls)."""
    from shardcut.rewrite.writer import prune

    root = tmp_path_factory.mktemp("omni-multi")
    scores, reap = hand_scores(seed=5)
    scores.save(root / "scores.safetensors")
    plan, report = make_plan(omni.source, root / "scores.safetensors", ratio=0.5)
    plan.save(root / "plan.json")
    result = prune(omni.source, root / "pruned", plan)
    return root, reap, plan, report, result


# ---------------------------------------------------------------------------------------------
# Score files


def test_score_file_holds_each_layers_own_count(tmp_path):
    s, _ = hand_scores()
    assert s.count.shape == (4, 8) and s.experts_of("talker.0") == 6 and s.experts_per_row == COUNTS
    with pytest.raises(ValueError, match="0..5"):
        s.accumulate("talker.1", [6], [1.0], [1.0], [1.0])
    s.save(tmp_path / "s.safetensors")
    raw = read_header(tmp_path / "s.safetensors").metadata
    assert raw["layer_experts"] == "8,8,6,6" and raw["num_experts"] == "8"
    assert load_file(str(tmp_path / "s.safetensors"))["count"].shape == (4, 8)  # one [L, E] array per name
    back = Scores.load(tmp_path / "s.safetensors")
    assert back.layer_experts == COUNTS and "layer_experts" not in back.metadata
    np.testing.assert_array_equal(back.reap_sum, s.reap_sum)
    assert back.sha256() == s.sha256()
    # one count per layer, all equal, is a plain single-count file, byte for byte
    assert Scores.zeros(["1", "2"], [8, 8]).to_bytes() == Scores.zeros(["1", "2"], 8).to_bytes()
    assert "layer_experts" not in Scores.zeros(["1", "2"], 8).file_metadata()
    values = Scores.from_values(KEYS, {"reap": s.reap_sum}, layer_experts=COUNTS)
    assert values.experts_of("talker.1") == 6 and not values.has_sums


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t, m: t["count"].__setitem__((2, 7), 1.0), "count holds a value for expert 7 of layer talker.0"),
        (lambda t, m: m.__setitem__("layer_experts", "8,8,6"), "3 counts for 4 layers"),
        (lambda t, m: m.__setitem__("layer_experts", "8,8,six,6"), "not a comma-separated list"),
        (lambda t, m: m.__setitem__("layer_experts", "6,6,6,6"), "6 at most, but the arrays hold 8"),
        (lambda t, m: m.__setitem__("layer_experts", "8,8,0,6"), "counts in 1..8"),
    ],
)
def test_bad_per_layer_counts_are_refused(tmp_path, edit, message):
    s, _ = hand_scores()
    s.save(tmp_path / "s.safetensors")
    tensors = load_file(str(tmp_path / "s.safetensors"))
    meta = dict(read_header(tmp_path / "s.safetensors").metadata)
    edit(tensors, meta)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ShardcutError, match=re.escape(message)):
        Scores.load(tmp_path / "bad.safetensors")


def test_padding_is_refused_before_writing(tmp_path):
    s, _ = hand_scores()
    s.act_max[3, 6] = 2.0
    with pytest.raises(ShardcutError, match="act_max holds a value for expert 6 of layer talker.1"):
        s.save(tmp_path / "s.safetensors")
    assert not list(tmp_path.iterdir())


def test_merge_keeps_each_layers_count():
    a, _ = hand_scores(1)
    b, _ = hand_scores(2)
    merged = merge_scores([(a, 1.0), (b, 2.0)])
    assert merged.layer_experts == COUNTS
    np.testing.assert_allclose(merged.count, a.count + 2 * b.count)
    other = Scores.zeros(KEYS, [8, 8, 7, 7])
    with pytest.raises(ShardcutError, match="layer talker.0 has 7 experts, in input 1 6"):
        merge_scores([(a, 1.0), (other, 1.0)])


def test_show_lists_each_layers_own_experts(tmp_path):
    s, _ = hand_scores()
    s.count[2, 5] = s.gate_sum[2, 5] = s.norm_sum[2, 5] = s.reap_sum[2, 5] = s.act_max[2, 5] = 0  # never routed
    s.save(tmp_path / "s.safetensors")
    r = runner.invoke(app, ["scores", "show", str(tmp_path / "s.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["num_experts"] == 8 and data["layer_experts"] == COUNTS
    rows = {row["layer"]: row for row in data["layers"]}
    assert rows["talker.0"]["experts"] == 6 and rows["talker.0"]["never_routed"] == [5]  # not the padding 6, 7
    assert rows["0"]["never_routed"] == [] and rows["talker.1"]["lowest"][0][1] > 0  # padding is never "lowest"
    r = runner.invoke(app, ["scores", "show", str(tmp_path / "s.safetensors")])
    assert r.exit_code == 0 and "4 layers x 8 or 6 experts" in squash(r.output)


# ---------------------------------------------------------------------------------------------
# Plans: per count group


def test_ratio_rounds_per_count_group(omni):
    s, reap = hand_scores(seed=3)
    plan, report = make_plan(omni.source, s, ratio=0.3)  # floor(8 x 0.3) = 2, floor(6 x 0.3) = 1
    assert {k: len(v) for k, v in plan.keep.items()} == {"0": 6, "1": 6, "talker.0": 5, "talker.1": 5}
    assert all(plan.keep[k] == best(reap[k], len(plan.keep[k])) for k in KEYS)
    assert (report.num_experts, report.kept, report.pruned) == (8, 6, 2)
    assert {n: (g["num_experts"], g["kept"], g["pruned"]) for n, g in report.by_config.items()} == {
        THINKER: (8, 6, 2),
        TALKER: (6, 5, 1),
    }
    assert "floor(8 x 0.3) = 2" in report.rule and "floor(6 x 0.3) = 1" in report.rule
    assert [row.pruned for row in report.rows] == [2, 2, 1, 1]
    assert plan.extra["num_experts_by_config"] == {THINKER: 6, TALKER: 5} and "experts" not in plan.extra
    with pytest.raises(ShardcutError, match=f"{TALKER} \\(6 experts per layer, top_k=2\\): ratio 0.15 removes no"):
        make_plan(omni.source, s, ratio=0.15)  # floor(6 x 0.15) = 0


def test_experts_keeps_one_count_in_every_stack_or_says_where_it_cannot(omni, tmp_path):
    s, reap = hand_scores(seed=4)
    plan, report = make_plan(omni.source, s, experts=4)
    assert all(plan.keep[k] == best(reap[k], 4) for k in KEYS)
    assert plan.extra["experts"] == 4 and plan.num_experts == 4
    with pytest.raises(ShardcutError, match=f"{TALKER} .*experts 6 must be below the model's 6.*keeps N in every"):
        make_plan(omni.source, s, experts=6)
    s.save(tmp_path / "s.safetensors")
    r = runner.invoke(app, ["plan", str(omni.source), "--scores", str(tmp_path / "s.safetensors"), "--experts", "7"])
    assert r.exit_code == 2 and TALKER in squash(r.output)


def test_scores_without_per_layer_counts_are_refused(omni):
    flat = Scores.zeros(KEYS, 8)  # a talker row of 8 experts: scores of another model, or padding unrecorded
    flat.count[:] = 1.0
    with pytest.raises(ShardcutError, match="layer talker.0: holds scores of 8 experts, the model's layer has 6"):
        make_plan(omni.source, flat, ratio=0.5)


# ---------------------------------------------------------------------------------------------
# scores -> plan -> prune -> oracle, and what the prune reports


def test_round_trip_keeps_the_best_of_each_stack_and_passes_the_oracle(omni, planned):
    torch = pytest.importorskip("torch")
    from shardcut.moe.oracle import forbid_pruned_experts

    root, reap, plan, report, result = planned
    assert {k: len(v) for k, v in plan.keep.items()} == {"0": 4, "1": 4, "talker.0": 3, "talker.1": 3}
    assert all(plan.keep[k] == best(reap[k], len(plan.keep[k])) for k in KEYS)
    validate_plan(plan, describe(open_checkpoint(omni.source)))
    assert result.output_bytes == report.output_bytes
    config = json.loads((root / "pruned" / "config.json").read_text())
    for stack, kept in (("thinker_config", 4), ("talker_config", 3)):
        text = config[stack]["text_config"]
        assert {text[k] for k in COUNT_NAMES if k in text} == {kept}

    fam = omni.family
    small, loading = load(fam, root / "pruned")
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    ids = torch.randint(3, 60, (2, 10), generator=torch.Generator().manual_seed(11))
    counts = dict(zip(KEYS, COUNTS, strict=True))
    with torch.no_grad():
        base = fam.forward(omni.model, ids)
        with forbid_pruned_experts(omni.model, plan.keep, counts, fam.oracle_key) as routers:
            masked = fam.forward(omni.model, ids)
        got = fam.forward(small, ids)
    assert routers == 4
    assert (base - masked).abs().max().item() > 1e-3  # the masking mattered
    assert (got - masked).abs().max().item() < 1e-5


def test_plan_json_and_prune_report_state_each_count(omni, planned):
    root, _, plan, _, result = planned
    body = json.loads((root / "plan.json").read_text())
    assert body["num_experts"] == 4  # the main stack's, as inspect's num_experts
    assert body["num_experts_by_config"] == {THINKER: 4, TALKER: 3}
    assert body["source"]["num_experts"] == 8 and body["source"]["num_experts_by_config"] == {THINKER: 8, TALKER: 6}
    assert body["pruned_per_layer_by_config"] == {THINKER: 4, TALKER: 3} and body["ratio"] == 0.5
    assert (result.experts_before, result.experts_after) == (8, 4)
    assert result.experts_by_config == {THINKER: [8, 4], TALKER: [6, 3]}
    # a hand-written plan without provenance: the copy in OUT still records every stack's count
    copy = json.loads((omni.pruned / "shardcut-plan.json").read_text())
    assert copy["num_experts"] == 4 and copy["source"]["num_experts_by_config"] == {THINKER: 8, TALKER: 6}
    assert Plan({"0": [1, 2], "talker.0": [0, 4, 5]}).num_experts == 2
    assert "num_experts" not in Plan({"0": [1, 2], "1": [3]}).to_json()  # no count to state


def test_prune_command_prints_each_count(omni, planned, tmp_path):
    root = planned[0]
    args = ["prune", str(omni.source), "-o", str(tmp_path / "out"), "--plan", str(root / "plan.json"), "--dry-run"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert f"{THINKER} 8 -> 4, {TALKER} 6 -> 3 experts per layer" in squash(r.output)
    assert "-> -1" not in r.output
    r = runner.invoke(app, [*args, "--json"])
    data = json.loads(r.output)
    assert data["experts_by_config"] == {THINKER: [8, 4], TALKER: [6, 3]} and data["experts_after"] == 4
    r = runner.invoke(app, ["plan", str(omni.source), "--scores", str(root / "scores.safetensors"), "--ratio", "0.5"])
    assert r.exit_code == 0 and f"{THINKER} 8 -> 4, {TALKER} 6 -> 3 experts per layer" in squash(r.output)
    r = runner.invoke(
        app, ["plan", str(omni.source), "--scores", str(root / "scores.safetensors"), "--ratio", "0.5", "--json"]
    )
    data = json.loads(r.output)
    assert data["plan"]["num_experts_by_config"] == {THINKER: 4, TALKER: 3}
    assert data["report"]["by_config"][TALKER] == {
        "num_experts": 6,
        "top_k": 2,
        "kept": 3,
        "pruned": 3,
        "rule": "pruned per layer = floor(6 x 0.5) = 3 -> 3 kept",
        "rounded": None,
    }
    r = runner.invoke(app, ["inspect", str(omni.source)], env={"COLUMNS": "250"})
    assert f"8 ({THINKER}), 6 ({TALKER})" in squash(r.output)


# ---------------------------------------------------------------------------------------------
# The pushed card


def _elements(path) -> int:
    return sum(math.prod(t.shape) for shard in path.glob("*.safetensors") for t in read_header(shard).tensors.values())


@pytest.mark.parametrize("which", ["from scores", "hand-written plan"])
def test_card_counts_every_stack(omni, planned, which, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    from shardcut.ops.publish import PROVENANCE_NAME, push

    out = planned[0] / "pruned" if which == "from scores" else omni.pruned
    set_token(monkeypatch, "hf_FakeTokenForTests0123456789", tmp_path)
    api = FakeHubApi()
    report = push(out, "me/tiny-omni-pruned", api=api)
    text = ModelCard(report.card).text
    assert f"| routed experts per MoE layer ({THINKER}) | 8 | 4 |" in text
    assert f"| routed experts per MoE layer ({TALKER}) | 6 | 3 |" in text
    assert f"4 of 8 in the {THINKER} layers (50%), 3 of 6 in the {TALKER} layers (50%)" in squash(text)
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in text.splitlines() if line.startswith("| ")}
    # counted from the pruned checkpoint alone, each stack at its own counts: the source's real totals
    assert f"({_elements(omni.source):,})" in rows["total parameters"][0]
    assert f"({_elements(out):,})" in rows["total parameters"][1]
    (uploaded,) = api.uploaded
    provenance = json.loads(uploaded[PROVENANCE_NAME])
    assert provenance["experts_per_layer"] == {"before": 8, "after": 4}
    assert provenance["experts_per_layer_by_config"] == {
        THINKER: {"before": 8, "after": 4},
        TALKER: {"before": 6, "after": 3},
    }
    message = api.called("upload_folder")[0][2]["commit_message"]
    assert f"{THINKER} 8 -> 4, {TALKER} 6 -> 3 experts per layer" in message
