"""Facts spelled once (issue 14): byte sizes, spans of ids and keys, Hugging Face cache paths,
the free-space probe and plan keys, each with its one home, and their callers agreeing."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from shardcut.format.cache_paths import repo_folder_name, snapshot_of, split_revision
from shardcut.format.durable import free_space, nearest_existing
from shardcut.format.errors import PlanError, ScoresError, ShardcutError
from shardcut.format.text import human_bytes, parse_size, span
from shardcut.plans.keys import is_plan_key
from shardcut.plans.options import PlanOptions
from shardcut.plans.plan import Plan
from shardcut.plans.scores import Scores


@pytest.mark.parametrize(
    "text, value",
    [("5GB", 5 * 10**9), ("500mb", 500 * 10**6), ("2GiB", 2 * 2**30), (" 1.5 KB ", 1500), ("1e3", 1000), (7, 7)],
)
def test_sizes_read_as_written(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["nan", "inf", "5XB", "GB", "", "0", "0.1", "2EB", "1e30", -4, True])
def test_sizes_outside_one_byte_to_one_exabyte_are_refused(text):
    with pytest.raises(ShardcutError, match="max_shard_size"):
        parse_size(text, "max_shard_size")


def test_the_cli_checks_sizes_with_the_same_rule():
    from typer.testing import CliRunner

    from shardcut_cli.main import app

    r = CliRunner().invoke(app, ["prune", "nowhere", "-o", "out", "--plan", "p.json", "--max-shard-size", "nan"])
    assert r.exit_code == 2 and r.stderr.strip() == "error: --max-shard-size 'nan': not a size (try 5GB or 500MB)"


def test_bytes_and_spans_for_people():
    assert [human_bytes(n) for n in (0, 999, 1000, 1_500_000_000, 3.2e15)] == [
        "0 B",
        "999 B",
        "1.00 KB",
        "1.50 GB",
        "3200.00 TB",
    ]
    assert span(["1", "2", "3"]) == "1, 2, 3"
    assert span([str(i) for i in range(10)]) == "0, 1, 2, …, 8, 9"
    assert span(range(30), limit=12, head=10, tail=0, sep=" ", count=True) == "0 1 2 3 4 5 6 7 8 9 … (30)"


def test_cache_paths_read_back_what_huggingface_hub_lays_out(tmp_path):
    folder = tmp_path / repo_folder_name("org/name") / "snapshots" / ("a" * 40)
    assert folder.parent.parent.name == "models--org--name"
    assert snapshot_of(folder) == ("org/name", "a" * 40)
    assert snapshot_of(tmp_path / "snapshots" / "mine") is None  # a folder named snapshots is no cache
    assert split_revision("org/name@v2") == ("org/name", "v2")
    local = tmp_path / "my@model"
    local.mkdir()
    assert split_revision(local) == (str(local), None)  # a local path always wins


def test_free_space_probes_the_nearest_existing_folder(tmp_path):
    probe, free = free_space(tmp_path / "not" / "yet" / "made")
    assert probe == nearest_existing(tmp_path / "not" / "yet") == tmp_path
    assert math.isclose(free, shutil.disk_usage(tmp_path).free, rel_tol=0.01)  # the same filesystem


def test_plan_keys_one_rule_for_plans_scores_and_policies(tmp_path):
    for key in ("3", "mtp.0", "talker.12", "vision.4"):
        assert is_plan_key(key) and PlanOptions(ratio=0.5, mtp_policy=f"scores-of:{key}").check()
    for key in ("model.layers.x", "3.", "mtp", "é.3", ""):
        assert not is_plan_key(key)
        with pytest.raises(PlanError, match="mtp_policy"):
            PlanOptions(ratio=0.5, mtp_policy=f"same-ids-as:{key}").check()
    bad = "layers.x"
    (tmp_path / "plan.json").write_text(json.dumps({"format": "shardcut-plan/1", "keep": {bad: [0]}}))
    with pytest.raises(PlanError, match="is not a plan key") as plan_error:
        Plan.load(tmp_path / "plan.json")
    with pytest.raises(ScoresError, match="is not a plan key") as scores_error:
        Scores.zeros([bad], 4).validate("s")
    assert str(plan_error.value).split(": ", 1)[1] == str(scores_error.value).split(": ", 1)[1]


def test_no_module_keeps_its_own_copy():
    """The helpers the homes above replaced are gone from every other module."""
    root = Path(__file__).resolve().parents[1]
    texts = {p: p.read_text(encoding="utf-8") for p in [*root.glob("shardcut/**/*.py"), *root.glob("cli/*.py")]}
    for needle, home in (
        ('"GIB": 2**30', "shardcut/format/text.py"),
        ('"models--"', "shardcut/format/cache_paths.py"),
        ("shutil.disk_usage(", "shardcut/format/durable.py"),
        ('def _span(keys: list[str]) -> str:\n    return ", ".join', None),
    ):
        holders = sorted(str(p.relative_to(root)) for p, t in texts.items() if needle in t)
        assert holders == ([home] if home else []), (needle, holders)


def test_the_importer_reads_layer_names_from_the_table(families, tmp_path):
    """Qwen3-Next's MTP stack (`mtp.layers.N`, plan keys `mtp.N`) as published files spell it:
    the table's prefixes, whole or as a tail, and plan keys with a tail; no family name is
    hard-coded in the importer."""
    import numpy as np

    from shardcut.format.checkpoint import open_checkpoint
    from shardcut.moe.model import describe
    from shardcut.plans.score_import import import_scores

    src = families("qwen3_next").source
    info = describe(open_checkpoint(src))
    E = info.num_experts
    spelled = {"0": "model.layers.0.mlp", "2": "layers.2", "3": "3", "mtp.0": "mtp.0.mlp.experts"}
    assert sorted(spelled) == sorted(layer.key for layer in info.layers)
    for mtp_spelling in ("mtp.0.mlp.experts", "mtp.layers.0", "mtp.layers.0.mlp.gate"):
        spelled["mtp.0"] = mtp_spelling
        report = {v: [float(i + 1) for i in range(E)] for v in spelled.values()}
        (tmp_path / "reap.json").write_text(json.dumps({"criterion": "reap", "scores": report}))
        scores, _ = import_scores(tmp_path / "reap.json", src)
        assert sorted(scores.layers) == sorted(spelled), mtp_spelling
        np.testing.assert_allclose(scores.values["reap"][scores.layers.index("mtp.0")], np.arange(1, E + 1))
