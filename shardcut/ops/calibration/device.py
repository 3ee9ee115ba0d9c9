"""The one place that knows which device a streamed run computes on.

Everything else receives a `torch.device` and passes it down (`tensor.to(device)`, `device=`);
only this module asks `torch.cuda` anything: whether CUDA exists, how much memory is in use or
was at its peak, and waiting for queued kernels before a timer reads the clock. On the CPU the
same calls answer from /proc and do not wait, so the calibrator's timing and memory records
(`LayerTimes`) mean the same on both.
"""

from __future__ import annotations

import os

import torch

from shardcut.format.errors import ShardcutError

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device) -> torch.device:
    """`"auto"` -> CUDA when torch sees one, else the CPU; any other spelling torch accepts
    (`cpu`, `cuda`, `cuda:1`, a `torch.device`) is checked and returned as a `torch.device`."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ShardcutError(f"unknown device {device!r} (use auto, cuda, cuda:N or cpu)") from None
    if dev.type not in ("cuda", "cpu"):
        raise ShardcutError(f"device {str(device)!r} is not supported (use auto, cuda or cpu)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ShardcutError(f"device {str(device)!r} asked for, but torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ShardcutError(
            f"device {str(device)!r} asked for, but torch sees {torch.cuda.device_count()} CUDA devices"
        )
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The compute dtype: bfloat16 on CUDA and float32 on the CPU unless one is named."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ShardcutError(f"unknown dtype {dtype!r} (use bfloat16 or float32)")
    return DTYPES[dtype]


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on the CPU, where calls return when done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def current_memory(device: torch.device) -> int:
    """Bytes in use: allocated device memory on CUDA, resident set size on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_memory(device: torch.device) -> int:
    """The most bytes in use since the last `reset_peak_memory`: allocated device memory on CUDA;
    on the CPU the process's peak resident set (VmHWM), which only a process-wide reset lowers."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for `peak_memory` on CUDA (per layer); the CPU's VmHWM is left alone
    (resetting it is process-wide and would disturb whoever measures the whole run)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
