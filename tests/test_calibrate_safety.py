"""`calibrate` never destroys what the user has and never resumes into a wrong result (issue 17
items 1, 2, 4, 5, 6, 10, 14; issue 11 item 8; issue 12 item 4): real processes killed with
SIGKILL, real files, byte-for-byte comparisons with an uninterrupted run."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures.calib_fixtures import write_ids_jsonl
from typer.testing import CliRunner

from shardcut.format.errors import OutputError, OutputExistsError, ShardcutError
from shardcut.ops.calibration.resume import MARKER, checkpoint_due
from shardcut.ops.calibration.runner import calibrate
from shardcut.plans.scores import Scores
from shardcut_cli.main import app

pytest.importorskip("transformers")
LENGTHS = [3, 17, 40, 9, 64, 25, 33, 12, 50, 7]
EPOCH = "1700000000"  # SOURCE_DATE_EPOCH: the score file's `created`, so two runs can be compared byte for byte
STEPS = 5  # the tiny Qwen3-MoE: embeddings + 4 decoder layers
ROOT = Path(__file__).resolve().parents[1]

# a real calibrate process that kills itself with SIGKILL in the middle of step STEP
_KILLED = r"""
import os, signal, sys
from shardcut.ops.calibration.runner import calibrate
model, data, out, step, memory, every = sys.argv[1:7]
def progress(e):
    if e.kind == "batch" and e.step == int(step) and e.batch == 2:
        os.kill(os.getpid(), signal.SIGKILL)
calibrate(model, data, out, max_length=64, batch_tokens=96, max_memory=None if memory == "-" else memory,
          checkpoint_every=None if every == "-" else int(every), progress=progress)
"""
# a real calibrate process that waits at step 2 until a file appears (to hold its lock)
_HELD = r"""
import sys, time
from pathlib import Path
from shardcut.ops.calibration.runner import calibrate
model, data, out, ready, go = sys.argv[1:6]
def progress(e):
    if e.kind == "layer_start" and e.step == 2 and not Path(ready).exists():
        Path(ready).touch()
        while not Path(go).exists():
            time.sleep(0.05)
calibrate(model, data, out, max_length=64, batch_tokens=96, progress=progress)
"""


@pytest.fixture(autouse=True)
def _epoch(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)


@pytest.fixture(scope="module")
def model(families, tmp_path_factory) -> Path:
    """A private copy of the tiny Qwen3-MoE (some tests rewrite its weights)."""
    path = tmp_path_factory.mktemp("safety") / "model"
    shutil.copytree(families("qwen3_moe").source, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("safety-data") / "ids.jsonl"
    write_ids_jsonl(path, LENGTHS, vocab=96, seed=0)
    return path


@pytest.fixture(scope="module")
def reference(model, data, tmp_path_factory) -> bytes:
    """The bytes of an uninterrupted run's score file."""
    out = tmp_path_factory.mktemp("safety-ref") / "scores.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOURCE_DATE_EPOCH", EPOCH)
        _run(model, data, out)
    return out.read_bytes()


def _run(model: Path, data: Path, out: Path, **kwargs) -> Scores:
    return calibrate(model, str(data), out, max_length=64, batch_tokens=96, **kwargs)


def _env() -> dict[str, str]:
    return {**os.environ, "SOURCE_DATE_EPOCH": EPOCH, "PYTHONPATH": str(ROOT)}


def _killed(model: Path, data: Path, out: Path, step: int, memory: str | None = None, every: int | None = None) -> None:
    """Run calibrate in its own process and SIGKILL it during step `step`."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _KILLED,
            str(model),
            str(data),
            str(out),
            str(step),
            memory or "-",
            "-" if every is None else str(every),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`shardcut calibrate ARGS` in this process (the refusals tested with it happen before any
    layer runs, so a process of its own would only add a torch import)."""
    from typer.testing import CliRunner

    from shardcut_cli.main import app

    result = CliRunner().invoke(app, ["calibrate", *args], env={"SOURCE_DATE_EPOCH": EPOCH})
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _resumed(model: Path, data: Path, out: Path, **kwargs) -> tuple[list[int], list[str]]:
    """Resume in this process; returns the steps it computed and its log lines."""
    events = []
    _run(model, data, out, resume=True, progress=events.append, **kwargs)
    return [e.step for e in events if e.kind == "layer_start"], [e.message for e in events if e.kind == "info"]


