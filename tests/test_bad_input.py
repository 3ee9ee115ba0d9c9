"""Bad input through the CLI: exit code 2, one line naming the file and the problem, no
traceback, nothing written, input untouched. Plus re-sharding and dry runs."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest
from fixtures.families import E, family, keep_plan
from typer.testing import CliRunner

from shardcut_cli.main import app

INDEX = "model.safetensors.index.json"


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root` (hidden ones too) -> sha256 of its bytes ("dir" for folders)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


class Case:
    """A private copy of a family's source checkpoint, a valid plan for it, and an OUT path."""

    def __init__(self, tmp: Path, built, name: str) -> None:
        self.tmp, self.model, self.out = tmp, tmp / "model", tmp / "out"
        shutil.copytree(built.source, self.model)
        self.keep = keep_plan(family(name))
        self.plan = tmp / "plan.json"
        self.write_plan(self.keep)

    def write_plan(self, keep: dict) -> None:
        self.plan.write_text(json.dumps({"format": "shardcut-plan/1", "keep": keep}))

    def shard(self, index: int = 0) -> Path:
        names = sorted(set(json.loads((self.model / INDEX).read_text())["weight_map"].values()))
        return self.model / names[index]

    def prune(self, *extra: str, out: Path | None = None):
        args = ["prune", str(self.model), "-o", str(out or self.out), "--plan", str(self.plan), *extra]
        return CliRunner().invoke(app, args)

    def refused(self, *words: str, out: Path | None = None, extra: tuple[str, ...] = ()) -> str:
        """Run prune, assert it was refused cleanly with nothing written; returns the message."""
        before, listing = snapshot(self.tmp), sorted(p.name for p in self.tmp.iterdir())
        result = self.prune(*extra, out=out)
        message = result.stderr.strip()
        assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
        assert len(message.splitlines()) == 1, message
        assert "Traceback" not in result.output + result.stderr
        for word in words:
            assert word in message, f"{word!r} not in {message!r}"
        assert snapshot(self.tmp) == before, "input (or OUT) changed"
        assert sorted(p.name for p in self.tmp.iterdir()) == listing, "something was written next to OUT"
        print(message)
        return message


@pytest.fixture
def case(tmp_path, families) -> Case:
    return Case(tmp_path, families("qwen3_moe"), "qwen3_moe")


def rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    """Re-encode a shard's JSON header after `edit`, keeping its data bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])


def _tensors(header: dict) -> list[tuple[str, dict]]:
    return sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])


# --- the checkpoint -------------------------------------------------------------------------


def test_missing_config(case):
    (case.model / "config.json").unlink()
    case.refused("config.json", "not found")


def test_unknown_architecture_lists_supported(case):
    cfg = json.loads((case.model / "config.json").read_text())
    (case.model / "config.json").write_text(json.dumps({**cfg, "model_type": "not_a_moe"}))
    case.refused("config.json", "not_a_moe", "qwen3_moe", "deepseek_v3")


def test_shard_named_in_index_missing(case):
    shard = case.shard(1)
    shard.unlink()
    case.refused(INDEX, shard.name, "missing")


def test_truncated_shard(case):
    shard = case.shard(2)
    shard.write_bytes(shard.read_bytes()[:-100])
    case.refused(shard.name, "out of bounds")


def test_shard_shorter_than_length_field(case):
    shard = case.shard(0)
    shard.write_bytes(b"\x10\x00")
    case.refused(shard.name, "truncated")


def test_header_length_beyond_file(case):
    shard = case.shard(1)
    raw = shard.read_bytes()
    shard.write_bytes((len(raw) + 1000).to_bytes(8, "little") + raw[8:])
    case.refused(shard.name, "beyond the end of the file")


def test_corrupt_header_json(case):
    shard = case.shard(0)
    raw = bytearray(shard.read_bytes())
    raw[8] = ord("[")  # the header must be a JSON object starting with '{'
    shard.write_bytes(bytes(raw))
    case.refused(shard.name, "corrupt header JSON")


def test_offsets_out_of_bounds(case):
    shard = case.shard(1)

    def edit(header):
        name, last = _tensors(header)[-1]
        begin, end = last["data_offsets"]
        last["data_offsets"] = [begin + (end - begin), end + (end - begin)]  # same size, past the end

    rewrite_header(shard, edit)
    case.refused(shard.name, "out of bounds")


def test_offsets_overlapping(case):
    shard = case.shard(1)

    def edit(header):
        tensors = _tensors(header)
        first, second = next(
            (a, b) for a, b in pairwise(tensors) if a[1]["shape"] == b[1]["shape"] and a[1]["dtype"] == b[1]["dtype"]
        )
        second[1]["data_offsets"] = list(first[1]["data_offsets"])

    rewrite_header(shard, edit)
    case.refused(shard.name, "overlaps")


# --- the plan -------------------------------------------------------------------------------


def test_plan_missing_layer(case):
    keep = dict(case.keep)
    del keep["2"]
    case.write_plan(keep)
    case.refused("plan.json", "layer 2", "does not list")


def test_plan_duplicate_ids(case):
    case.write_plan({**case.keep, "2": [1, 1, 3, 5]})
    case.refused("plan.json", "layer 2", "duplicate")


def test_plan_unequal_counts(case):
    case.write_plan({**case.keep, "3": [0, 1, 2, 3, 4]})
    case.refused("plan.json", "unequal counts")


def test_plan_ids_out_of_range(case):
    case.write_plan({**case.keep, "1": [0, 1, 2, E]})
    case.refused("plan.json", "layer 1", "out of range")


def test_plan_fewer_than_top_k(case):
    case.write_plan({k: [v[0]] for k, v in case.keep.items()})
    case.refused("plan.json", "top_k")


def test_plan_not_group_balanced(tmp_path, families):
    case = Case(tmp_path, families("deepseek_v3"), "deepseek_v3")
    case.write_plan({k: [0, 1, 2, 4] for k in case.keep})  # groups are experts 0-3 and 4-7
    case.refused("plan.json", "group-balanced")


def test_plan_not_json(case):
    case.plan.write_text("{not json")
    case.refused("plan.json", "JSON")


# --- OUT ------------------------------------------------------------------------------------


def test_out_existing_and_not_empty(case):
    case.out.mkdir()
    (case.out / "keep-me.txt").write_text("user data")
    case.refused(str(case.out), "not an empty directory")


def test_out_inside_input(case):
    case.refused("inside the input", out=case.model / "pruned")


# --- re-sharding and dry runs ---------------------------------------------------------------


def test_max_shard_size_reshards(case):
    default = case.prune()
    assert default.exit_code == 0, default.output
    resharded = case.tmp / "resharded"
    result = case.prune("--max-shard-size", "300KB", out=resharded)
    assert result.exit_code == 0, result.output

    def layout(path):
        index = json.loads((path / INDEX).read_text())
        return index["weight_map"], index["metadata"]["total_size"]

    (map_a, size_a), (map_b, size_b) = layout(case.out), layout(resharded)
    assert set(map_a) == set(map_b) and size_a == size_b
    shards = sorted(resharded.glob("*.safetensors"))
    assert len(shards) == len(set(map_b.values())) and len(shards) != len(set(map_a.values()))
    assert all(p.stat().st_size <= 300_000 + 20_000 for p in shards)  # limit on data, plus a header
    check = CliRunner().invoke(app, ["verify", str(resharded), "--source", str(case.model)])
    assert check.exit_code == 0, check.output


def test_dry_run_writes_nothing(case):
    before = snapshot(case.tmp)
    result = case.prune("--dry-run")
    assert result.exit_code == 0, result.output
    assert "dry run" in result.output
    assert not case.out.exists()
    assert snapshot(case.tmp) == before
    assert sorted(p.name for p in case.tmp.iterdir()) == ["model", "plan.json"]
