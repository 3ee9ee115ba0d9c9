"""`shardcut eval` is right: its streamed metrics equal the same metrics computed with two fully
loaded transformers models (the original, and the original with the pruned experts masked by
the DESIGN.md oracle), written out here in float64; a pruned checkpoint streamed against its
source measures what its plan measures; a plan that prunes nothing changes nothing, exactly; the
layer a prune hurts is the first layer whose error rises; calibration text is recognised."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from fixtures.calib_fixtures import decoder_layers, write_ids_jsonl
from fixtures.families import E, family

from shardcut.ops.evaluation.metrics import EvalReport
from shardcut.ops.evaluation.runner import evaluate
from shardcut.plans.plan import Plan

pytest.importorskip("transformers")

# wrapper families (multimodal checkpoints) are not streamed by the calibrator on this branch
FAMILIES = ["qwen3_moe", "deepseek_v3", "gpt_oss", "qwen3_vl_moe"]  # the last: a multimodal wrapper, text stack
MOE_BLOCK = "mlp"  # the MoE block of each decoder layer in these families
LENGTHS = [3, 17, 40, 9, 64, 25, 33, 12]
BATCH_TOKENS = 96  # forces padded batches of several samples
REL = 1e-5


@pytest.fixture(scope="session")
def ids_data(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    path = tmp_path_factory.mktemp("eval-data") / "heldout.jsonl"
    return path, write_ids_jsonl(path, LENGTHS, vocab=96, seed=7)


@pytest.fixture(scope="session")
def evaluated(families, ids_data):
    """`evaluated(name)` -> (report of [its plan, its pruned checkpoint], the Built family)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            built = families(name)
            report = evaluate(
                built.source,
                str(ids_data[0]),
                plans=[Plan(built.keep)],
                pruned=[built.pruned],
                max_length=64,
                batch_tokens=BATCH_TOKENS,
                device="cpu",
            )
            cache[name] = (report, built)
        return cache[name]

    return get


def _full_forward(model, sample: np.ndarray, blocks: dict[str, object]):
    """Logits [T, V], decoder-layer outputs [T, H] per layer and MoE block outputs per key."""
    import torch

    layer_out: dict[int, object] = {}
    moe_out: dict[str, object] = {}
    hooks = [
        layer.register_forward_hook(lambda m, a, o, i=i: layer_out.__setitem__(i, o[0] if isinstance(o, tuple) else o))
        for i, layer in enumerate(decoder_layers(model))
    ]
    hooks += [
        b.register_forward_hook(lambda m, a, o, k=k: moe_out.__setitem__(k, o[0] if isinstance(o, tuple) else o))
        for k, b in blocks.items()
    ]
    try:
        with torch.no_grad():
            logits = model(torch.as_tensor(sample)[None]).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return (
        logits.double().numpy(),
        [layer_out[i][0].double().numpy() for i in sorted(layer_out)],
        {k: v.reshape(len(sample), -1).double().numpy() for k, v in moe_out.items()},
    )


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def reference(model, keep: dict[str, list[int]], runs: list[str], samples: list[np.ndarray]) -> dict:
    """The metrics of `shardcut.ops.evaluation.metrics`, from full forwards of the original and the masked model."""
    from shardcut.moe.oracle import forbid_pruned_experts

    layers = decoder_layers(model)
    blocks = {k: getattr(layers[int(k)], MOE_BLOCK) for k in runs}
    kl, agree, nll_o, nll_p = [], [], [], []
    res = np.zeros((len(layers), 2))
    moe = {k: np.zeros(2) for k in runs}
    for s in samples:
        lo_logits, h_o, m_o = _full_forward(model, s, blocks)
        with forbid_pruned_experts(model, keep, E) as masked:
            assert masked == len(runs)
            lp_logits, h_p, m_p = _full_forward(model, s, blocks)
        lo, lp = _log_softmax(lo_logits), _log_softmax(lp_logits)
        kl.append((np.exp(lo) * (lo - lp)).sum(-1))
        agree.append(lo.argmax(-1) == lp.argmax(-1))
        nll_o.append(-lo[np.arange(len(s) - 1), s[1:]])
        nll_p.append(-lp[np.arange(len(s) - 1), s[1:]])
        for i in range(len(layers)):
            res[i] += [((h_p[i] - h_o[i]) ** 2).sum(), (h_o[i] ** 2).sum()]
        for k in runs:
            moe[k] += [((m_p[k] - m_o[k]) ** 2).sum(), (m_o[k] ** 2).sum()]
    kl, agree = np.concatenate(kl), np.concatenate(agree)
    return {
        "original_loss": np.concatenate(nll_o).mean(),
        "loss": np.concatenate(nll_p).mean(),
        "kl_mean": kl.mean(),
        "kl_p50": np.percentile(kl, 50),
        "kl_p99": np.percentile(kl, 99),
        "top1_agreement": agree.mean(),
        "residual_error": np.sqrt(res[:, 0] / res[:, 1]),
        "moe_error": {k: np.sqrt(d / r) for k, (d, r) in moe.items()},
    }