# -- 17.1: the work folder ------------------------------------------------------------------


def test_work_dir_that_is_the_model_or_holds_user_files_is_refused(model, data, tmp_path):
    """Once `--work-dir MODEL` deleted the model and `--work-dir DIR` everything in DIR."""
    before = _digest(model)
    out = tmp_path / "s.safetensors"
    proc = _cli(str(model), "--data", str(data), "-o", str(out), "--work-dir", str(model))
    assert proc.returncode == 2 and "work folder is or holds the input" in proc.stderr, proc.stderr
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    proc = _cli(str(model), "--data", str(data), "-o", str(out), "--work-dir", str(mine))
    assert proc.returncode == 2 and "was not made by shardcut" in proc.stderr, proc.stderr
    assert (mine / "thesis.tex").read_text() == "years of work" and sorted(mine.iterdir()) == [mine / "thesis.tex"]
    with pytest.raises(OutputError, match="inside the input folder"):
        _run(model, data, out, work_dir=model / "work")
    with pytest.raises(OutputError, match="is or holds the input"):
        _run(model, data, out, work_dir=model.parent)
    assert _digest(model) == before and not out.exists()


def test_work_dir_removal_touches_only_shardcuts_files(model, data, reference, tmp_path):
    # an empty folder of the user's is used, emptied of shardcut's files, and kept
    empty = tmp_path / "empty"
    empty.mkdir()
    _run(model, data, tmp_path / "a.safetensors", work_dir=empty)
    assert empty.is_dir() and list(empty.iterdir()) == []
    # a folder shardcut made, where the user dropped a file during an interrupted run
    work, out = tmp_path / "work", tmp_path / "b.safetensors"
    _killed_in_process(model, data, out, work_dir=work, step=3)
    assert (work / MARKER).is_file() and (work / "state.json").is_file()
    (work / "notes.txt").write_text("mine")
    _run(model, data, out, work_dir=work)  # no --resume: the saved run is discarded, its files only
    assert out.read_bytes() == reference
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]


class _Stop(Exception):
    pass


def _killed_in_process(model: Path, data: Path, out: Path, step: int, **kwargs) -> None:
    def stop(event):
        if event.kind == "layer_start" and event.step == step:
            raise _Stop

    with pytest.raises(_Stop):
        _run(model, data, out, progress=stop, **kwargs)


# -- 17.2 and 11.8: the output --------------------------------------------------------------


def test_output_that_is_an_input_is_refused(model, data, tmp_path):
    """`-o MODEL/<shard>` once replaced a shard, `-o DATA` the data file."""
    before, data_bytes = _digest(model), data.read_bytes()
    shard = sorted(model.glob("*.safetensors"))[0]
    runner = CliRunner()
    for target, message in (
        (shard, "one of the inputs"),
        (data, "one of the inputs"),
        (model / "new.safetensors", "inside the input folder"),
        (model / "config.json", "one of the inputs"),
    ):
        result = runner.invoke(app, ["calibrate", str(model), "--data", str(data), "-o", str(target), "--overwrite"])
        assert result.exit_code == 2 and message in result.output, result.output
    assert _digest(model) == before and data.read_bytes() == data_bytes
    assert not list(model.parent.glob("*.calib")) and not (model / "new.safetensors").exists()


