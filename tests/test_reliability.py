"""Crash safety, resume, locking, determinism and disk-full behaviour of `prune` (issue 8)."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardcut.format.errors import ShardcutError
from shardcut.ops.synthetic import SyntheticSpec, write_synthetic_checkpoint
from shardcut.ops.verification import verify
from shardcut.plans.plan import Plan
from shardcut.rewrite.outdir import OutputTransaction, lock_path, partial_dir
from shardcut.rewrite.writer import prune

SPEC = SyntheticSpec(layers=3, experts=8, top_k=2, hidden=512, moe_inter=256, shards=12, vocab=512)
KEEP = {"1": [0, 2, 3, 7], "2": [1, 2, 5, 6]}


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("rel") / "src", SPEC)


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("ref") / "out"
    prune(source, out, Plan(KEEP))
    return tree_digest(out)


def test_output_is_deterministic(source, reference, tmp_path):
    prune(source, tmp_path / "again", Plan(KEEP))
    assert tree_digest(tmp_path / "again") == reference


def test_sigkill_at_any_point_then_resume(source, reference, tmp_path):
    """Kill a real `shardcut prune` while it writes shards: the input stays untouched, nothing
    at OUT can pass for complete, and --resume gives output identical to an uninterrupted run."""
    before = tree_digest(source)
    plan_file = tmp_path / "plan.json"
    Plan(KEEP).save(plan_file)
    cli = [sys.executable, "-m", "shardcut_cli.main", "prune", str(source), "--plan", str(plan_file)]
    interrupted = 0
    for kill_after in (1, 4, 8):  # finished shards in the partial folder when the kill lands
        out = tmp_path / f"out{kill_after}"
        proc = subprocess.Popen([*cli, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        partial = partial_dir(out)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if partial.exists() and len(list(partial.glob("model-*.safetensors"))) >= kill_after:
                break
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert tree_digest(source) == before
        if out.exists():  # the kill came after the final rename: then it must be complete
            assert verify(out, source=source).ok
            continue
        interrupted += 1
        subprocess.run([*cli, "-o", str(out), "--resume"], check=True, capture_output=True)
        assert tree_digest(out) == reference
        assert not partial.exists() and not lock_path(out).exists()
    assert interrupted, "no kill landed while shards were being written"


def test_resume_rewrites_a_corrupted_finished_shard(source, reference, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C keeps the finished shards for --resume
        prune(source, out, Plan(KEEP), progress=_interrupt_after(out, 3))
    shards = sorted(partial_dir(out).glob("model-*.safetensors"))
    assert shards and not out.exists()
    with open(shards[0], "r+b") as f:  # same size, one flipped byte: only the content check can see it
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    prune(source, out, Plan(KEEP), resume=True)
    assert tree_digest(out) == reference


def test_resume_with_another_plan_starts_over(source, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prune(source, out, Plan(KEEP), progress=_interrupt_after(out, 2))
    other = {"1": [0, 1, 2, 3], "2": [4, 5, 6, 7]}
    prune(source, out, Plan(other), resume=True)
    assert verify(out, source=source).ok
    assert Plan.load(out / "shardcut-plan.json").keep == other


def test_second_writer_is_refused(source, tmp_path):
    out = tmp_path / "out"
    with OutputTransaction(out, {"x": 1}):
        with pytest.raises(ShardcutError, match="another shardcut process"):
            prune(source, out, Plan(KEEP))
    prune(source, out, Plan(KEEP))  # the lock is released with the first writer
    assert verify(out).ok


@pytest.mark.parametrize("writes", ["direct", "page-cache"])
def test_disk_full_removes_partial_output(source, tmp_path, monkeypatch, writes):
    """ENOSPC in the middle of the copy: from an O_DIRECT `pwrite` (where the filesystem
    allows it) or from `copy_file_range` through the page cache (`SHARDCUT_DIRECT_IO=0`)."""
    import fcntl

    calls = {"n": 0}
    if writes == "direct":
        real_pwrite = os.pwrite

        def failing_pwrite(fd, data, offset):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
                calls["n"] += 1
                if calls["n"] > 2:
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", failing_pwrite)
    else:
        monkeypatch.setenv("SHARDCUT_DIRECT_IO", "0")
        real = os.copy_file_range

        def failing(src, dst, count, offset_src=None, *args):
            calls["n"] += 1
            if calls["n"] > 20:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(src, dst, count, offset_src, *args)

        monkeypatch.setattr(os, "copy_file_range", failing)
    out = tmp_path / "out"
    with pytest.raises(ShardcutError, match="no space left"):
        prune(source, out, Plan(KEEP))
    if writes == "direct" and calls["n"] <= 2:
        pytest.skip("this filesystem refuses O_DIRECT (the page-cache case covers it)")
    assert not out.exists() and not partial_dir(out).exists() and not lock_path(out).exists()


def test_refuses_to_start_without_enough_space(source, tmp_path, monkeypatch):
    import shutil

    import shardcut.rewrite.outdir as outdir

    monkeypatch.setattr(outdir.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(ShardcutError, match=r"needs [\d,]+ bytes, 1,000 are free"):
        prune(source, tmp_path / "out", Plan(KEEP))
    assert not (tmp_path / "out").exists()


def _interrupt_after(out: Path, shards: int):
    """A progress callback that presses Ctrl-C once `shards` shards are finished."""

    def progress(done: int, total: int) -> None:
        if len(list(partial_dir(out).glob("model-*.safetensors"))) >= shards:
            raise KeyboardInterrupt

    return progress
