"""What every benchmark measures the same way: wall time and peak RSS of a fresh process."""

from __future__ import annotations

import os
import subprocess
import time


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run `cmd`; return its wall seconds and peak RSS in bytes (from wait4, so only that
    process counts; ru_maxrss survives fork+exec, so call this from a small parent)."""
    wall, rss, _ = timed_usage(cmd, env)
    return wall, rss


def timed_usage(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, float]:
    """`timed`, plus the CPU seconds (user + system) the process and its threads used: on a
    shared machine the wall time of a CPU-starved process stretches, its CPU time much less."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime
