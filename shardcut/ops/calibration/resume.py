"""The state a calibration run keeps in its work folder, so `--resume` can continue it.

The work folder (`SCORES.calib/` by default, or `--work-dir`) is created and marked by
shardcut (`.shardcut-calib-workdir`); a folder without the mark is never used, so nothing a user
owns is ever deleted, and only the files shardcut names itself are ever removed from it. It holds:

- `partial.NNNNN.safetensors`: the accumulators after step NNNNN - 1 (written every step);
- activations, the hidden states entering some step C <= the next step: the spill files
  `hidden.{0,1}.bin` when they live on disk, or a checkpoint `hidden.sNNNNN.bin` of the RAM
  buffer (written at a checkpoint interval, see `checkpoint_due`), per rank under torchrun;
- `state.json`: the run's fingerprint (every input that decides the result), the next step,
  the partial file's name and sha256, and which activations file enters which step.

Each file is written durably (data, fsync, rename, fsync of the folder) before `state.json`
names it, and `state.json` is written the same way last; files a state no longer names are
removed only after it is durable. A resume checks the named files (sha256, sizes), replays the
steps between the activations' step and the next step without recording (bit-identical), then
continues. The state is independent of where activations live (RAM or disk), so a resume
with another `--max-memory` gives the same result. A torn or inconsistent state starts over
with a message; a state of another run (data, weights, settings) stops with a message.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, TypeVar

from shardcut.format.durable import atomic_write_bytes, atomic_write_text, fsync_dir
from shardcut.format.errors import OutputError, ShardcutError
from shardcut.ops.calibration.distributed import Distributed
from shardcut.plans.scores import Scores

STATE_FORMAT = "shardcut-calib-state/2"
MARKER = ".shardcut-calib-workdir"
MARKER_FORMAT = "shardcut-calib-workdir/1"
# the only names shardcut ever removes from its work folder (rank folders hold the same names)
_OURS = re.compile(r"^(state\.json|partial\.\d+\.safetensors|hidden\.(\d|s\d+)\.bin|\..+\.shardcut-tmp|rank\d+)$")
CHECKPOINT_OVERHEAD = 0.1  # RAM checkpoints may cost at most this fraction of the compute time
SAMPLE_BYTES, SAMPLES_PER_SHARD = 4096, 16  # sampled bytes of each shard in the weights fingerprint
T = TypeVar("T")


class Partial(Protocol):
    """What a run saves after every step: `Scores`, or evaluation's `EvalTally`."""

    def to_bytes(self) -> bytes: ...

    def validate(self, source: str | Path = ...) -> None: ...


class Result(Protocol):
    """What `finish` writes durably before the work folder goes."""

    def save(self, path: Path) -> None: ...


def state_dir_for(out: Path, suffix: str = ".calib") -> Path:
    """`scores.safetensors` -> `scores.safetensors.calib/` (`eval` uses `.eval`)."""
    return out.with_name(out.name + suffix)


def checkpoint_due(compute_s: float, write_s: float | None, every: int | None, steps_since: int) -> bool:
    """Whether to persist the RAM activations after this step.

    every=None (default): as often as costs at most CHECKPOINT_OVERHEAD of the compute, i.e. when
    the steps computed since the last checkpoint took >= write time / CHECKPOINT_OVERHEAD (the
    first checkpoint is always written, which measures the write time). every=k: every k steps;
    every=0: never (a resume then replays the finished layers).
    """
    if every is not None:
        return every > 0 and steps_since >= every
    return write_s is None or compute_s * CHECKPOINT_OVERHEAD >= write_s