def _close(got, want, what: str) -> None:
    got, want = np.asarray(got, dtype=float), np.asarray(want, dtype=float)
    assert np.allclose(got, want, rtol=REL, atol=1e-12), f"{what}: {got} != {want}"


def _assert_same_quality(a, b) -> None:
    for f in ("loss", "perplexity", "kl_mean", "kl_p50", "kl_p99", "top1_agreement"):
        _close(getattr(a, f), getattr(b, f), f)
    _close(a.residual_error, b.residual_error, "residual_error")
    assert a.moe_error.keys() == b.moe_error.keys()
    _close(list(a.moe_error.values()), list(b.moe_error.values()), "moe_error")


@pytest.mark.parametrize("name", FAMILIES)
def test_eval_of_a_plan_equals_two_full_models(name, evaluated, ids_data):
    report, built = evaluated(name)
    fam = family(name)
    want = reference(built.model, built.keep, fam.runs, ids_data[1])
    got = report.plans[0]
    assert report.tokens == sum(LENGTHS) and report.predicted_tokens == sum(n - 1 for n in LENGTHS)
    _close(report.loss, want["original_loss"], "original loss")
    _close(report.perplexity, np.exp(want["original_loss"]), "original perplexity")
    for f in ("loss", "kl_mean", "kl_p50", "kl_p99", "top1_agreement"):
        _close(getattr(got, f), want[f], f)
    _close(got.residual_error, want["residual_error"], "residual_error")
    assert set(got.moe_error) == set(want["moe_error"])
    for k, v in want["moe_error"].items():
        _close(got.moe_error[k], v, f"moe_error[{k}]")
    assert got.kl_mean > 1e-3 and got.ratio == 0.5 and got.kept == 4  # the prune changed something measurable


@pytest.mark.parametrize("name", FAMILIES)
def test_eval_of_a_pruned_checkpoint_equals_eval_of_its_plan(name, evaluated):
    report, built = evaluated(name)
    plan, out = report.plans
    assert (plan.kind, out.kind, out.name) == ("plan", "checkpoint", built.pruned.name)
    _assert_same_quality(out, plan)


def test_eval_of_a_pruned_checkpoint_alone(families, ids_data, evaluated):
    """`shardcut eval OUT --source MODEL`: the checkpoint streamed next to its source, no plan."""
    report, built = evaluated("qwen3_moe")
    alone = evaluate(
        built.source,
        str(ids_data[0]),
        pruned=[built.pruned],
        max_length=64,
        batch_tokens=40,
        device="cpu",
        max_memory="1KB",
    )  # another batching, and both streams spilled to disk
    assert len(alone.plans) == 1
    _assert_same_quality(alone.plans[0], report.plans[0])


