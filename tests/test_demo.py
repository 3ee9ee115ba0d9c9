"""`shardcut demo DIR` deletes only what it made: a folder it did not create is refused.

Run as a user would, through the installed CLI in a subprocess, with real files in DIR.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardcut.format.errors import OutputError
from shardcut.ops.demo import MARKER, claim_demo_dir

SHARDCUT = [sys.executable, "-m", "shardcut_cli.main"]


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under `root`: relative path -> (sha256, mtime_ns)."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _demo(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SHARDCUT, "demo", str(directory)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )


def _user_folder(root: Path) -> Path:
    """A folder holding the user's own original/, pruned/ and scores.safetensors."""
    d = root / "work"
    (d / "original").mkdir(parents=True)
    (d / "original" / "model.safetensors").write_bytes(os.urandom(4096))
    (d / "original" / "config.json").write_text('{"model_type": "mine"}\n')
    (d / "pruned").mkdir()
    (d / "pruned" / "notes.txt").write_text("my pruned model\n")
    (d / "scores.safetensors").write_bytes(os.urandom(1024))
    return d


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    d = _user_folder(tmp_path)
    before = _snapshot(d)
    r = _demo(d)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not made by `shardcut demo`" in lines[0] and str(d) in lines[0].replace("\n", "")
    assert "Traceback" not in r.stderr + r.stdout
    assert _snapshot(d) == before and not (d / MARKER).exists()


def test_demo_refuses_an_existing_file(tmp_path):
    f = tmp_path / "demo"
    f.write_text("not a folder\n")
    before = _snapshot(tmp_path)
    r = _demo(f)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a folder" in lines[0] and "Traceback" not in r.stderr
    assert _snapshot(tmp_path) == before


def test_claim_accepts_new_and_empty_folders_and_marks_them(tmp_path):
    for d in (tmp_path / "new" / "demo", tmp_path / "empty"):
        if d.name == "empty":
            d.mkdir()
        assert claim_demo_dir(d) == d and (d / MARKER).is_file()
        assert [p.name for p in d.iterdir()] == [MARKER]


def test_claim_of_a_marked_folder_removes_only_the_demo_outputs(tmp_path):
    d = tmp_path / "demo"
    claim_demo_dir(d)
    (d / "original").mkdir()
    (d / "original" / "model.safetensors").write_bytes(b"old demo")
    (d / "scores.safetensors.calib").mkdir()
    (d / "scores.safetensors").write_bytes(b"old scores")
    (d / "README.txt").write_text("kept\n")
    claim_demo_dir(d)
    assert sorted(p.name for p in d.iterdir()) == sorted([MARKER, "README.txt"])


def test_claim_refuses_without_writing(tmp_path):
    d = _user_folder(tmp_path)
    before = _snapshot(d)
    with pytest.raises(OutputError, match="no .shardcut-demo file"):
        claim_demo_dir(d)
    assert _snapshot(d) == before


def test_demo_reruns_in_its_own_folder(tmp_path):
    """A folder an earlier demo marked is reused: its stale outputs are replaced, the run passes."""
    d = tmp_path / "demo"
    claim_demo_dir(d)
    (d / "pruned").mkdir()
    (d / "pruned" / "stale.safetensors").write_bytes(b"from an earlier run")
    r = _demo(d)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and not (d / "pruned" / "stale.safetensors").exists()
    assert (d / MARKER).is_file() and (d / "original" / "config.json").is_file()
    assert (d / "pruned" / "config.json").is_file() and (d / "scores.safetensors").is_file()
