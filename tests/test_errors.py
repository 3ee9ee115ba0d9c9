"""Errors a caller can tell apart by kind, whose messages name the library's parameters; the CLI
shows those parameters as its flags (one mapping, `shardcut_cli.common.flag_of`)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from fixtures.scores_fixtures import model_info, random_scores
from typer.testing import CliRunner

from shardcut.format.errors import PlanError, ScoresError, ShardcutError
from shardcut.ops.planning import make_plan
from shardcut.ops.synthetic import SyntheticSpec, write_synthetic_checkpoint
from shardcut.plans.options import PlanOptions, parse_protect
from shardcut.plans.plan import Plan
from shardcut.plans.scores import Scores
from shardcut_cli.common import cli_message, flag_of
from shardcut_cli.main import app

ROOT = Path(__file__).resolve().parents[1] / "shardcut"
# a flag such as --protect, not inside `...` (a command a message suggests: `shardcut eval --json`)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def _raised_messages():
    """(where, message text parts, params) of every `raise X(...)` in shardcut/."""
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args):
                continue
            first = node.exc.args[0]
            parts = [n.value for n in ast.walk(first) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            params = next((kw.value for kw in node.exc.keywords if kw.arg == "params"), None)
            elts = params.elts if isinstance(params, ast.Tuple) else []
            names = [e.value for e in elts if isinstance(e, ast.Constant)]  # a variable: checked by the tests
            yield f"{path.relative_to(ROOT.parent)}:{node.lineno}", "".join(parts), names


def test_library_messages_name_parameters_not_flags():
    """No message the library raises spells a command-line flag, and every parameter a raise
    lists in `params` is named in its message (so the CLI has something to map)."""
    flags, unnamed = [], []
    for where, text, params in _raised_messages():
        outside_backticks = re.sub(r"`[^`]*`", "", text)
        if FLAG.search(outside_backticks):
            flags.append((where, FLAG.findall(outside_backticks)))
        unnamed += [(where, p) for p in params if not re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", text)]
    assert not flags and not unnamed, (flags, unnamed)


def test_the_cli_maps_parameters_to_flags():
    exc = PlanError("protect 'x': expected LAYER:ID; layer 3's protect list", "plan/protect", params=("protect",))
    assert cli_message(exc) == "plan/protect: --protect 'x': expected LAYER:ID; layer 3's --protect list"
    quoted = ShardcutError("revision 'revision' is no branch", params=("revision",))
    assert cli_message(quoted) == "--revision 'revision' is no branch"  # a quoted value stays as written
    assert cli_message(ShardcutError("protect is only a word here")) == "protect is only a word here"  # no params
    assert [flag_of(p) for p in ("create_pr", "eval_report", "fmt")] == ["--create-pr", "--eval", "--format"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_synthetic_checkpoint(
        tmp_path_factory.mktemp("errors") / "model", SyntheticSpec(layers=3, experts=8, top_k=2, shards=1)
    )


def test_plan_errors_by_kind_in_the_library_and_as_flags_in_the_cli(model, tmp_path):
    scores = random_scores(model_info(model))
    scores_path = tmp_path / "s.safetensors"
    scores.save(scores_path)
    with pytest.raises(PlanError, match=r"^protect: layer 9 is not a MoE layer") as caught:
        make_plan(model, scores, ratio=0.5, protect={"9": [0]})
    assert caught.value.params == ("protect",)
    with pytest.raises(PlanError, match="^ratio 1.5: must be a number strictly between 0 and 1"):
        make_plan(model, scores, ratio=1.5)
    with pytest.raises(PlanError, match="^protect 'x'"):
        parse_protect(["x"])
    with pytest.raises(ScoresError, match="not MoE layers of the model"):
        make_plan(model, Scores.zeros(["7", "8"], 8), ratio=0.5)
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(PlanError, match="a plan must be a JSON object"):
        Plan.load(tmp_path / "bad.json")
    with pytest.raises(ScoresError, match="file not found"):
        Scores.load(tmp_path / "missing.safetensors")

    r = CliRunner().invoke(
        app, ["plan", str(model), "--scores", str(scores_path), "--ratio", "0.5", "--protect", "9:0"]
    )
    assert r.exit_code == 2 and r.stderr.strip().startswith("error: --protect: layer 9 is not a MoE layer"), r.output


def test_plan_options_refuse_bad_values_before_reading_anything(tmp_path):
    """PlanOptions.check runs before any file is opened: no model or score file is needed to refuse."""
    missing = tmp_path / "no-model"
    for options, word in (
        (dict(), "exactly one of ratio or experts"),
        (dict(ratio=0.5, experts=4), "exactly one of ratio or experts"),
        (dict(ratio=float("nan")), "ratio nan"),
        (dict(experts=0), "experts 0: must be an integer at least 1"),
        (dict(ratio=0.5, seed=-1), "seed -1: must be an integer at least 0"),
        (dict(ratio=0.5, mtp_policy="bogus"), "unknown mtp_policy 'bogus'"),
    ):
        with pytest.raises(PlanError, match=re.escape(word)):
            make_plan(missing, missing / "s.safetensors", **options)
    assert PlanOptions(ratio=0.5, mtp_policy="same-ids-as:mtp.0").check().mtp_policy == "same-ids-as:mtp.0"
