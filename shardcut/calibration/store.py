"""Where the hidden states of every calibration token live between two layers.

All tokens of all samples form one `[rows, hidden]` array (samples back to back, in batch
order). In RAM it is one buffer updated in place: each batch reads its rows, runs the layer and
writes them back. When it does not fit under the memory budget it spills to two memory-mapped
files on disk, the input and the output of the current layer, swapped after each layer; the
input file is never written while a layer runs, so a crash mid-layer leaves the last finished
layer's hidden states intact and `--resume` continues from them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from shardcut.errors import ShardcutError

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


class ActivationStore:
    """Hidden states of `rows` tokens of width `hidden` in `dtype`, in RAM or spilled to `directory`.

    Example:
        >>> store = ActivationStore(10_000, 4096, torch.bfloat16, budget=2 << 30, directory=Path("work"))
        >>> store.write(0, 128, h); store.commit(); store.read(0, 128)
    """

    def __init__(self, rows: int, hidden: int, dtype: torch.dtype, budget: int, directory: Path,
                 resume_current: int | None = None):
        if dtype not in _NUMPY_VIEW:
            raise ShardcutError(f"activations in {dtype} are not supported (use bfloat16, float16 or float32)")
        self.rows, self.hidden, self.dtype = rows, hidden, dtype
        self.nbytes = rows * hidden * torch.empty((), dtype=dtype).element_size()
        self.mode = "ram" if self.nbytes <= budget else "disk"
        self.current = 0
        self.directory = directory
        if self.mode == "ram":
            self._ram = torch.empty((rows, hidden), dtype=dtype)
            return
        directory.mkdir(parents=True, exist_ok=True)
        self._maps = []
        for i in range(2):
            path = self.path(i)
            reuse = resume_current is not None and path.exists() and path.stat().st_size == self.nbytes
            try:
                self._maps.append(np.memmap(path, dtype=_NUMPY_VIEW[dtype], mode="r+" if reuse else "w+",
                                            shape=(rows, hidden)))
            except OSError as exc:
                raise ShardcutError(f"cannot create the activation file ({exc.strerror or exc})", path) from None
        if resume_current is not None:
            self.current = resume_current

    def path(self, i: int) -> Path:
        return self.directory / f"hidden.{i}.bin"

    def describe(self) -> str:
        gb = self.nbytes / 1e9
        if self.mode == "ram":
            return f"activations: {self.rows} tokens x {self.hidden} in RAM ({gb:.2f} GB)"
        return f"activations: {self.rows} tokens x {self.hidden} spilled to {self.directory} (2 x {gb:.2f} GB on disk)"

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

    def commit(self) -> None:
        """The layer is done: its output becomes the next layer's input (flushed to disk first)."""
        if self.mode == "disk":
            out = self._maps[1 - self.current]
            out.flush()
            fd = os.open(self.path(1 - self.current), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.current = 1 - self.current

    def close(self) -> None:
        if self.mode == "disk":
            self._maps.clear()
        else:
            self._ram = None