def test_a_plan_that_prunes_nothing_changes_nothing_exactly(families, ids_data):
    built = families("deepseek_v3")
    everything = Plan({k: list(range(E)) for k in built.keep})
    report = evaluate(
        built.source, str(ids_data[0]), plans=[everything], max_length=64, batch_tokens=BATCH_TOKENS, device="cpu"
    )
    p = report.plans[0]
    assert p.kl_mean == 0.0 and p.kl_p50 == 0.0 and p.kl_p99 == 0.0
    assert p.top1_agreement == 1.0 and p.loss == report.loss and p.ratio == 0.0
    assert set(p.moe_error.values()) == {0.0} and set(p.residual_error) == {0.0}


def test_a_stream_still_the_original_runs_no_second_forward(families, ids_data, evaluated, monkeypatch):
    """A plan that prunes nothing carries the original's hidden states through every layer, and
    any plan does through the dense layers before the first MoE one: eval runs those layers (and
    the LM head of the first) once for both, and the results are unchanged."""
    from shardcut.ops.calibration.runner import make_batches
    from shardcut.ops.evaluation import layers, passes

    built = families("qwen3_moe")
    counts = {"layer": 0, "head": 0}

    def counted(name, real):
        def call(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(passes, "run_with_block", counted("layer", passes.run_with_block))
    monkeypatch.setattr(layers, "logits_of", counted("head", layers.logits_of))
    everything = Plan({k: list(range(E)) for k in built.keep})
    report = evaluate(
        built.source,
        str(ids_data[0]),
        plans=[Plan(built.keep), everything],
        max_length=64,
        batch_tokens=BATCH_TOKENS,
        device="cpu",
    )
    n_layers, batches = len(decoder_layers(built.model)), len(make_batches(LENGTHS, BATCH_TOKENS))
    first = min(int(k) for k in family("qwen3_moe").runs)  # layers before the first MoE one (dense) run once too
    assert first > 0 and counts == {"layer": batches * (2 * n_layers - first), "head": batches * 2}
    got, nothing = report.plans
    _assert_same_quality(got, evaluated("qwen3_moe")[0].plans[0])
    assert nothing.kl_mean == 0.0 and nothing.kl_p99 == 0.0 and nothing.top1_agreement == 1.0
    assert nothing.loss == report.loss and set(nothing.residual_error) == {0.0}
    assert set(nothing.moe_error.values()) == {0.0}


def _usage(scores, key: str) -> list[int]:
    """Experts of layer `key` by how often the router chose them, most used first."""
    counts = scores.count[scores.row(key)]
    return sorted(range(len(counts)), key=lambda e: (-counts[e], e))


def test_pruning_what_a_layer_relies_on_shows_first_at_that_layer(families, ids_data, tmp_path):
    """Two plans that prune one expert per layer, the least used one, except that the second
    prunes layer 2's most used one: their errors are identical up to layer 1 and part at layer 2,
    where the second's MoE error is much the larger. The score file is calibrated on the same
    text, so eval must also say that the text is not held out."""
    from shardcut.ops.calibration.runner import calibrate

    built = families("qwen3_moe")
    scores = calibrate(built.source, str(ids_data[0]), tmp_path / "s.safetensors", max_length=64, device="cpu")
    least = {k: sorted(_usage(scores, k)[:-1]) for k in built.keep}
    relied = dict(least, **{"2": sorted(_usage(scores, "2")[1:])})
    report = evaluate(
        built.source,
        str(ids_data[0]),
        plans=[Plan(least), Plan(relied)],
        scores=tmp_path / "s.safetensors",
        max_length=64,
        device="cpu",
    )
    a, b = report.plans
    parted = next(i for i, (x, y) in enumerate(zip(a.residual_error, b.residual_error, strict=True)) if x != y)
    assert parted == 2 and a.moe_error["1"] == b.moe_error["1"]
    assert b.moe_error["2"] > 1.3 * a.moe_error["2"] and b.moe_error["2"] > 1.5 * b.moe_error["1"]
    assert b.residual_error[2] > a.residual_error[2] and b.kl_mean > a.kl_mean
    assert report.overlap == {
        "compared": len(LENGTHS),
        "matched": len(LENGTHS),
        "samples": len(LENGTHS),
        "fraction": 1.0,
    }
    assert any("not held out" in w for w in report.warnings)


def test_held_out_data_gives_no_overlap_warning(families, ids_data, tmp_path):
    from shardcut.ops.calibration.runner import calibrate

    built = families("qwen3_moe")
    other = tmp_path / "calib.jsonl"
    write_ids_jsonl(other, [20, 30, 12], vocab=96, seed=99)
    calibrate(built.source, str(other), tmp_path / "s.safetensors", max_length=64, device="cpu")
    report = evaluate(
        built.source,
        str(ids_data[0]),
        plans=[Plan(built.keep)],
        scores=tmp_path / "s.safetensors",
        max_length=64,
        device="cpu",
    )
    assert report.overlap["matched"] == 0 and report.overlap["compared"] == len(LENGTHS)
    assert report.warnings == []


def test_report_round_trips_through_json(evaluated, tmp_path):
    report, _ = evaluated("qwen3_moe")
    report.save(tmp_path / "r.json")
    again = EvalReport.load(tmp_path / "r.json")
    assert again == report
    table = again.markdown()
    assert table.count("\n| ") == 3 and re.search(r"\| plan 1 \| 50% \| 4 \|", table)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    from shardcut.format.errors import ShardcutError

    with pytest.raises(ShardcutError, match="bad.json"):
        EvalReport.load(tmp_path / "bad.json")


def test_cli_table_json_plot_and_a_card_that_carries_them(families, ids_data, evaluated, tmp_path):
    from typer.testing import CliRunner

    from shardcut_cli.main import app

    report, built = evaluated("qwen3_moe")
    runner = CliRunner()
    Plan(built.keep).save(tmp_path / "plan.json")
    common = ["--data", str(ids_data[0]), "--max-length", "64", "--batch-tokens", str(BATCH_TOKENS), "--device", "cpu"]
    run = runner.invoke(
        app,
        [
            "eval",
            str(built.source),
            "--plan",
            str(tmp_path / "plan.json"),
            *common,
            "--json",
            "-o",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path / "r.png"),
        ],
    )
    assert run.exit_code == 0, run.output
    printed = json.loads(run.stdout)
    assert printed == json.loads((tmp_path / "r.json").read_text()) and printed["format"] == "shardcut-eval/1"
    _assert_same_quality(EvalReport.load(tmp_path / "r.json").plans[0], report.plans[0])
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (
        tmp_path / "r.png"
    ).stat().st_size > 10_000

    table = runner.invoke(app, ["eval", str(built.pruned), "--source", str(built.source), *common])
    assert table.exit_code == 0, table.output
    row = next(line for line in table.stdout.splitlines() if "│ pruned" in line)
    assert "50%" in row and f"{report.plans[1].kl_mean:.3g}" in row, table.stdout

    bad = runner.invoke(app, ["eval", str(built.source), *common])
    assert bad.exit_code == 2 and "give --plan" in bad.output

    push = runner.invoke(
        app,
        [
            "push",
            str(built.pruned),
            "me/tiny-reap-50",
            "--dry-run",
            "--json",
            "--eval",
            str(tmp_path / "r.json"),
            "--eval-plot",
            str(tmp_path / "r.png"),
        ],
    )
    assert push.exit_code == 0, push.output
    body = json.loads(push.stdout)
    assert {"eval/report.json", "eval/report.png"} <= {f["path"] for f in body["files"]}
    card = body["card"]
    assert "## Evaluation" in card and "![quality against ratio" in card
    assert EvalReport.load(tmp_path / "r.json").markdown() in card