def test_existing_score_file_needs_overwrite(model, data, reference, tmp_path):
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"an earlier calibration")
    with pytest.raises(OutputExistsError, match="exists"):
        _run(model, data, out)
    result = CliRunner().invoke(app, ["calibrate", str(model), "--data", str(data), "-o", str(out)])
    assert result.exit_code == 2 and "overwrite" in result.output
    assert out.read_bytes() == b"an earlier calibration" and not (tmp_path / "s.safetensors.calib").exists()
    _run(model, data, out, overwrite=True)
    assert out.read_bytes() == reference


# -- 17.4, 12.4: resume after SIGKILL ----------------------------------------------------------


def test_sigkill_at_the_last_layer_resume_recomputes_one_layer(model, data, reference, tmp_path):
    """Activations in RAM (the default): the resume after a kill in the last layer computes that
    layer alone (no replay of the finished ones) and writes the same bytes."""
    out = tmp_path / "s.safetensors"
    _killed(model, data, out, step=STEPS - 1, every=1)
    state = json.loads((tmp_path / "s.safetensors.calib" / "state.json").read_text())
    assert state["next_step"] == STEPS - 1 and state["activations"]["step"] == STEPS - 1
    steps, log = _resumed(model, data, out)
    assert steps == [STEPS - 1], log
    assert any(m.startswith(f"resuming at step {STEPS - 1} of {STEPS} from the activations") for m in log)
    assert out.read_bytes() == reference
    assert not (tmp_path / "s.safetensors.calib").exists()


def test_resume_between_checkpoints_replays_only_since_the_last_one(model, data, reference, tmp_path):
    out = tmp_path / "s.safetensors"
    _killed(model, data, out, step=4, every=3)  # checkpoint after step 2 (entering step 3)
    steps, log = _resumed(model, data, out)
    assert steps == [3, 4], log
    assert out.read_bytes() == reference


@pytest.mark.parametrize("first,then", [(None, "1"), ("1", None)])
def test_resume_with_another_max_memory_is_identical(first, then, model, data, reference, tmp_path):
    """RAM -> disk and disk -> RAM: once the store switched and scored the remaining layers on
    zeroed activations (every token routed alike), silently."""
    out = tmp_path / "s.safetensors"
    _killed(model, data, out, step=3, memory=first, every=1)  # a fixed interval: the default one follows timings
    steps, log = _resumed(model, data, out, max_memory=then)
    assert any(("spilled" in m) == (then is not None) for m in log if m.startswith("activations"))
    assert steps == [3, 4], log
    assert out.read_bytes() == reference
    counts = Scores.load(out).count
    assert ((counts > 0).sum(axis=1) > 2).all()  # routing spreads: not one expert set for all tokens


def test_bfloat16_ram_checkpoint_resumes_on_disk_identically(model, data, tmp_path):
    straight = tmp_path / "a.safetensors"
    _run(model, data, straight, dtype="bfloat16")
    out = tmp_path / "b.safetensors"
    _killed_in_process(model, data, out, step=3, dtype="bfloat16", checkpoint_every=1)
    steps, _ = _resumed(model, data, out, dtype="bfloat16", max_memory="1")
    assert steps == [3, 4]
    assert out.read_bytes() == straight.read_bytes()


# -- 17.5: weights changed ------------------------------------------------------------------


