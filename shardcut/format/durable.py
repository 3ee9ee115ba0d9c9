"""Writing files so that a crash or power loss leaves either the old state or the new, never a
torn one, and refusing outputs that would destroy an input.

Durability order, as a database does it: write a temporary file beside the target, fsync it,
rename it over the target, fsync the directory (so the rename itself is on disk).

    >>> atomic_write_bytes(Path("scores.safetensors"), data)
    >>> check_output(Path("plan.json"), inputs=[model_dir, scores_path], overwrite=False)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from shardcut.format.errors import OutputError, OutputExistsError


def nearest_existing(path: str | Path) -> Path:
    """`path` (absolute) when it exists, else its nearest existing parent: where a folder that
    is still to be made would live."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def free_space(path: str | Path) -> tuple[Path, int]:
    """(the folder probed, its filesystem's free bytes) for `path` or its nearest existing parent:
    the one free-space probe of prune, --stream and calibration's activation files."""
    probe = nearest_existing(path)
    return probe, shutil.disk_usage(probe).free


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so that names created, renamed or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Replace `path` with `data` durably: temp file, fsync, rename, fsync of the directory.

    mode: permission bits of the new file (default: the umask's, as `open` gives).
    Raises OutputError (naming `path`) when the write fails; the temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.shardcut-tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write ({exc.strerror or exc})", path) from None


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode(), mode)


def check_output(
    out: str | Path, inputs: Iterable[str | Path | None] = (), *, overwrite: bool = False, what: str = "output"
) -> Path:
    """Refuse, before any work, an output file that would destroy something.

    Refused: `out` resolving to one of `inputs` (a file) or lying inside one of them (a folder,
    e.g. MODEL); an existing `out` unless `overwrite`; a directory, or a missing parent folder.
    Returns `out` as a Path.

    Example:
        >>> check_output("scores.safetensors", inputs=[model_dir, "data.txt"])
    """
    out = Path(out)
    target = out.resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(item).resolve()
        if target == src:
            raise OutputError(f"the {what} is one of the inputs ({item})", out)
        if src.is_dir() and src in target.parents:
            raise OutputError(f"the {what} lies inside the input folder {item}", out)
    if out.is_dir():
        raise OutputError(f"the {what} is a directory", out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"the {what} exists (pass overwrite to replace it)", out)
    if not out.parent.is_dir():
        raise OutputError(f"the {what}'s folder does not exist", out.parent)
    return out
