"""Where the hidden states of every calibration token live between two layers.

All tokens of all samples form one `[rows, hidden]` array (samples back to back, in batch
order). In RAM it is one buffer updated in place: each batch reads its rows, runs the layer and
writes them back. When it does not fit under the memory budget it spills to two memory-mapped
files on disk, the input and the output of the current layer, swapped after each layer; the
input file is never written while a layer runs, so a crash mid-layer leaves the last finished
layer's hidden states intact and `--resume` continues from them. The spill files are allocated
up front (a full disk is a one-line error, never a SIGBUS). In RAM, `checkpoint` persists the
buffer at layer boundaries so that `--resume` need not replay every finished layer.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from shardcut.format.durable import free_space, fsync_dir
from shardcut.format.errors import OutputError, ShardcutError
from shardcut.ops.calibration.resume import checkpoint_due

_NUMPY_VIEW = {torch.float32: np.float32, torch.bfloat16: np.uint16, torch.float16: np.uint16}
DEFAULT_RAM_FRACTION = 0.5  # of the memory the OS reports available, when no --max-memory is given


def available_memory() -> int:
    """Bytes the OS reports available (MemAvailable), or 8 GB when it cannot tell."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def reserve(path: Path, nbytes: int) -> None:
    """Create `path` with `nbytes` allocated on disk (so a memmap never meets a full disk, SIGBUS)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OutputError(f"cannot create the activation file ({exc.strerror or exc})", path) from None
    try:
        if os.fstat(fd).st_size != nbytes:
            os.ftruncate(fd, nbytes)
        if nbytes:
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise OutputError(f"no space left for {nbytes:,} bytes of activations", path) from None
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise OutputError(f"cannot reserve the activation file ({exc.strerror or exc})", path) from None
    finally:
        os.close(fd)


def check_space(directory: Path, needed: int, what: str) -> None:
    """One-line error when the folder's filesystem has fewer than `needed` free bytes."""
    free = free_space(directory)[1]
    if free < needed:
        raise OutputError(
            f"not enough disk space for {what}: {needed:,} bytes needed, {free:,} free "
            "(free some, use work_dir on another disk, or raise max_memory)",
            directory,
            params=("work_dir", "max_memory"),
        )


class ActivationStore:
    """Hidden states of `rows` tokens of width `hidden` in `dtype`, in RAM or spilled to `directory`.

    resume_file: a raw `[rows, hidden]` file of a saved state (a spill file or a RAM checkpoint)
    that becomes the first input, whichever mode this store is in.

    Example:
        >>> store = ActivationStore(10_000, 4096, torch.bfloat16, budget=2 << 30, directory=Path("work"))
        >>> store.write(0, 128, h); store.commit(); store.read(0, 128)
    """

    def __init__(
        self, rows: int, hidden: int, dtype: torch.dtype, budget: int, directory: Path, resume_file: Path | None = None
    ):
        if dtype not in _NUMPY_VIEW:
            raise ShardcutError(f"activations in {dtype} are not supported (use bfloat16, float16 or float32)")
        self.rows, self.hidden, self.dtype = rows, hidden, dtype
        self.nbytes = rows * hidden * torch.empty((), dtype=dtype).element_size()
        self.mode = "ram" if self.nbytes <= budget else "disk"
        self.current = 0
        self.directory = directory
        if self.mode == "ram":
            self._ram = torch.empty((rows, hidden), dtype=dtype)
            if resume_file is not None:
                self._load(resume_file, self._bytes_of_ram())
            return
        directory.mkdir(parents=True, exist_ok=True)
        have = sum(min(self.nbytes, p.stat().st_blocks * 512) for p in (self.path(0), self.path(1)) if p.is_file())
        check_space(directory, 2 * self.nbytes - have, "the spilled activations")
        self._maps = []
        for i in range(2):
            path = self.path(i)
            reserve(path, self.nbytes)  # allocated up front: a full disk is an error here, not a SIGBUS later
            try:
                self._maps.append(np.memmap(path, dtype=_NUMPY_VIEW[dtype], mode="r+", shape=(rows, hidden)))
            except OSError as exc:
                raise ShardcutError(f"cannot map the activation file ({exc.strerror or exc})", path) from None
        fsync_dir(directory)
        if resume_file is not None:
            if resume_file.resolve() in (self.path(0).resolve(), self.path(1).resolve()):
                self.current = 0 if resume_file.resolve() == self.path(0).resolve() else 1
            else:  # a RAM checkpoint: copy it into the first spill file
                self._load(resume_file, self._maps[0].data.cast("B"))
                self._sync(0)

    def path(self, i: int) -> Path:
        return self.directory / f"hidden.{i}.bin"

    def describe(self) -> str:
        gb = self.nbytes / 1e9
        if self.mode == "ram":
            return f"activations: {self.rows} tokens x {self.hidden} in RAM ({gb:.2f} GB)"
        return f"activations: {self.rows} tokens x {self.hidden} spilled to {self.directory} (2 x {gb:.2f} GB on disk)"

    def _bytes_of_ram(self) -> memoryview:
        t = self._ram if self.dtype == torch.float32 else self._ram.view(torch.int16)
        return t.numpy().data.cast("B")

    def _load(self, path: Path, into: memoryview) -> None:
        with open(path, "rb") as f:
            got = f.readinto(into)
        if got != self.nbytes:
            raise ShardcutError(f"the saved activations hold {got} bytes, expected {self.nbytes}", path)

    def _view(self, i: int, a: int, b: int) -> torch.Tensor:
        return torch.from_numpy(self._maps[i][a:b]).view(self.dtype)

    def read(self, a: int, b: int) -> torch.Tensor:
        """Rows `[a, b)` of the current layer's input (a view: copy it before writing those rows)."""
        return self._ram[a:b] if self.mode == "ram" else self._view(self.current, a, b)

    def write(self, a: int, b: int, values: torch.Tensor) -> None:
        """Rows `[a, b)` of the current layer's output."""
        if self.mode == "ram":
            self._ram[a:b].copy_(values)
        else:
            self._view(1 - self.current, a, b).copy_(values)

    def _sync(self, i: int) -> None:
        self._maps[i].flush()
        fd = os.open(self.path(i), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self) -> None:
        """The layer is done: its output becomes the next layer's input (flushed to disk first)."""
        if self.mode == "disk":
            self._sync(1 - self.current)
            self.current = 1 - self.current

    def durable_name(self) -> str | None:
        """The file holding the committed activations durably (disk mode), else None."""
        return self.path(self.current).name if self.mode == "disk" else None

    def in_use(self) -> list[str]:
        """Files this store works with (a state cleanup must leave them)."""
        return [self.path(0).name, self.path(1).name] if self.mode == "disk" else []

    def checkpoint(self, path: Path) -> None:
        """Write the RAM buffer (the committed activations) durably to `path`: reserved, written,
        fsynced, renamed into place, folder fsynced."""
        tmp = path.with_name(f".{path.name}.shardcut-tmp")
        reserve(tmp, self.nbytes)
        try:
            fd = os.open(tmp, os.O_WRONLY)
            try:
                view = self._bytes_of_ram()
                while view:
                    view = view[os.write(fd, view[: 1 << 30]) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise OutputError("no space left on device for the activation checkpoint", path) from None
            raise OutputError(f"cannot write the activation checkpoint ({exc.strerror or exc})", path) from None

    def close(self) -> None:
        if self.mode == "disk":
            self._maps.clear()
        else:
            self._ram = torch.empty(0)  # frees the activations


def checkpoint_interval(
    every: int | None, store: ActivationStore, folder: Path, nbytes: int, info: Callable[[str], None]
) -> int | None:
    """The checkpoint interval of RAM activations (`every`, None: automatic) after a free-space
    check: a new checkpoint is written before the old one goes, so two must fit. Without room, an
    automatic interval becomes 0 (no checkpoints, said through `info`); an asked-for one fails."""
    if store.mode == "disk" or every == 0:
        return every
    try:
        check_space(folder, 2 * nbytes, "activation checkpoints")
    except OutputError as exc:
        if every is not None:
            raise
        info(f"{exc}: no activation checkpoints, a resume will recompute every finished layer")
        return 0
    return every


class StepCheckpoints:
    """After each step, the record of the activations a resume restarts from (the run state
    saves it): the spill file on disk, durable after every step; in RAM, a checkpoint file
    written when `checkpoint_due` says so. One rule for calibrate and eval."""

    def __init__(self, store: ActivationStore, folder: Path, every: int | None, activations: dict | None) -> None:
        self.store, self.folder, self.every, self.activations = store, folder, every, activations
        self._since_s, self._since_steps = 0.0, 0
        self._write_s: float | None = None

    def computed(self, seconds: float) -> None:
        """One more step was computed, in `seconds`."""
        self._since_s += seconds
        self._since_steps += 1

    def after(self, step: int, may_write: bool, all_true: Callable[[bool], bool]) -> dict | None:
        """The record for the state saved after `step` (a resume starts at step + 1);
        `may_write`: a RAM checkpoint may be written now; `all_true`: every rank agrees."""
        if self.store.mode == "disk":  # the spill file is durable after every step
            self.activations = {"step": step + 1, "name": self.store.durable_name()}
        elif may_write and all_true(checkpoint_due(self._since_s, self._write_s, self.every, self._since_steps)):
            t0 = time.perf_counter()
            name = f"hidden.s{step + 1:05d}.bin"
            self.store.checkpoint(self.folder / name)
            self._write_s, self._since_s, self._since_steps = time.perf_counter() - t0, 0.0, 0
            self.activations = {"step": step + 1, "name": name}
        return self.activations