def _new_revision(model: Path, keep_mtime: bool) -> None:
    """Every float tensor of every shard changed (same names, shapes, file sizes)."""
    from safetensors.numpy import load_file, save_file

    from shardcut.format.container import read_header

    for shard in sorted(model.glob("*.safetensors")):
        st = shard.stat()
        meta = read_header(shard).metadata
        tensors = {k: (v * np.asarray(1.5, v.dtype)) if v.dtype.kind == "f" else v for k, v in load_file(shard).items()}
        save_file(tensors, str(shard), metadata=meta)
        assert shard.stat().st_size == st.st_size
        if keep_mtime:
            os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_resume_after_the_weights_changed_stops(model, data, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    out = tmp_path / "s.safetensors"
    _killed(copy, data, out, step=3)
    _new_revision(copy, keep_mtime=True)  # even with the old mtimes, the sampled bytes differ
    with pytest.raises(ShardcutError, match="the weights changed: weights"):
        _run(copy, data, out, resume=True)
    assert not out.exists() and (tmp_path / "s.safetensors.calib" / "state.json").is_file()
    _run(copy, data, out)  # without --resume: starts over on the new weights
    assert Scores.load(out).tokens.min() == sum(LENGTHS)


# -- 17.6: a torn state -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["missing", "older"])
def test_torn_state_starts_over(how, model, data, reference, tmp_path):
    """state.json of a later step than the partial scores (as a power loss could leave): once
    accepted, with layers of 0 tokens; now it starts over and gives the right file."""
    out, work = tmp_path / "s.safetensors", tmp_path / "s.safetensors.calib"
    _killed_in_process(model, data, out, step=2)
    early = tmp_path / "early"
    shutil.copytree(work, early)
    _killed_in_process(model, data, out, step=4, resume=True)
    later_state = json.loads((work / "state.json").read_text())
    shutil.rmtree(work)
    shutil.copytree(early, work)
    shutil.copy(work / "state.json", tmp_path / "early-state.json")
    (work / "state.json").write_text(json.dumps(later_state))
    if how == "older":  # the later state's partial name, holding the earlier bytes
        old = json.loads((tmp_path / "early-state.json").read_text())["partial"]["name"]
        (work / old).rename(work / later_state["partial"]["name"])
    steps, log = _resumed(model, data, out)
    assert any("inconsistent" in m and "starting from the beginning" in m for m in log), log
    assert steps == list(range(STEPS))
    assert out.read_bytes() == reference
    assert (Scores.load(out).tokens == sum(LENGTHS)).all()


# -- 17.10: durability order --------------------------------------------------------------------


def test_files_are_durable_before_the_state_goes(model, data, reference, tmp_path, monkeypatch):
    """Every fsync, rename and removal recorded: the score file is fsynced, renamed and its
    folder fsynced before anything of the state is removed; each state names only durable files."""
    calls: list[tuple[str, str]] = []
    real = {name: getattr(os, name) for name in ("fsync", "replace", "unlink", "rmdir")}

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real["fsync"](fd)

    def replace(a, b, **kw):
        calls.append(("replace", f"{os.path.realpath(a)} -> {os.path.realpath(b)}"))
        return real["replace"](a, b, **kw)

    def unlink(p, **kw):
        calls.append(("unlink", os.path.realpath(p)))
        return real["unlink"](p, **kw)

    def rmdir(p, **kw):
        calls.append(("rmdir", os.path.realpath(p)))
        return real["rmdir"](p, **kw)

    for name, fn in (("fsync", fsync), ("replace", replace), ("unlink", unlink), ("rmdir", rmdir)):
        monkeypatch.setattr(os, name, fn)
    out = tmp_path / "s.safetensors"
    _run(model, data, out)
    monkeypatch.undo()
    assert out.read_bytes() == reference
    folder, work, target = (
        str(tmp_path.resolve()),
        str((tmp_path / "s.safetensors.calib").resolve()),
        str(out.resolve()),
    )

    def at(op: str, pred) -> list[int]:
        return [i for i, (o, p) in enumerate(calls) if o == op and pred(p)]

    tmp_out = str(tmp_path.resolve() / ".s.safetensors.shardcut-tmp")
    written = at("fsync", lambda p: p == tmp_out)
    renamed = at("replace", lambda p: p == f"{tmp_out} -> {target}")
    dir_synced = at("fsync", lambda p: p == folder)
    removed = at("unlink", lambda p: p.startswith(work + "/")) + at("rmdir", lambda p: p == work)
    assert written and renamed and removed
    last_rename = renamed[-1]
    assert (
        written[-1]
        < last_rename
        < min(i for i in dir_synced if i > last_rename)
        < min(i for i in removed if i > last_rename)
    )
    # every state.json: its tmp fsynced just before its rename, the folder just after; the partial
    # file it names fsynced, renamed and the folder fsynced before it
    for i in at("replace", lambda p: p.endswith(work + "/state.json")):
        assert calls[i - 1] == ("fsync", work + "/.state.json.shardcut-tmp")
        assert calls[i + 1] == ("fsync", work)
        k = max(at("replace", lambda p: "/partial." in p.split(" -> ")[-1]), key=lambda k: k if k < i else -1)
        assert k < i
        assert calls[k - 1][0] == "fsync" and calls[k - 1][1].endswith(".safetensors.shardcut-tmp")
        assert ("fsync", work) in calls[k:i]


# -- 17.14: locking and disk space --------------------------------------------------------------


def test_two_runs_of_one_output_are_locked_against_each_other(model, data, reference, tmp_path):
    out, ready, go = tmp_path / "s.safetensors", tmp_path / "ready", tmp_path / "go"
    held = subprocess.Popen(
        [sys.executable, "-c", _HELD, str(model), str(data), str(out), str(ready), str(go)],
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert held.poll() is None and time.monotonic() < deadline, held.stderr.read() if held.stderr else ""
            time.sleep(0.05)
        state = (tmp_path / "s.safetensors.calib" / "state.json").read_bytes()
        runner = CliRunner()
        result = runner.invoke(app, ["calibrate", str(model), "--data", str(data), "-o", str(out)])
        assert result.exit_code == 2 and "lock held" in result.output, result.output
        with pytest.raises(OutputError, match="lock held"):  # the same work folder under another name
            _run(model, data, tmp_path / "other.safetensors", work_dir=tmp_path / "s.safetensors.calib")
        assert (tmp_path / "s.safetensors.calib" / "state.json").read_bytes() == state
    finally:
        go.touch()
        held.wait(timeout=300)
    assert held.returncode == 0
    assert out.read_bytes() == reference


def test_spill_files_are_reserved_up_front(model, data, reference, tmp_path):
    sizes = []

    def on_layer(step, cal):
        for i in (0, 1):
            st = cal.store.path(i).stat()
            sizes.append((st.st_size, st.st_blocks * 512))

    from shardcut.ops.calibration.runner import CalibrateOptions, Calibrator

    cal = Calibrator(
        str(model),
        str(data),
        tmp_path / "s.safetensors",
        CalibrateOptions(max_length=64, batch_tokens=96, max_memory="1"),
        on_layer=on_layer,
    )
    cal.run()
    assert sizes and all(size == cal.store.nbytes and blocks >= size for size, blocks in sizes)
    assert (tmp_path / "s.safetensors").read_bytes() == reference


def test_full_disk_is_a_one_line_error(model, data, tmp_path, monkeypatch):
    import shardcut.format.durable as durable  # the one free-space probe

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(durable.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    result = CliRunner().invoke(
        app, ["calibrate", str(model), "--data", str(data), "-o", str(tmp_path / "s.safetensors"), "--max-memory", "1"]
    )
    assert result.exit_code == 2 and "not enough disk space for the spilled activations" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    # activations in RAM: no room for checkpoints is said, and the run still completes
    events = []
    _run(model, data, tmp_path / "r.safetensors", progress=events.append)
    assert any("no activation checkpoints" in e.message for e in events)
    with pytest.raises(OutputError, match="not enough disk space for activation checkpoints"):
        _run(model, data, tmp_path / "e.safetensors", checkpoint_every=1)
    monkeypatch.undo()

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OutputError, match="no space left for"):
        _run(model, data, tmp_path / "f.safetensors", max_memory="1")
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["r.safetensors"]


def test_checkpoint_policy():
    assert checkpoint_due(0.0, None, None, 1)  # the first one measures the write
    assert not checkpoint_due(5.0, 1.0, None, 3)  # 1 s of writing after 5 s of compute: > 10%
    assert checkpoint_due(10.0, 1.0, None, 4)
    assert checkpoint_due(0.0, 100.0, 2, 2) and not checkpoint_due(9.0, 0.0, 2, 1)
    assert not checkpoint_due(1e9, 0.0, 0, 100)
