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

from shardcut.errors import ShardcutError

STATE_NAME = ".shardcut-resume.json"


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.shardcut-partial"


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.shardcut-lock"


def check_output_path(out: Path, source: Path) -> None:
    """OUT must not exist (or be an empty folder) and must not lie inside the source."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ShardcutError("output exists and is not an empty directory", out)
    src_r, out_r = source.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise ShardcutError(f"output lies inside the input checkpoint {source}", out)


def check_free_space(where: Path, needed: int) -> None:
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ShardcutError(
            f"not enough disk space: the output needs {needed:,} bytes, {free:,} are free", probe
        )


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
            state_file.write_text(json.dumps(self.state, sort_keys=True))
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
        (self.dir / STATE_NAME).unlink(missing_ok=True)
        for stale in self.dir.glob("*.part"):
            stale.unlink()
        if self.out.exists():
            self.out.rmdir()
        os.replace(self.dir, self.out)
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
