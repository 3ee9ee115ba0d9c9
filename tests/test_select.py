"""Criteria, selection, counts and plans (shardcut.plans.select), and the `plan` command."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from fixtures.scores_fixtures import model_info, mtp_model, random_scores, tiny_model
from typer.testing import CliRunner

from shardcut.format.errors import PlanError, ShardcutError
from shardcut.ops.planning import make_plan
from shardcut.plans.plan import Plan, validate_plan
from shardcut.plans.scores import Scores, file_sha256
from shardcut.plans.select import criterion_values, kept_count, parse_protect, rank, select_layer, super_experts
from shardcut_cli.main import app

runner = CliRunner()


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "scores-models"


@pytest.fixture(scope="session")
def qwen(base):
    base.mkdir(exist_ok=True)
    return tiny_model(base, "qwen3_moe")


@pytest.fixture(scope="session")
def deepseek(base):
    base.mkdir(exist_ok=True)
    return tiny_model(base, "deepseek_v3")


@pytest.fixture(scope="session")
def with_mtp(base):
    """DeepSeek-V3 shaped: MoE layers 1, 2, 3 and the MTP layer 4; 8 experts, top-2, ungrouped."""
    return mtp_model(base)


def hand_scores() -> Scores:
    """One layer, five experts, sums chosen so every criterion orders them differently."""
    s = Scores.zeros(["7"], 5)
    s.count[0] = [10, 1, 5, 0, 4]
    s.gate_sum[0] = [2.0, 0.9, 3.0, 0, 1.0]
    s.norm_sum[0] = [10, 5, 20, 0, 40]
    s.reap_sum[0] = [1.0, 4.5, 6.0, 0, 2.0]
    return s


# reap = [0.1, 4.5, 1.2, 0, 0.5]; ean = [10, 5, 20, 0, 40]; ean_mean = [1, 5, 4, 0, 10];
# frequency = [10, 1, 5, 0, 4]; weighted_frequency = [2, 0.9, 3, 0, 1]. Expert 3 never routed scores 0.
@pytest.mark.parametrize(
    "criterion, expected_values, expected_order",
    [
        ("reap", [0.1, 4.5, 1.2, 0, 0.5], [1, 2, 4, 0, 3]),
        ("ean", [10, 5, 20, 0, 40], [4, 2, 0, 1, 3]),
        ("ean_mean", [1, 5, 4, 0, 10], [4, 1, 2, 0, 3]),
        ("frequency", [10, 1, 5, 0, 4], [0, 2, 4, 1, 3]),
        ("weighted_frequency", [2, 0.9, 3, 0, 1], [2, 0, 4, 1, 3]),
        ("ean_sum", [10, 5, 20, 0, 40], [4, 2, 0, 1, 3]),  # the REAP reference's name for ean
    ],
)
def test_every_criterion_has_the_papers_value_and_order(criterion, expected_values, expected_order):
    values = criterion_values(hand_scores(), criterion)
    np.testing.assert_allclose(values[0], expected_values)
    assert rank(values[0]).tolist() == expected_order
    assert select_layer(values[0], 2).kept == sorted(expected_order[:2])


def test_random_criterion_is_seeded_and_differs_by_seed():
    s = Scores.zeros(["1", "2"], 64)
    a, b, c = (criterion_values(s, "random", seed) for seed in (3, 3, 4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == (2, 64) and np.all((a >= 0) & (a < 1))
    assert select_layer(a[0], 16).kept != select_layer(c[0], 16).kept


def test_unknown_criterion_is_refused():
    with pytest.raises(ShardcutError, match="unknown criterion 'bogus'"):
        criterion_values(hand_scores(), "bogus")


def test_ties_keep_the_lower_id():
    assert select_layer([1.0, 1.0, 1.0, 1.0], 2).kept == [0, 1]
    sel = select_layer([0.0, 2.0, 1.0, 2.0, 1.0], 3)
    assert sel.kept == [1, 2, 3]
    assert sel.lowest_kept == sel.highest_pruned == 1.0
    assert not sel.protection_overrode and not sel.group_balance_overrode


def test_ungrouped_selection_keeps_min_kept_above_max_pruned():
    rng = np.random.default_rng(1)
    for _ in range(20):
        v = rng.random(32)
        sel = select_layer(v, 20)
        assert len(sel.kept) == 20 and sel.lowest_kept > sel.highest_pruned
        assert set(sel.kept) == set(np.argsort(-v)[:20].tolist())


def test_grouped_selection_drops_the_same_number_from_every_group():
    v = [9, 8, 7, 6, 1, 2, 3, 4]  # the global top-4 all lie in group 0
    sel = select_layer(v, 4, n_group=2)
    assert sel.kept == [0, 1, 6, 7]
    assert sel.group_balance_overrode and not sel.protection_overrode
    assert select_layer(v, 4).kept == [0, 1, 2, 3]
    rng = np.random.default_rng(2)
    for _ in range(20):
        w = rng.random(16)
        kept = select_layer(w, 8, n_group=4).kept
        for g in range(4):  # 2 per group, and within a group the best two
            assert [i for i in kept if i // 4 == g] == sorted((g * 4 + np.argsort(-w[g * 4 : g * 4 + 4])[:2]).tolist())


def test_protection_keeps_low_experts_and_says_so():
    v = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    sel = select_layer(v, 3, protect=[5])
    assert sel.kept == [0, 1, 5] and sel.protected == [5]
    assert sel.protection_overrode and sel.lowest_kept == 0.0 and sel.highest_pruned == 3.0
    assert not select_layer(v, 3, protect=[0]).protection_overrode  # protecting a winner changes nothing
    with pytest.raises(ShardcutError, match=r"3 protected experts in group 1 \(experts 4..7\) but only 2 kept"):
        select_layer([1.0] * 8, 4, n_group=2, protect=[4, 5, 6])
    with pytest.raises(ShardcutError, match="out of range"):
        select_layer(v, 3, protect=[6])


@pytest.mark.parametrize(
    "E, ratio, kept",
    [
        (256, 0.30, 180),  # Kimi-Linear-REAP: 76 pruned
        (160, 0.25, 120),
        (160, 0.50, 80),  # Qwen3-Coder-REAP-363B / 246B
        (128, 0.50, 64),
        (100, 0.29, 71),  # floor on the decimal ratio: 29 pruned, where float math gives 28
        (8, 0.30, 6),
    ],
)
def test_rounding_rule_is_floor_of_pruned(E, ratio, kept):
    counts = kept_count(E, 8 if E > 8 else 2, ratio=ratio)
    assert counts.kept == kept and counts.pruned == E - kept
    assert f"floor({E} x {ratio:g}) = {E - kept}" in counts.rule


def test_grouped_counts_round_to_whole_groups():
    c = kept_count(256, 8, ratio=0.30, n_group=8, topk_group=4)  # 76 pruned -> 72, 9 per group
    assert (c.kept, c.pruned) == (184, 72) and "rounded down to 72" in c.rule and c.rounded
    c = kept_count(256, 8, ratio=0.25, n_group=8, topk_group=4)  # 64 pruned is already a multiple
    assert (c.kept, c.rounded) == (192, None)
    c = kept_count(16, 2, experts=7, n_group=4, topk_group=2)
    assert c.kept == 8 and "rounded up to 8" in c.rule


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ratio=0.0), "strictly between 0 and 1"),
        (dict(ratio=1.0), "strictly between 0 and 1"),
        (dict(ratio=-0.2), "strictly between 0 and 1"),
        (dict(ratio=float("nan")), "strictly between 0 and 1"),
        (dict(ratio=0.01), "removes no expert"),
        (dict(ratio=0.95), "fewer than top_k=4"),
        (dict(experts=17), "must be below"),
        (dict(experts=16), "must be below"),
        (dict(experts=3), "fewer than top_k=4"),
        (dict(), "exactly one of"),
        (dict(ratio=0.5, experts=8), "exactly one of"),
    ],
)
def test_bad_counts_are_refused(kwargs, message):
    with pytest.raises(ShardcutError, match=message):
        kept_count(16, 4, **kwargs)


def test_group_floors_are_refused():
    with pytest.raises(ShardcutError, match="at least 2 per group"):
        kept_count(16, 2, ratio=0.75, n_group=4, topk_group=4)  # 4 kept -> 1 per group
    with pytest.raises(ShardcutError, match=r"topk_group=1 x 2 per group < top_k=4"):
        kept_count(16, 4, ratio=0.5, n_group=4, topk_group=1)


def test_super_experts_use_layer_keys_and_the_reference_threshold():
    s = Scores.zeros(["3", "4", "5", "6"], 64)  # first MoE layer is 3, not 0
    s.act_max[:] = 1.0
    s.act_max[1, 5] = 100.0  # layer "4", row 1
    s.act_max[3, 2] = 100.0  # layer "6": in the last 25% of layers, so not protected (as the reference)
    s.act_max[2, 7] = 50.0  # above max/10 but below the percentile
    found, threshold = super_experts(s)
    # 256 values sorted: ..., 1, 50, 100, 100 at positions 252..255; the 99.5th percentile interpolates
    # at 0.995 x 255 = 253.725, between 50 and 100
    assert threshold == pytest.approx(50 + 0.725 * 50) and threshold > 100 / 10
    assert found == {"4": [5]}
    assert super_experts(s, layer_fraction=1.0)[0] == {"4": [5], "6": [2]}


def test_parse_protect():
    assert parse_protect(["3:0,5", "mtp.0:1", "3:7"]) == {"3": [0, 5, 7], "mtp.0": [1]}
    for bad in ("3", "3:", ":1", "3:a"):
        with pytest.raises(ShardcutError, match="LAYER:ID"):
            parse_protect([bad])


# ---------------------------------------------------------------------------------------------
# Plans for real checkpoints


def _oracle_logits(source, pruned, keep, num_experts):
    import torch
    from transformers import AutoModelForCausalLM

    from shardcut.moe.oracle import forbid_pruned_experts

    model = AutoModelForCausalLM.from_pretrained(source).eval()
    small = AutoModelForCausalLM.from_pretrained(pruned).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        original = model(ids).logits
        with forbid_pruned_experts(model, keep, num_experts) as routers:
            masked = model(ids).logits
        got = small(ids).logits
    return routers, (got - masked).abs().max().item(), (original - masked).abs().max().item()


@pytest.mark.parametrize("fixture, ratio, kept", [("qwen", 0.5, 4), ("deepseek", 0.4, 6)])
def test_round_trip_scores_plan_prune_oracle(request, tmp_path, fixture, ratio, kept):
    from shardcut.rewrite.writer import prune

    model = request.getfixturevalue(fixture)
    info = model_info(model)
    scores_path = tmp_path / "scores.safetensors"
    random_scores(info, seed=11).save(scores_path)
    plan, report = make_plan(model, scores_path, ratio=ratio)
    assert plan.num_experts == report.kept == kept
    validate_plan(plan, info)
    values = criterion_values(Scores.load(scores_path), "reap")
    for r, key in enumerate(Scores.load(scores_path).layers):  # the kept experts are the best by reap (per group)
        assert plan.keep[key] == select_layer(values[r], kept, info.n_group).kept
    if info.grouped:
        assert "rounded down to 2" in report.rule and all(
            sum(1 for i in ids if i < 4) == kept // 2 for ids in plan.keep.values()
        )
    out = prune(model, tmp_path / "pruned", plan)
    assert report.output_bytes == out.output_bytes  # the estimate is the rewriter's own layout
    routers, diff, effect = _oracle_logits(model, tmp_path / "pruned", plan.keep, info.num_experts)
    assert routers == len(info.layers)
    assert effect > 1e-4 and diff < 1e-5


def test_plan_records_provenance(qwen, tmp_path):
    scores_path = tmp_path / "s.safetensors"
    random_scores(model_info(qwen)).save(scores_path)
    plan, report = make_plan(qwen, scores_path, experts=6, criterion="ean_mean")
    body = json.loads(plan.dumps())
    assert body["criterion"] == "ean_mean" and body["experts"] == 6 and body["num_experts"] == 6
    assert body["scores_sha256"] == file_sha256(scores_path) == report.scores_sha256
    assert body["source"] == {"model": str(qwen), "num_experts": 8}
    assert body["pruned_per_layer"] == 2 and "ratio" not in body
    assert [row.layer for row in report.rows] == ["0", "1"]
    assert all(row.lowest_kept >= row.highest_pruned and not row.protection_overrode for row in report.rows)
    assert report.input_bytes > report.output_bytes > 0
    assert Plan.from_json(body).keep == plan.keep


def test_protection_reaches_the_plan(qwen, tmp_path):
    info = model_info(qwen)
    s = random_scores(info, seed=3)
    values = criterion_values(s, "reap")
    worst0, worst1 = int(rank(values[0])[-1]), int(rank(values[1])[-1])
    outlier1 = (worst1 + 1) % 8
    s.act_max[:] = 1.0
    s.act_max[1, outlier1] = 40.0  # layer "1" of 2 scored: outside the first 75%, so never a super expert
    s.act_max[0, worst0] = 50.0  # above the threshold 40 + 0.925 x 10 (99.5th percentile of 16 values)
    plan, report = make_plan(qwen, s, ratio=0.5, protect_super_experts=True, protect={"1": [worst1]})
    assert worst0 in plan.keep["0"] and worst1 in plan.keep["1"]
    assert report.rows[0].protected == [worst0] and report.rows[1].protected == [worst1]
    assert all(row.protection_overrode and row.lowest_kept < row.highest_pruned for row in report.rows)
    assert plan.extra["protected"] == {"0": [worst0], "1": [worst1]}
    assert report.super_threshold == pytest.approx(40 + 0.925 * 10)
    with pytest.raises(ShardcutError, match="layer 9 is not a MoE layer"):
        make_plan(qwen, s, ratio=0.5, protect={"9": [0]})


def test_grouped_plans_stay_group_balanced(deepseek):
    info = model_info(deepseek)
    s = random_scores(info, seed=4)
    s.reap_sum[:, :4] *= 100  # group 0 dominates: a layer-wide top-k would empty group 1
    plan, report = make_plan(deepseek, s, experts=4)
    for ids in plan.keep.values():
        assert len([i for i in ids if i < 4]) == 2 and len([i for i in ids if i >= 4]) == 2
    assert all(row.group_balance_overrode for row in report.rows)
    with pytest.raises(ShardcutError, match="at least 2 per group"):
        make_plan(deepseek, s, experts=2)


def test_mtp_layers_need_an_explicit_policy(with_mtp):
    info = model_info(with_mtp)
    assert [(layer.key, layer.mtp) for layer in info.layers] == [("1", False), ("2", False), ("3", False), ("4", True)]
    s = random_scores(info, seed=6)
    assert s.layers == ["1", "2", "3"]
    with pytest.raises(ShardcutError, match=r"MoE layers 4 \(MTP\) have no scores.*reuse-last"):
        make_plan(with_mtp, s, ratio=0.5)
    values = criterion_values(s, "reap")
    plan, report = make_plan(with_mtp, s, ratio=0.5, mtp_policy="reuse-last")
    assert plan.keep["4"] == select_layer(values[2], 4).kept == plan.keep["3"]
    assert report.rows[-1].source == "ranked with the scores of layer 3" and plan.extra["mtp_policy"] == "reuse-last"
    plan, _ = make_plan(with_mtp, s, ratio=0.5, mtp_policy="scores-of:1")
    assert plan.keep["4"] == plan.keep["1"]
    plan, report = make_plan(with_mtp, s, ratio=0.5, mtp_policy="same-ids-as:2")
    assert plan.keep["4"] == plan.keep["2"] and report.rows[-1].source == "keeps the same ids as layer 2"
    for bad, message in (
        ("guess", "unknown mtp_policy"),
        ("same-ids-as:4", "layer 4 has no scores"),
        ("scores-of:", "unknown mtp_policy"),
    ):
        with pytest.raises(ShardcutError, match=message):
            make_plan(with_mtp, s, ratio=0.5, mtp_policy=bad)
    full = random_scores(info, seed=6, layers=["1", "2", "3", "4"])  # MTP scored: no policy needed
    assert make_plan(with_mtp, full, ratio=0.5)[0].keep["4"] == select_layer(criterion_values(full)[3], 4).kept


def test_scores_of_another_model_are_refused(with_mtp, qwen):
    info = model_info(with_mtp)
    with pytest.raises(ShardcutError, match="scores of 16 experts per layer, the model has 8"):
        make_plan(with_mtp, Scores.zeros(["1", "2", "3"], 16), ratio=0.5)
    with pytest.raises(ShardcutError, match=r"layers \['0'\] are not MoE layers"):
        make_plan(with_mtp, random_scores(info, layers=["0", "1", "2", "3"]), ratio=0.5)
    with pytest.raises(ShardcutError, match=r"no scores for MoE layers \['3'\]"):
        make_plan(with_mtp, random_scores(info, layers=["1", "2"]), ratio=0.5)
    with pytest.raises(ShardcutError, match=r"layers \['2', '3'\] are not MoE layers"):
        make_plan(qwen, random_scores(info, layers=["2", "3"]), ratio=0.5)


# ---------------------------------------------------------------------------------------------
# CLI


def test_plan_command_writes_a_valid_plan(qwen, tmp_path):
    scores_path, plan_path = tmp_path / "s.safetensors", tmp_path / "plan.json"
    random_scores(model_info(qwen)).save(scores_path)
    r = runner.invoke(app, ["plan", str(qwen), "--scores", str(scores_path), "--ratio", "0.3", "-o", str(plan_path)])
    assert r.exit_code == 0, r.output
    assert "floor(8 x 0.3) = 2 -> 6 kept" in r.output and "size estimate" in r.output
    plan = Plan.load(plan_path)
    validate_plan(plan, model_info(qwen))
    assert plan.num_experts == 6 and plan.extra["ratio"] == 0.3
    r = runner.invoke(
        app,
        [
            "plan",
            str(qwen),
            "--scores",
            str(scores_path),
            "--experts",
            "4",
            "--json",
            "--protect",
            "0:1",
            "-c",
            "frequency",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert set(data) == {"plan", "report", "out"} and data["out"] is None
    assert 1 in data["plan"]["keep"]["0"] and data["report"]["criterion"] == "frequency"
    assert {
        "layer",
        "kept",
        "pruned",
        "lowest_kept",
        "highest_pruned",
        "protected",
        "protection_overrode",
        "group_balance_overrode",
        "source",
        "decided_by_id",
        "tie_value",
        "never_routed_at_cut",
    } == set(data["report"]["rows"][0])
    assert data["report"]["output_bytes"] < data["report"]["input_bytes"]


def test_prune_from_scores_prints_the_plan(qwen, tmp_path):
    scores_path = tmp_path / "s.safetensors"
    random_scores(model_info(qwen)).save(scores_path)
    r = runner.invoke(
        app,
        [
            "prune",
            str(qwen),
            "-o",
            str(tmp_path / "out"),
            "--scores",
            str(scores_path),
            "--ratio",
            "0.5",
            "--dry-run",
            "--protect",
            "1:0",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "lowest kept" in r.output and "8 -> 4 experts" in r.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ratio", "1.5"], "strictly between 0 and 1"),
        (["--ratio", "0"], "strictly between 0 and 1"),
        (["--experts", "9"], "must be below"),
        (["--experts", "1"], "fewer than top_k=2"),
        (["--ratio", "0.5", "--criterion", "magic"], "unknown criterion 'magic'"),
        (["--ratio", "0.5", "--protect", "0:x"], "LAYER:ID"),
        (["--ratio", "0.5", "--experts", "4"], "exactly one of --ratio or --experts"),
    ],
)
def test_plan_command_bad_input_exits_2(qwen, tmp_path, args, message):
    scores_path = tmp_path / "s.safetensors"
    random_scores(model_info(qwen)).save(scores_path)
    r = runner.invoke(app, ["plan", str(qwen), "--scores", str(scores_path), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1


def test_plan_command_refuses_scores_of_another_model(qwen, with_mtp, tmp_path):
    other = tmp_path / "other.safetensors"
    random_scores(model_info(with_mtp)).save(other)  # layers 1..3, 8 experts; qwen has layers 0, 1
    r = runner.invoke(app, ["plan", str(qwen), "--scores", str(other), "--ratio", "0.5"])
    assert r.exit_code == 2 and "not MoE layers of the model" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["plan", str(with_mtp), "--scores", str(other), "--ratio", "0.5"])
    assert r.exit_code == 2 and "--mtp-policy" in r.output and "4 (MTP)" in r.output


# ---------------------------------------------------------------------------------------------
# Serving-friendly counts (multiple_of: E' % ep_size == 0)


def test_multiple_of_rounds_the_kept_count_up():
    c = kept_count(256, 8, ratio=0.30, multiple_of=8)  # 180 kept is not a multiple of 8
    assert (c.kept, c.pruned, c.multiple_of) == (184, 72, 8)
    assert "kept rounded up from 180 to 184, a multiple of multiple_of=8" in c.rule and c.rounded in c.rule
    assert kept_count(256, 8, ratio=0.30, multiple_of=16).kept == 192
    c = kept_count(256, 8, ratio=0.25, multiple_of=8)  # 192 already is one
    assert (c.kept, c.rounded) == (192, None)
    assert kept_count(16, 2, experts=5, multiple_of=4).kept == 8
    assert kept_count(256, 8, ratio=0.30, multiple_of=1) == kept_count(256, 8, ratio=0.30)


def test_multiple_of_and_group_rounding_together():
    # 96 experts in 3 groups: 28 pruned -> 27 (whole groups), 69 kept -> 72 = lcm(8, 3) x 3
    c = kept_count(96, 8, ratio=0.30, n_group=3, topk_group=2, multiple_of=8)
    assert c.kept == 72 and c.kept % 8 == 0 and c.kept % 3 == 0 and c.pruned % 3 == 0
    assert "a multiple of n_group=3" in c.rule and "multiple of multiple_of=8 and n_group=3" in c.rule
    rng = np.random.default_rng(0)
    for _ in range(300):  # never prunes more than asked; the smallest count that is a multiple of both
        G = int(rng.choice([1, 2, 4, 8]))
        E, M = G * int(rng.integers(4, 40)), int(rng.integers(1, 17))
        ratio = round(float(rng.uniform(0.05, 0.9)), 2)
        try:
            c = kept_count(E, 2, ratio=ratio, n_group=G, topk_group=G, multiple_of=M)
        except ShardcutError:
            continue
        step = math.lcm(M, G)
        pruned = math.floor(E * Fraction(str(ratio)))
        plain = E - (pruned - pruned % G)  # the count without multiple_of
        assert c.kept % step == 0 and c.kept >= plain > c.kept - step and c.kept < E


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ratio=0.25, multiple_of=8), "keeps all 16 experts"),  # 12 kept -> 16
        (dict(ratio=0.25, multiple_of=0), "positive integer"),
        (dict(ratio=0.25, multiple_of=-4), "positive integer"),
        (dict(ratio=0.25, multiple_of=True), "positive integer"),
        (dict(experts=9, multiple_of=8), "keeps all 16 experts"),
    ],
)
def test_bad_multiple_of_is_refused(kwargs, message):
    with pytest.raises(PlanError, match=message):
        kept_count(16, 2, **kwargs)


def test_multiple_of_reaches_the_plan_and_the_commands(qwen, tmp_path):
    scores_path = tmp_path / "s.safetensors"
    random_scores(model_info(qwen)).save(scores_path)
    plan, report = make_plan(qwen, scores_path, ratio=0.4, multiple_of=2)  # 3 pruned, 5 kept -> 6
    validate_plan(plan, model_info(qwen))
    assert plan.num_experts == report.kept == 6 and plan.extra["multiple_of"] == 2
    assert plan.extra["experts"] == 6 and plan.extra["pruned_per_layer"] == 2
    assert "kept rounded up from 5 to 6" in plan.extra["rounding"] == report.rule
    assert any(note.startswith("rounding: kept rounded up from 5 to 6") for note in report.notes)
    assert plan.extra["options"]["multiple_of"] == 2
    r = runner.invoke(app, ["plan", str(qwen), "--scores", str(scores_path), "--ratio", "0.4", "--multiple-of", "2"])
    assert r.exit_code == 0, r.output
    assert "8 -> 6 experts" in r.output and "kept rounded up from 5 to 6, a multiple of multiple_of=2" in r.output
    r = runner.invoke(
        app,
        [
            "prune",
            str(qwen),
            "-o",
            str(tmp_path / "out"),
            "--scores",
            str(scores_path),
            "--ratio",
            "0.4",
            "--multiple-of",
            "2",
            "--dry-run",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["experts_after"] == 6
    r = runner.invoke(app, ["plan", str(qwen), "--scores", str(scores_path), "--ratio", "0.5", "--multiple-of", "0"])
    assert r.exit_code == 2 and "positive integer" in r.output and len(r.output.strip().splitlines()) == 1


def test_every_plan_option_has_a_flag_and_comes_back_from_it(qwen, tmp_path):
    """Every `PlanOptions` field is a flag of both `plan` and `prune` (a new field without a flag
    fails here), the plan records every option, `arguments` renders them, and `shardcut plan`
    with those arguments makes the same plan."""
    from dataclasses import fields

    from shardcut.plans.options import PlanOptions

    flags = [f.metadata["flag"] for f in fields(PlanOptions)]
    help_text = runner.invoke(app, ["plan", "--help"], env={"COLUMNS": "300"}).output
    prune_help = runner.invoke(app, ["prune", "--help"], env={"COLUMNS": "300"}).output
    assert len(flags) == 10 and all(flag in help_text and flag in prune_help for flag in flags)
    scores_path = tmp_path / "s.safetensors"
    random_scores(model_info(qwen)).save(scores_path)
    plan, _ = make_plan(
        qwen,
        scores_path,
        experts=4,
        criterion="random",
        seed=5,
        protect={"1": [3, 0]},
        protect_super_experts=True,
        multiple_of=2,
    )
    unset = {"ratio", "mtp_policy"}  # None: left out of the record
    assert set(plan.extra["options"]) == {f.name for f in fields(PlanOptions)} - unset
    args = PlanOptions.from_record(plan.extra).arguments()
    assert args == [
        "--experts",
        "4",
        "--criterion",
        "random",
        "--seed",
        "5",
        "--protect-super-experts",
        "--protect",
        "1:0,3",
        "--multiple-of",
        "2",
    ]
    r = runner.invoke(app, ["plan", str(qwen), "--scores", str(scores_path), *args, "-o", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert Plan.load(tmp_path / "p.json").to_json() == plan.to_json()
    without = runner.invoke(
        app, ["plan", str(qwen), "--scores", str(scores_path), "--experts", "4", "--criterion", "random", "--json"]
    )
    assert json.loads(without.output)["plan"]["keep"] != plan.keep  # the seed and protections mattered
