"""Writing an output checkpoint folder as a transaction.

Everything is written under `.{OUT}.shardcut-partial` next to OUT, each shard first as
`{name}.part` and renamed when complete, and the folder is renamed to OUT only at the end.
So at any instant (SIGKILL included) OUT either does not exist or is complete. A lock file
makes a second concurrent writer of the same OUT refuse. A resume state file records what
the partial folder is being built from, so `--resume` never mixes two different prunes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from shardcut.format.durable import atomic_write_text, free_space, fsync_dir, nearest_existing
from shardcut.format.errors import OutputError, OutputExistsError, ShardcutError

STATE_NAME = ".shardcut-resume.json"
NAME_MAX = 255  # bytes in one path component on Linux filesystems


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.shardcut-partial"


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.shardcut-lock"


def check_output_path(out: Path, source: Path) -> None:
    """Refuse, before any work, an OUT folder the transaction could not commit or would destroy.

    OUT must not exist (or be an empty folder) and must not lie inside the source; it must not be
    a symlink (dangling or not: the rename would replace the link, not fill its target) nor a
    mount point (the finished folder is renamed into place, which cannot cross filesystems); the
    partial folder's name must fit in a path component; the parent must be a writable folder.
    """
    if out.is_symlink():
        raise OutputError(f"the output is a symlink (to {os.readlink(out)}); give the real folder", out)
    if os.path.ismount(out):
        raise OutputError(
            "the output is a mount point: shardcut builds OUT beside it and renames it into "
            "place, which cannot cross filesystems; give a folder inside the mount",
            out,
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError("output exists and is not an empty directory", out)
    src_r, out_r = source.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise OutputError(f"output lies inside the input checkpoint {source}", out)
    longest = max(partial_dir(out).name, lock_path(out).name, key=lambda n: len(os.fsencode(n)))
    if len(os.fsencode(longest)) > NAME_MAX:
        raise OutputError(f"output name too long: its work folder {longest[:40]}… would exceed {NAME_MAX} bytes", out)
    parent = _existing_parent(out)
    if not parent.is_dir():
        raise OutputError("the output's parent is not a folder", parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError("cannot write in the output's parent folder (permission denied)", parent)


def _existing_parent(out: Path) -> Path:
    return nearest_existing(out.absolute().parent)


def check_free_space(where: Path, needed: int) -> None:
    """Refuse when the filesystem of `where` (or of its nearest existing parent) has less than
    `needed` bytes free. For OUT pass OUT's parent: the partial folder, where every byte is
    written, lives there (a mount point as OUT is refused by `check_output_path`)."""
    probe, free = free_space(where)
    if free < needed:
        raise OutputError(f"not enough disk space: the output needs {needed:,} bytes, {free:,} are free", probe)


def sync_tree(root: Path) -> None:
    """fsync every regular file under `root`, then every folder, deepest first, `root` last."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.isfile(path) or os.path.islink(path):
                continue  # only what shardcut wrote: regular files
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


class OutputTransaction:
    """Lock OUT, prepare (or resume) its partial folder, and commit it by rename.

    Example:
        >>> with OutputTransaction(out, state={"plan": sha}, resume=False) as tx:
        ...     tx.dir / "model-00001-of-00001.safetensors"   # write here
        ...     tx.commit()
    """

    def __init__(self, out: Path, state: dict, resume: bool = False) -> None:
        self.out = Path(out)
        self.state = state
        self.resume = resume
        self.dir = partial_dir(self.out)
        self.resumed = False
        self._lock_fd: int | None = None
        self._committed = False

    def __enter__(self) -> OutputTransaction:
        import fcntl

        self.out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path(self.out), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ShardcutError("another shardcut process is writing this output (lock held)", self.out) from None
        self._lock_fd = fd
        state_file = self.dir / STATE_NAME
        if self.dir.exists():
            same = False
            if self.resume and state_file.exists():
                try:
                    same = json.loads(state_file.read_text()) == self.state
                except ValueError:
                    same = False
            if same:
                self.resumed = True
            else:
                shutil.rmtree(self.dir)
        if not self.resumed:
            self.dir.mkdir(parents=True)
            atomic_write_text(state_file, json.dumps(self.state, sort_keys=True))
        return self

    def finished(self, name: str, expected_size: int) -> bool:
        """Whether shard `name` was completed by an earlier, interrupted run (size checked here;
        the caller compares its bytes with the source before trusting it)."""
        path = self.dir / name
        return self.resumed and path.exists() and path.stat().st_size == expected_size

    def shard_path(self, name: str) -> Path:
        return self.dir / f"{name}.part"

    def shard_done(self, name: str) -> None:
        os.replace(self.dir / f"{name}.part", self.dir / name)

    def commit(self) -> None:
        """Make OUT appear, complete and durable, in one rename.

        Order, as a database does it: every file of the partial folder fsynced, then every folder
        in it (bottom up, so each file's name is durable), then the rename to OUT, then OUT's
        parent, so that after a power loss OUT is either absent or complete on disk.
        """
        (self.dir / STATE_NAME).unlink(missing_ok=True)
        for stale in self.dir.glob("*.part"):
            stale.unlink()
        sync_tree(self.dir)
        if self.out.exists():
            self.out.rmdir()
        os.replace(self.dir, self.out)
        fsync_dir(self.out.parent)
        self._committed = True

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            # An interrupted run (Ctrl-C) keeps its finished shards for --resume; any other failure
            # removes the partial output so a full disk is freed and nothing stale remains.
            if not self._committed and exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
                shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            if self._lock_fd is not None:
                lock_path(self.out).unlink(missing_ok=True)
                os.close(self._lock_fd)
        if exc_type is not None and issubclass(exc_type, OSError) and exc.errno == errno.ENOSPC:
            raise ShardcutError("no space left on device; the partial output was removed", self.out) from None
