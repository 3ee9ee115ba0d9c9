"""`shardcut eval` runs on calibrate's machinery: a killed run resumes into the same report byte
for byte (activations in RAM, checkpointed or replayed, or spilled to disk), shards merged with
`eval-merge` equal the unsharded run, torchrun ranks equal one process, and the options are one
dataclass whose field names the library's messages use and the CLI turns into flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures.calib_fixtures import run_two_ranks, write_ids_jsonl

from shardcut.format.errors import ShardcutError
from shardcut.ops.evaluation.runner import evaluate
from shardcut.ops.evaluation.tally import EvalTally, merge_tallies, merge_tally_files
from shardcut.plans.plan import Plan

pytest.importorskip("transformers")

LENGTHS = [3, 17, 40, 9, 64, 25, 33, 12]
COMMON = {"max_length": 64, "batch_tokens": 96, "device": "cpu"}


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-resume") / "heldout.jsonl"
    write_ids_jsonl(path, LENGTHS, vocab=96, seed=7)
    return path


class Interrupt(Exception):
    pass


def _eval(built, data, **kw):
    return evaluate(built.source, str(data), plans=[Plan(built.keep)], pruned=[built.pruned], **COMMON, **kw)


def _same(a, b, rtol: float) -> None:
    assert (a.samples, a.tokens, a.predicted_tokens) == (b.samples, b.tokens, b.predicted_tokens)
    np.testing.assert_allclose(a.loss, b.loss, rtol=rtol)
    for p, q in zip(a.plans, b.plans, strict=True):
        assert (p.name, p.kind, p.kept) == (q.name, q.kind, q.kept)
        for f in ("loss", "kl_mean", "kl_p50", "kl_p99", "top1_agreement"):
            np.testing.assert_allclose(getattr(p, f), getattr(q, f), rtol=rtol, err_msg=f)
        np.testing.assert_allclose(p.residual_error, q.residual_error, rtol=rtol)
        np.testing.assert_allclose(list(p.moe_error.values()), list(q.moe_error.values()), rtol=rtol)


@pytest.mark.parametrize("memory,every", [(None, None), ("1", None), (None, 0)])
def test_a_killed_run_resumes_into_the_same_report(memory, every, families, heldout, tmp_path):
    """Killed after layer 1 (step 3 of embeddings, 4 layers, heads), resumed: the report file is
    byte-identical to an uninterrupted run's, whether the activations were spilled to disk, held
    in RAM and checkpointed, or held in RAM and replayed (`checkpoint_every=0`)."""
    built = families("qwen3_moe")
    straight = tmp_path / "straight.json"
    _eval(built, heldout, out=straight, max_memory=memory)
    out = tmp_path / "r.json"

    def stop(event):
        if event.kind == "layer_done" and event.step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        _eval(built, heldout, out=out, max_memory=memory, checkpoint_every=every, progress=stop)
    assert not out.exists() and (tmp_path / "r.json.eval" / "state.json").exists()
    # a resume with another variant is refused, and the state survives the refusal
    with pytest.raises(ShardcutError, match="another run: variants"):
        evaluate(built.source, str(heldout), plans=[Plan(built.keep)], out=out, resume=True, **COMMON)
    messages = []
    resumed = _eval(
        built,
        heldout,
        out=out,
        max_memory=memory,
        checkpoint_every=every,
        resume=True,
        progress=lambda e: messages.append(e.message) if e.kind == "info" else None,
    )
    assert any(m.startswith("resuming at step 3") for m in messages), messages
    assert any("spilled" in m for m in messages) == (memory is not None)
    assert out.read_bytes() == straight.read_bytes()
    assert json.loads(out.read_text())["plans"][0]["kl_mean"] == resumed.plans[0].kl_mean > 0
    assert not (tmp_path / "r.json.eval").exists()


def test_shards_merged_equal_the_unsharded_run(families, heldout, tmp_path):
    from typer.testing import CliRunner

    from shardcut_cli.main import app

    built = families("qwen3_moe")
    full = _eval(built, heldout)
    halves = [_eval(built, heldout, shard=f"{i}/2", out=tmp_path / f"t{i}.safetensors") for i in (1, 2)]
    assert [h.samples for h in halves] == [4, 4] and sum(h.tokens for h in halves) == full.tokens
    tallies = [EvalTally.load(tmp_path / f"t{i}.safetensors") for i in (1, 2)]
    assert [t.about["shard"] for t in tallies] == ["1/2", "2/2"]
    merged = merge_tally_files([tmp_path / "t2.safetensors", tmp_path / "t1.safetensors"], tmp_path / "m.json")
    _same(merged, full, rtol=1e-6)
    # the order of the shards does not matter: per-token values are put in sample order
    assert merge_tallies(tallies).report() == merged
    with pytest.raises(ShardcutError, match="shard 1/2 is also"):
        merge_tallies([tallies[0], tallies[0]])
    other = tmp_path / "other.safetensors"
    evaluate(built.source, str(heldout), plans=[Plan(built.keep)], shard="2/2", out=other, **COMMON)
    with pytest.raises(ShardcutError, match="not a shard of the same evaluation"):
        merge_tally_files([tmp_path / "t1.safetensors", other])
    cli = CliRunner().invoke(
        app, ["eval-merge", str(tmp_path / "t1.safetensors"), str(tmp_path / "t2.safetensors"), "--json"]
    )
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout) == json.loads((tmp_path / "m.json").read_text())
    bad = CliRunner().invoke(app, ["eval-merge", str(tmp_path / "m.json")])
    assert bad.exit_code == 2 and "m.json" in bad.output and "not a readable shardcut-eval-tally/1" in bad.output


_RANK_SCRIPT = """
import sys
from shardcut.ops.evaluation.runner import evaluate
from shardcut.plans.plan import Plan
evaluate(sys.argv[1], sys.argv[2], plans=[Plan.load(sys.argv[3])], out=sys.argv[4], max_length=64,
         batch_tokens=96, device="cpu")
"""


def test_torchrun_two_ranks_equal_one_process(families, heldout, tmp_path):
    built = families("qwen3_moe")
    Plan(built.keep).save(tmp_path / "plan.json")
    single = evaluate(built.source, str(heldout), plans=[tmp_path / "plan.json"], **COMMON)
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    out = tmp_path / "two.json"
    run_two_ranks(script, str(built.source), str(heldout), str(tmp_path / "plan.json"), str(out))
    from shardcut.ops.evaluation.metrics import EvalReport

    _same(EvalReport.load(out), single, rtol=1e-6)
    assert not (tmp_path / "two.json.eval").exists()


def test_options_are_one_dataclass_named_in_messages_and_flagged_by_the_cli(families, heldout, tmp_path):
    from typer.testing import CliRunner

    from shardcut.ops.evaluation.options import EvalOptions
    from shardcut_cli.main import app

    built = families("qwen3_moe")
    with pytest.raises(ShardcutError, match=r"`resume` needs the report path \(`out`\)"):
        evaluate(built.source, str(heldout), EvalOptions(plans=(Plan(built.keep),), resume=True))
    opts = EvalOptions(plans=[Plan(built.keep)], **COMMON)
    with pytest.raises(AttributeError):
        opts.seed = 1  # frozen
    a = evaluate(built.source, str(heldout), opts)
    b = evaluate(built.source, str(heldout), opts, plans=[Plan(built.keep), Plan(built.keep)])  # keywords override
    assert len(a.plans) == 1 and len(b.plans) == 2 and b.plans[1].kl_mean == a.plans[0].kl_mean
    # reading layer i + 1 while layer i runs (the default) or each layer in its turn: the same report
    assert opts.prefetch is True and evaluate(built.source, str(heldout), opts, prefetch=False) == a
    Plan(built.keep).save(tmp_path / "plan.json")
    common = ["--data", str(heldout), "--device", "cpu", "--max-length", "64", "--plan", str(tmp_path / "plan.json")]
    r = CliRunner().invoke(app, ["eval", str(built.source), *common, "--resume"])
    assert r.exit_code == 2 and "--resume needs the report path (-o) or the work folder (--work-dir)" in r.output
    r = CliRunner().invoke(app, ["eval", str(built.source), *common, "--shard", "1/2"])
    assert r.exit_code == 2 and "a --shard run writes its tally to -o" in r.output
    (tmp_path / "exists.json").write_text("{}")
    r = CliRunner().invoke(app, ["eval", str(built.source), *common, "-o", str(tmp_path / "exists.json")])
    assert r.exit_code == 2 and "exists" in r.output and (tmp_path / "exists.json").read_text() == "{}"


def test_plan_options_are_plan_options_once_for_library_and_cli():
    """Eval's plan options are a `PlanOptions` (declared once, in shardcut.plans.options): the
    keywords of `evaluate` reach it, contradictions are refused before any file is read, and the
    eval command takes every plan flag but the count (its own --ratio) and --seed (the samples')."""
    from dataclasses import fields

    from typer.testing import CliRunner

    from shardcut.ops.evaluation.options import EvalOptions, split_fields
    from shardcut.plans.options import PlanOptions
    from shardcut_cli.main import app

    own, plan = split_fields({"ratios": [0.5], "criterion": "ean", "protect": {"1": [0]}, "seed": 3})
    assert own == {"ratios": [0.5], "seed": 3} and plan == {"criterion": "ean", "protect": {"1": [0]}}
    assert {f.name for f in fields(EvalOptions)}.isdisjoint({"criterion", "protect", "mtp_policy"})
    for bad, match in (
        (EvalOptions(ratios=(0.5,), scores="s", plan_options=PlanOptions(experts=4)), "give the fractions as"),
        (EvalOptions(ratios=(1.5,), scores="s"), "ratio 1.5: must be a number strictly between 0 and 1"),
        (EvalOptions(ratios=(0.5,), scores="s", plan_options=PlanOptions(mtp_policy="x")), "unknown mtp_policy"),
    ):
        with pytest.raises(ShardcutError, match=match):
            bad.check()
    with pytest.raises(ShardcutError, match="unknown mtp_policy"):  # a keyword of evaluate reaches PlanOptions
        evaluate("no-such-model", "no-such-data", ratios=[0.5], scores="s", mtp_policy="x")
    help_text = CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "200"}).output
    flags = [f.metadata["flag"] for f in fields(PlanOptions) if f.name not in ("ratio", "experts", "seed")]
    assert flags and all(flag in help_text for flag in flags), flags
    assert "--experts" not in help_text and "--super-percentile" in help_text