def weights_fingerprint(ckpt) -> str:
    """Cheap on any size, changes with any new revision: per shard its name, size, mtime, the
    sha256 of its whole header, and SAMPLES_PER_SHARD blocks of tensor bytes spread over it."""
    digest = hashlib.sha256()
    for shard in ckpt.shards:
        st = os.stat(shard.path)
        digest.update(f"{shard.path.name}|{st.st_size}|{st.st_mtime_ns};".encode())
        with open(shard.path, "rb") as f:
            digest.update(hashlib.sha256(f.read(shard.data_start)).digest())
            span = max(0, st.st_size - shard.data_start - SAMPLE_BYTES)
            for i in range(SAMPLES_PER_SHARD):
                f.seek(shard.data_start + span * i // max(1, SAMPLES_PER_SHARD - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def fingerprint_of(run) -> dict[str, str]:
    """What must be equal for a saved state to continue into identical results."""
    ckpt = run.ckpt
    shapes = hashlib.sha256()
    for name in sorted(ckpt.tensors):
        _, t = ckpt.tensors[name]
        shapes.update(f"{name}|{t.dtype}|{list(t.shape)};".encode())
    config = hashlib.sha256(json.dumps(ckpt.config, sort_keys=True).encode()).hexdigest()
    return {
        "model": f"{config[:16]}-{shapes.hexdigest()[:16]}",
        "weights": weights_fingerprint(ckpt)[:32],
        "revision": str(run.revision or ""),
        "data": run.all_data.fingerprint()[:32],
        "data_spec": run.data,
        "max_length": str(run.max_length),
        "seed": str(run.seed),
        "dtype": str(run.torch_dtype).removeprefix("torch."),
        "shard": f"{run.shard_of[0]}/{run.shard_of[1]}" if run.shard_of else "all",
        "world_size": str(run.dist.world),
        "batch_tokens": str(run.budget_tokens),
        "trust_remote_code": str(bool(run.trust_remote_code)),
    }


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_work_dir(directory: Path, inputs: Iterable[Path | None]) -> None:
    """Refuse a work folder that is, holds, or lies inside one of the inputs (MODEL, data)."""
    work = directory.resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(item).resolve()
        if _inside(src, work):
            raise OutputError(f"the work folder is or holds the input {item}: refusing to use it", directory)
        if src.is_dir() and _inside(work, src):
            raise OutputError(f"the work folder lies inside the input folder {item}", directory)


class Lock:
    """An exclusive lock file (flock), held until `release`; a second holder is refused."""

    def __init__(self, path: Path, what: Path, command: str = "calibrate"):
        import fcntl

        self.path = path
        try:
            self.fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create the lock file ({exc.strerror or exc})", path) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise OutputError(f"another shardcut {command} is writing this output (lock held)", what) from None

    def release(self, unlink: bool = True) -> None:
        if self.fd is not None:
            if unlink:
                self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


class RunState:
    """The work folder of one run (only rank 0 writes shared files; each rank its activations)."""

    def __init__(self, directory: Path, dist: Distributed):
        self.directory, self.dist = Path(directory), dist
        self.rank_dir = self.directory / f"rank{dist.rank}" if dist.world > 1 else self.directory
        self.fingerprint: dict[str, str] = {}
        self.created = False  # whether shardcut made the folder (then it removes it at the end)
        self.saved: dict = {}
        self.activations: dict | None = None  # {"step": C, "name": file in rank_dir} of the state on disk
        self._lock: Lock | None = None

    @property
    def state_path(self) -> Path:
        return self.directory / "state.json"

    @property
    def marker_path(self) -> Path:
        return self.directory / MARKER

    # -- the folder --------------------------------------------------------------------------

    def open(self) -> None:
        """Create and mark the folder, or adopt an empty one, or reuse one shardcut marked; lock it."""
        d = self.directory
        if self.dist.rank == 0:
            if d.is_symlink() or (d.exists() and not d.is_dir()):
                raise OutputError("the work folder exists and is not a folder", d)
            if d.is_dir() and not self.marker_path.is_file():
                if any(d.iterdir()):
                    raise OutputError(
                        "the work folder exists and was not made by shardcut (no .shardcut-calib-workdir mark): "
                        "refusing to use it, since its files could be removed; name a new folder",
                        d,
                    )
                self._mark(created=False)
            elif not d.exists():
                if not d.parent.is_dir():
                    raise OutputError("the work folder's parent folder does not exist", d.parent)
                try:
                    d.mkdir()
                except OSError as exc:
                    raise OutputError(f"cannot create the work folder ({exc.strerror or exc})", d) from None
                self._mark(created=True)
                fsync_dir(d.parent)
            try:
                self.created = bool(json.loads(self.marker_path.read_text()).get("created"))
            except (OSError, ValueError):
                self.created = False
            self._lock = Lock(self.marker_path, d)
        self.dist.barrier()
        if self.rank_dir != d:
            self.rank_dir.mkdir(exist_ok=True)

    def _mark(self, created: bool) -> None:
        atomic_write_text(self.marker_path, json.dumps({"format": MARKER_FORMAT, "created": created}) + "\n")

    def _remove_ours(self, folder: Path, keep: Callable[[str], bool] = lambda name: False, dirs: bool = False) -> None:
        """Remove the files (and with `dirs` the rank folders) of `folder` that shardcut names
        itself, never anything else."""
        if not folder.is_dir():
            return
        for p in folder.iterdir():
            if not _OURS.match(p.name) or keep(p.name) or p.is_symlink():
                continue
            if p.is_dir():
                if not dirs:
                    continue
                self._remove_ours(p)
                try:
                    p.rmdir()
                except OSError:
                    pass  # it holds something shardcut did not write: leave it
            else:
                p.unlink(missing_ok=True)

    def clear(self) -> None:
        """Discard the saved run: shardcut's own files only."""
        self.dist.barrier()
        if self.dist.rank == 0:
            self._remove_ours(self.directory)
            fsync_dir(self.directory)
        self.dist.barrier()
        if self.rank_dir != self.directory:
            self._remove_ours(self.rank_dir)
        self.dist.barrier()
        self.saved, self.activations = {}, None

    def close(self) -> None:
        """Release the folder's lock (the state stays for --resume)."""
        if self._lock is not None:
            self._lock.release(unlink=False)
            self._lock = None

    # -- resuming ----------------------------------------------------------------------------

    def begin(self, fingerprint: dict[str, str], resume: bool, log: Callable[[str], None]) -> int:
        """The next step of a matching saved run when resuming (its files checked), else 0."""
        self.fingerprint = fingerprint
        if not self.state_path.exists():
            if resume:
                log(f"no saved state in {self.directory}: starting from the beginning")
            self.clear()
            return 0
        if not resume:
            log(f"discarding the unfinished run in {self.directory} (use --resume to continue one)")
            self.clear()
            return 0
        try:
            saved = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as exc:
            log(f"unreadable resume state {self.state_path} ({exc}): starting from the beginning")
            self.clear()
            return 0
        if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
            raise ShardcutError(
                f"not a {STATE_FORMAT} file (left by another shardcut version? run without resume to start over)",
                self.state_path,
                params=("resume",),
            )
        old = saved.get("fingerprint") or {}
        for key, value in fingerprint.items():
            if old.get(key) != value:
                what = "the weights changed" if key in ("weights", "revision") else "another run"
                raise ShardcutError(
                    f"resume state is from {what}: {key} was {old.get(key)!r}, now {value!r} "
                    f"(run without resume to start over)",
                    self.state_path,
                    params=("resume",),
                )
        problem = self._check_files(saved)
        if not self.dist.all_true(problem is None):
            log(
                f"resume state in {self.directory} is inconsistent ({problem or 'on another rank'}): "
                "starting from the beginning"
            )
            self.clear()
            return 0
        self.saved, self.activations = saved, saved.get("activations")
        return int(saved["next_step"])

    def _check_files(self, saved: dict) -> str | None:
        """Why the files the state names cannot be trusted (None when they can)."""
        partial = saved.get("partial") or {}
        path = self.directory / str(partial.get("name", ""))
        if not isinstance(saved.get("next_step"), int) or not partial.get("name") or not path.is_file():
            return f"{path.name or 'the partial scores'} is missing"
        if hashlib.sha256(path.read_bytes()).hexdigest() != partial.get("sha256"):
            return f"{path.name} does not hold the scores state.json describes"
        act = saved.get("activations")
        if act is not None:
            if not isinstance(act, dict) or not isinstance(act.get("step"), int) or act["step"] > saved["next_step"]:
                return "its activations entry is malformed"
            apath = self.rank_dir / str(act.get("name", ""))
            if re.fullmatch(r"hidden\.\d\.bin", apath.name) and act["step"] != saved["next_step"]:
                return "its spilled activations are not those of its last step"  # they were reused since
            if not apath.is_file():
                return f"the activations {apath.name} are missing"
        return None

    def activations_file(self, nbytes: int) -> tuple[int, Path | None]:
        """(step the saved activations enter, their file); (0, None) when there are none."""
        if not self.activations:
            return 0, None
        path = self.rank_dir / self.activations["name"]
        size = path.stat().st_size if path.is_file() else -1
        if not self.dist.all_true(size == nbytes):
            raise ShardcutError(
                f"the saved activations hold {size} bytes, expected {nbytes} (run without resume to start over)",
                path,
                params=("resume",),
            )
        return int(self.activations["step"]), path

    def load_scores(self) -> Scores | None:
        return self.load_partial(Scores.load)

    def load_partial(self, load: Callable[[Path], T]) -> T | None:
        """The saved accumulators, read by `load` (`Scores.load`, or another run's own reader)."""
        partial = self.saved.get("partial") or {}
        return load(self.directory / partial["name"]) if partial.get("name") else None

    def created_at(self) -> str | None:
        return self.saved.get("created")

    # -- saving ------------------------------------------------------------------------------

    def save(
        self, next_step: int, scores: Partial, activations: dict | None, created: str, in_use: Iterable[str] = ()
    ) -> None:
        """Persist a finished step (every rank calls it; its activations file is durable already).

        activations: {"step", "name"} of the newest durable activations (None: none saved).
        in_use: activation files the store still works with (never removed here).
        """
        self.dist.barrier()
        name = f"partial.{next_step:05d}.safetensors"
        if self.dist.rank == 0:
            data = scores.to_bytes()
            scores.validate(self.directory / name)
            atomic_write_bytes(self.directory / name, data)  # data, fsync, rename, fsync of the folder
            self.saved = {
                "format": STATE_FORMAT,
                "next_step": next_step,
                "fingerprint": self.fingerprint,
                "created": created,
                "partial": {"name": name, "sha256": hashlib.sha256(data).hexdigest()},
                "activations": activations,
            }
            atomic_write_text(self.state_path, json.dumps(self.saved, indent=2) + "\n")  # the commit point
        self.dist.barrier()
        self.activations = activations
        # only now that the new state is durable may what the old one named go
        keep = {activations["name"]} if activations else set()
        keep.update(in_use)
        if self.dist.rank == 0:
            self._remove_ours(
                self.directory,
                keep=lambda n: n in (name, "state.json") or (n in keep and self.rank_dir == self.directory),
            )
        if self.rank_dir != self.directory:
            self._remove_ours(self.rank_dir, keep=lambda n: n in keep)

    def finish(self, scores: Result, out: Path) -> None:
        """Write the score file durably, then (only then) remove the work folder's files."""
        self.dist.barrier()
        if self.dist.rank == 0:
            scores.save(out)  # fsync of the file, rename, fsync of its folder
        self.dist.barrier()
        if self.rank_dir != self.directory:
            self._remove_ours(self.rank_dir)
        self.dist.barrier()
        if self.dist.rank == 0:
            self._remove_ours(self.directory, dirs=True)
            self.close()
            self.marker_path.unlink(missing_ok=True)  # shardcut wrote it, in its folder or the user's empty one
            if self.created:
                try:
                    self.directory.rmdir()
                except OSError:
                    pass  # something that is not shardcut's is in it: keep it
                fsync_dir(self.directory.parent)
            elif self.directory.exists():
                fsync_dir(self.directory)
        self.dist.barrier()
