"""What every command shares: the console, the error boundary, progress bars."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from shardcut.format.errors import ShardcutError
from shardcut.format.text import human_bytes as human_bytes  # the commands' byte formatting

console = Console()
err_console = Console(stderr=True)

# C0 and C1 control characters (ESC starts ANSI and OSC sequences: OSC 52 writes the clipboard),
# DEL, and the Unicode bidirectional overrides that make text display other than it reads.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_KEEP_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def safe(value: object, *, markup: bool = True, lines: bool = False) -> str:
    r"""A string from a file (metadata, tensor names, paths, messages quoting them) made safe to
    print: every control character shown as a visible `\xNN` escape instead of reaching the
    terminal, and, for text printed with rich markup on (`markup`), `[` escaped so `model[v2]`
    prints as written and `[/oops]` cannot break the line. `lines` keeps newlines and tabs.

    Example:
        >>> print(safe("model[v2] \x1b]52;c;aGk=\x07"))
        model\[v2] \x1b]52;c;aGk=\x07
    """
    pattern = _UNSAFE_KEEP_LINES if lines else _UNSAFE
    text = pattern.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", str(value)
    )
    return escape(text) if markup else text


# The flag of every library parameter whose flag is not its name with dashes (`create_pr` ->
# `--create-pr`): the one mapping from the library's words to the command line's.
FLAGS = {"eval_report": "--eval", "fmt": "--format"}
# A quoted value ('...' standing alone, not the apostrophe of "layer 3's"): left as it is.
_QUOTED = r"(?<!\w)'(?:[^'\\]|\\.)*'(?!\w)"


def flag_of(param: str) -> str:
    return FLAGS.get(param, "--" + param.replace("_", "-"))


def cli_message(exc: ShardcutError) -> str:
    """The error's one line with the parameters it names (`exc.params`) shown as their flags.

    Example:
        >>> cli_message(ShardcutError("protect '3': expected LAYER:ID", params=("protect",)))
        "--protect '3': expected LAYER:ID"
    """
    text = str(exc)
    if not exc.params:
        return text
    prefix = f"{exc.path}: " if exc.path is not None and text.startswith(f"{exc.path}: ") else ""
    names = "|".join(re.escape(p) for p in sorted(exc.params, key=len, reverse=True))
    pattern = re.compile(rf"({_QUOTED})|(?<![\w.-])({names})(?![\w-])")
    body = pattern.sub(lambda m: m.group(1) or flag_of(m.group(2)), text[len(prefix) :])
    return prefix + body


def handle_errors(fn: Callable) -> Callable:
    """Bad input ends as one line on stderr and exit code 2; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ShardcutError as exc:
            line = safe(cli_message(exc))
            err_console.print(f"[bold red]error:[/] {line}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {safe(message)}", soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def byte_progress(description: str, enabled: bool = True):
    """A rich progress bar by bytes; yields a `(done, total)` callback."""
    if not enabled or not sys.stderr.isatty() and not console.is_terminal:
        yield None
        return
    # imported here: rich.progress is ~30 ms of start-up that a prune without a terminal never uses
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
