"""`prune`, `inspect`, `plan` and `verify` start without torch or transformers (house rule:
only calibration, score import, dequantization, the oracle and the demo may import them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from shardcut.ops.synthetic import SyntheticSpec, write_synthetic_checkpoint
from shardcut.plans.plan import Plan
from shardcut.plans.scores import Scores

SCRIPT = """
import json, sys
from typer.testing import CliRunner
from shardcut_cli.main import app
runner = CliRunner()
for args in json.loads(sys.argv[1]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print(json.dumps(heavy))
"""


def test_rewrite_commands_never_import_torch(tmp_path: Path):
    src = write_synthetic_checkpoint(tmp_path / "src", SyntheticSpec(layers=3, experts=8, top_k=2, shards=2))
    keep = {"1": [0, 2, 4, 6], "2": [1, 3, 5, 7]}
    Plan(keep).save(tmp_path / "plan.json")
    scores = Scores.zeros(["1", "2"], 8)
    scores.count[:] = scores.reap_sum[:] = scores.gate_sum[:] = scores.norm_sum[:] = 1.0 + scores.count
    scores.count[:, 0] = 5.0
    scores.save(tmp_path / "scores.safetensors")
    out = str(tmp_path / "out")
    commands = [
        ["inspect", str(src), "--json"],
        [
            "plan",
            str(src),
            "--scores",
            str(tmp_path / "scores.safetensors"),
            "--ratio",
            "0.5",
            "-o",
            str(tmp_path / "p2.json"),
        ],
        ["prune", str(src), "-o", out, "--plan", str(tmp_path / "plan.json"), "--dry-run"],
        ["prune", str(src), "-o", out, "--plan", str(tmp_path / "plan.json")],
        ["verify", out, "--source", str(src)],
    ]
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(commands)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()  # the commands really ran


# `shardcut CMD` imports only CMD's topic module of the CLI: not the other commands' modules,
# nor the rich widgets only they (or a terminal) use.
MAIN = """
import json, sys
sys.argv = ["shardcut", *json.loads(sys.argv[1])]
from shardcut_cli.main import main
try:
    main()
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
names = ("shardcut_cli.calibrate_cmd", "shardcut_cli.eval_cmd", "shardcut_cli.hub_cmd", "shardcut_cli.scores_cmd",
         "rich.markdown", "rich.progress", "huggingface_hub", "torch", "transformers")
print(json.dumps([m for m in names if m in sys.modules]))
"""


def test_prune_and_verify_import_only_their_command_module(tmp_path: Path):
    src = write_synthetic_checkpoint(tmp_path / "src", SyntheticSpec(layers=3, experts=8, top_k=2, shards=2))
    Plan({"1": [0, 2, 4, 6], "2": [1, 3, 5, 7]}).save(tmp_path / "plan.json")
    out = str(tmp_path / "out")
    for args in (
        ["prune", str(src), "-o", out, "--plan", str(tmp_path / "plan.json")],
        ["verify", out, "--source", str(src)],
        ["inspect", str(src), "--json"],
    ):
        done = subprocess.run([sys.executable, "-c", MAIN, json.dumps(args)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1]) == [], args
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_command_table_matches_what_the_topic_modules_register():
    import importlib

    import typer

    from shardcut_cli.main import TOPICS, app

    for module in set(TOPICS.values()):
        sub = typer.Typer()
        importlib.import_module(f"shardcut_cli.{module}").register(sub)
        names = {c.name for c in sub.registered_commands} | {g.name for g in sub.registered_groups}
        assert names == {c for c, m in TOPICS.items() if m == module}, module
    every = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert every == set(TOPICS)