def test_data_sketch_is_exact_below_its_largest_hash():
    """The bottom-k sketch: a small set is recorded exactly; for a large one, every sample that
    hashes below the sketch's largest hash is judged, and judged right; other samples are not."""
    from shardcut.format.fingerprint import PREFIX_TOKENS, data_sketch, merge_sketches, overlap, sample_hash

    rng = np.random.default_rng(3)
    calib = [rng.integers(0, 1000, n).tolist() for n in rng.integers(1, 80, 3000)]
    fresh = [rng.integers(1000, 2000, 40).tolist() for _ in range(500)]
    small = data_sketch(calib[:10], size=64)
    assert overlap(small, calib[:10]).matched == 10 and overlap(small, fresh).matched == 0
    sketch = data_sketch(calib, size=256)
    limit = max(int(h, 16) for h in sketch.split(";")[2].split(","))
    mixed = calib[:1000] + fresh
    ov = overlap(sketch, mixed)
    assert ov.compared == sum(sample_hash(s) <= limit for s in mixed) and 0 < ov.compared < len(mixed)
    assert ov.matched == sum(sample_hash(s) <= limit for s in calib[:1000])
    assert 0.5 < ov.fraction < 0.85  # 1000 of the 1500 samples are calibration samples
    # the same text truncated elsewhere is the same sample; another beginning is not
    long = next(s for s in calib if len(s) > PREFIX_TOKENS)
    assert sample_hash(long[:PREFIX_TOKENS]) == sample_hash(long + [5] * 50) != sample_hash([7] + long)
    assert overlap("something else", mixed) is None
    halves = [data_sketch(calib[:1500], size=256), data_sketch(calib[1500:], size=256)]
    assert merge_sketches(halves) == sketch
    from shardcut.plans.score_merge import merge_scores
    from shardcut.plans.scores import Scores  # `scores merge` keeps the union's sketch

    parts = [Scores.zeros(["1"], 8, metadata={"model": "m", "data_sketch": h}) for h in halves]
    assert merge_scores([(p, 1.0) for p in parts]).metadata["data_sketch"] == sketch


