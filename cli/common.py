"""What every command shares: the console, the error boundary, progress bars."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from shardcut.errors import ShardcutError

console = Console()
err_console = Console(stderr=True)


def handle_errors(fn: Callable) -> Callable:
    """Bad input ends as one line on stderr and exit code 2; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ShardcutError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def byte_progress(description: str, enabled: bool = True):
    """A rich progress bar by bytes; yields a `(done, total)` callback."""
    if not enabled or not sys.stderr.isatty() and not console.is_terminal:
        yield None
        return
    with Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=err_console, transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"