def test_a_router_the_mask_does_not_reach_is_refused(families):
    """The check behind every masked layer: a pruned expert chosen under the mask is an error
    (here the mask is left out, so the router chooses pruned experts)."""
    import torch

    from shardcut.format.errors import ShardcutError
    from shardcut.moe.oracle import forbid_pruned_experts
    from shardcut.ops.evaluation.layers import refuse_pruned

    built = families("qwen3_moe")
    model, keep = built.model, built.keep
    layer = decoder_layers(model)[1]
    ids = torch.arange(40)[None] % 96
    with torch.no_grad():
        with forbid_pruned_experts(model, keep, E), refuse_pruned(layer, "1", keep["1"], E):
            model(ids)
        with pytest.raises(ShardcutError, match="layer 1: the router still chose a pruned expert"):
            with refuse_pruned(layer, "1", keep["1"], E):
                model(ids)


def test_ratios_from_a_score_file_are_the_plans_make_plan_writes(families, ids_data, tmp_path):
    from typer.testing import CliRunner

    from shardcut.ops.calibration.runner import calibrate
    from shardcut.ops.planning import make_plan
    from shardcut_cli.main import app

    built = families("qwen3_moe")
    other = tmp_path / "calib.jsonl"
    write_ids_jsonl(other, [30, 41, 17, 22], vocab=96, seed=5)
    calibrate(built.source, str(other), tmp_path / "s.safetensors", max_length=64, device="cpu")
    plans = [make_plan(built.source, tmp_path / "s.safetensors", ratio=r)[0] for r in (0.25, 0.5)]
    by_ratio = evaluate(
        built.source,
        str(ids_data[0]),
        scores=tmp_path / "s.safetensors",
        ratios=[0.25, 0.5],
        max_length=64,
        device="cpu",
    )
    by_plan = evaluate(built.source, str(ids_data[0]), plans=plans, max_length=64, device="cpu")
    assert [(p.name, p.kept, p.ratio) for p in by_ratio.plans] == [("ratio=0.25", 6, 0.25), ("ratio=0.5", 4, 0.5)]
    for a, b in zip(by_ratio.plans, by_plan.plans, strict=True):
        assert (a.kl_mean, a.residual_error, a.moe_error) == (b.kl_mean, b.residual_error, b.moe_error)
    assert by_ratio.plans[0].kl_mean < by_ratio.plans[1].kl_mean  # pruning more costs more, here
    bad = CliRunner().invoke(
        app,
        [
            "eval",
            str(built.source),
            "--data",
            str(ids_data[0]),
            "--scores",
            str(tmp_path / "s.safetensors"),
            "--ratio",
            "half",
        ],
    )
    assert bad.exit_code == 2 and "--ratio must be comma-separated fractions" in bad.output


def test_bad_input_is_one_line_naming_the_file(families, ids_data, tmp_path):
    from typer.testing import CliRunner

    from shardcut_cli.main import app

    built, other = families("qwen3_moe"), families("gpt_oss")
    short = dict(built.keep)
    short.pop("3")
    Plan(short).save(tmp_path / "short.json")
    runner = CliRunner()
    common = ["--data", str(ids_data[0]), "--device", "cpu", "--max-length", "64"]
    cases = [
        (["eval", str(built.source), "--plan", str(tmp_path / "short.json"), *common], "short.json"),
        (["eval", str(other.pruned), "--source", str(built.source), *common], "not a pruned copy of"),
        (["eval", str(built.source), "--plan", str(tmp_path / "missing.json"), *common], "missing.json"),
        (
            [
                "eval",
                str(built.pruned),
                "--source",
                str(built.source),
                *common,
                "--work-dir",
                str(tmp_path / "no" / "w"),
            ],
            "the work folder's parent folder does not exist",
        ),
    ]
    for args, needle in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and needle in r.output and r.output.count("error:") == 1, (args, r.output)


@pytest.mark.parametrize("name", ["llama4", "longcat_flash"])
def test_eval_masks_input_scaling_and_identity_expert_routers(name, evaluated):
    """Llama-4 (its router scales the expert input) and LongCat (identity experts after the real
    ones): a plan applied as the router mask measures what the pruned checkpoint computes."""
    report, built = evaluated(name)
    plan, out = report.plans
    assert plan.kl_mean > 1e-4 and plan.kept == 4
    _assert_same_quality(out, plan)


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_the_moe_block_runs_on_real_tokens_only(families, name):
    """With the batch's real-token mask, the MoE block of a padded batch runs on the real
    tokens alone (its experts never see a padding row), and the layer and block outputs at the
    real tokens are those of the padded call."""
    import torch

    from shardcut.ops.calibration.stream import LayerCall
    from shardcut.ops.evaluation.layers import moe_block, run_with_block

    model = families(name).model
    layer_i = int(min(family(name).runs, key=int))
    layer = decoder_layers(model)[layer_i]
    lengths = [5, 9, 2]
    real = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    ids = torch.randint(0, 64, real.shape) * real
    captured = {}

    def catch(module, args, kwargs):
        captured["call"] = LayerCall(args[0] if args else kwargs["hidden_states"], args[1:], kwargs)

    hook = layer.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids, attention_mask=real.long(), use_cache=False)
    finally:
        hook.remove()
    call = captured["call"]
    kwargs = {k: v for k, v in call.kwargs.items() if k != "hidden_states"}
    call = LayerCall(call.hidden, call.args, kwargs)
    block = moe_block(layer)
    seen: list[int] = []
    experts = next(m for n, m in block.named_children() if n == "experts")
    counter = experts.register_forward_pre_hook(lambda m, a: seen.append(a[0].numel() // a[0].shape[-1]))  # rows
    try:
        with torch.no_grad():
            padded_out, padded_moe = run_with_block(layer, block, call.hidden, call)
            rows_padded = list(seen)
            seen.clear()
            out, moe = run_with_block(layer, block, call.hidden, call, real)
    finally:
        counter.remove()
    assert rows_padded and max(rows_padded) == real.numel()
    assert seen and max(seen) == int(real.sum()) < real.numel()
    assert "forward" not in block.__dict__  # the block's own forward is back
    torch.testing.assert_close(out[real], padded_out[real], rtol=1e-5, atol=1e-6)
    B, T = real.shape
    torch.testing.assert_close(
        moe.reshape(B * T, -1)[real.reshape(-1)], padded_moe.reshape(B * T, -1)[real.reshape(-1)], rtol=1e-5, atol=1e-6
    )
