"""Shards flushed and read back from the disk while they are written, and compared with their sources.

A shard is written front to back, with `O_DIRECT` by `direct_write.write_shard_direct` or
through the page cache by `container.write_shard`; a `Follower` on a second thread trails it
chunk by chunk. Behind the page-cache writer it first waits for the chunk's write-back to the
device to complete (`sync_file_range`); a direct write is on the device when reported. It then
reads the chunk back from the device with `O_DIRECT` (never from the page cache), compares it
with the bytes it must hold (the encoded header, then the source ranges: as the direct writer
read them, in a staging buffer apart from the one it wrote (`Staged`), or read again through
the pinned descriptors the copy read; never the writer's buffer, so a fault in that buffer is
caught), and drops the chunk's pages from the page cache (if it went through it). At the end it fsyncs
the file (then only metadata and the device's cache are left to flush). Both sides wait on the
disk and release the GIL (the compare is `memcmp` on reused buffers), so verification costs
little time beyond the copy.

Where `O_DIRECT` or `sync_file_range` is missing (another OS, a filesystem refusing direct
I/O) the follower falls back to fdatasync, `POSIX_FADV_DONTNEED` and ordinary reads: pages that
were just written back are clean, and dropping them makes the read come from the device.

    >>> header = encode_header(tensors, meta)
    >>> f = Follower(path, shard_segments(header, tensors), len(header) + sum(t.nbytes for t in tensors))
    >>> job = pool.submit(f.run)
    >>> write_shard(path, tensors, meta, sources=pinned, sync=False, on_written=f.written)
    >>> f.writer_done(); job.result()
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from shardcut.format.container import OutTensor, Piece, PinnedSources, read_header
from shardcut.format.errors import ShardcutError

CHUNK = 32 << 20  # bytes flushed, read back and compared at a time (a multiple of ALIGN)
ALIGN = 4096  # O_DIRECT offsets, lengths and buffers are multiples of the logical block size
WINDOW = 512 << 20  # how far the writer may run ahead of what was verified (bounds dirty pages)
DIRECT_WINDOW_CHUNKS = 4  # the same behind a direct writer, in chunks (bounds the source bytes it keeps)

_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4  # SYNC_FILE_RANGE_* of <fcntl.h>


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.memcmp.restype = ctypes.c_int
        libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        sfr = getattr(libc, "sync_file_range", None)
        if sfr is not None:
            sfr.restype = ctypes.c_int
            sfr.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return libc, sfr
    except (OSError, AttributeError):
        return None, None


_LIBC, _SYNC_FILE_RANGE = _load_libc()  # ctypes calls release the GIL


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing `[offset, offset + length)` to the device now, without
    waiting (the copy of the next chunk then overlaps this one's write-back)."""
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, offset, length, _WRITE)  # advice: errors surface at the wait or fsync


def wait_writeback(fd: int, offset: int, length: int) -> None:
    """Return once `[offset, offset + length)` is written to the device (not yet flushed from
    its cache: the fsync at the end does that)."""
    if _SYNC_FILE_RANGE is not None:
        if _SYNC_FILE_RANGE(fd, offset, length, _WAIT_BEFORE | _WRITE | _WAIT_AFTER) == 0:
            return
        err = ctypes.get_errno()
        if err not in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not on this filesystem
            raise OSError(err, os.strerror(err))
    os.fdatasync(fd)


def _drop(fd: int, offset: int, length: int) -> None:
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass


class Buffer:
    """A page-aligned, reused buffer (anonymous mmap), so O_DIRECT reads land in it and no
    chunk allocates or faults in fresh memory."""

    def __init__(self, size: int) -> None:
        self.map = mmap.mmap(-1, size)
        self.view = memoryview(self.map)
        self._anchor = ctypes.c_char.from_buffer(self.map) if _LIBC is not None else None
        self.address = ctypes.addressof(self._anchor) if self._anchor is not None else 0

    def close(self) -> None:
        self._anchor = None
        self.view.release()
        try:
            self.map.close()
        except BufferError:  # a slice is still referenced (by a traceback's frame): freed with it
            pass


_POOL_LOCK = threading.Lock()
_POOL: list[Buffer] = []  # buffers given back, for the next shard
POOL_MAX = 16  # enough for a shard's buffers: 3 written, 2 read back, the staged window


def take_buffer(size: int) -> Buffer:
    """A buffer of `size` bytes, reused where one was given back: a fresh mmap per shard would
    fault in fresh memory for every shard (on a VM, each page from the host)."""
    with _POOL_LOCK:
        for i, b in enumerate(_POOL):
            if len(b.map) == size:
                return _POOL.pop(i)
    return Buffer(size)


def return_buffer(buf: Buffer) -> None:
    """Return a buffer of `take_buffer` for reuse (closed if the pool is full)."""
    with _POOL_LOCK:
        if len(_POOL) < POOL_MAX:
            _POOL.append(buf)
            return
    buf.close()


def release_buffers() -> None:
    """Close every pooled buffer (the end of a rewrite: the process's memory goes back to what it was)."""
    with _POOL_LOCK:
        bufs, _POOL[:] = list(_POOL), []
    for b in bufs:
        b.close()


def same_bytes(a: Buffer, a_off: int, b: Buffer, b_off: int, n: int) -> bool:
    """Whether `n` bytes of two buffers are equal (memcmp, GIL released; bytes compare without libc)."""
    if _LIBC is not None:
        return _LIBC.memcmp(a.address + a_off, b.address + b_off, n) == 0
    return bytes(a.view[a_off : a_off + n]) == bytes(b.view[b_off : b_off + n])


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from `fd` at `offset`; returns the bytes read (fewer only at end of file)."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            break
        got += n
    return got


DIRECT_MIN = 64 << 10  # source ranges at least this long are read with O_DIRECT; shorter ones through the page cache


class DirectSources:
    """`O_DIRECT` descriptors of source files, opened on first use. `buffered(path)` gives the
    descriptor already open for a file (pinned, or opened by path); it is reopened through
    `/proc/self/fd` (the very inode open, whatever its path now names), else by path and
    checked to be the same file. None where the filesystem (or the OS) refuses direct I/O.
    `read` may run on several threads at once."""

    def __init__(self, buffered) -> None:
        self._buffered = buffered
        self._lock = threading.Lock()
        self._fds: dict[Path, int | None] = {}
        self._refused: list[int] = []  # closed at `close`: a read on another thread may still use one

    def staged(self, piece: Piece) -> bool:
        """Whether `piece` is read with O_DIRECT."""
        return piece.length >= DIRECT_MIN and self.fd(piece.path) is not None

    def fd(self, path: Path) -> int | None:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = self._open(path)
            return self._fds[path]

    def _open(self, path: Path) -> int | None:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        known = self._buffered(path)
        for name in (f"/proc/self/fd/{known}", path):
            try:
                fd = os.open(name, os.O_RDONLY | flag)
            except OSError:
                continue
            a, b = os.fstat(fd), os.fstat(known)
            if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
                return fd
            os.close(fd)
        return None

    def read(self, path: Path, buf: Buffer, at: int, offset: int, n: int) -> int | None:
        """`read_direct` of `path`'s bytes `[offset, offset + n)` into `buf` at `at`; returns
        where they start in `buf`, or None if this file is not read with O_DIRECT (refused
        at open, or now: EINVAL, e.g. a device whose blocks are larger than ALIGN; remembered)."""
        fd = self.fd(path)
        if fd is None:
            return None
        try:
            return read_direct(fd, path, buf, at, offset, n)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            with self._lock:
                if self._fds.get(path) == fd:
                    self._fds[path] = None
                    self._refused.append(fd)
            return None

    def close(self) -> None:
        with self._lock:
            fds = [fd for fd in self._fds.values() if fd is not None] + self._refused
            self._fds.clear()
            self._refused = []
        for fd in fds:
            os.close(fd)


def stage_size(chunk: int) -> int:
    """Bytes that hold the O_DIRECT reads of one chunk's source ranges: each read covers its range
    rounded out to ALIGN at both ends, and ranges read so are at least DIRECT_MIN long, so the
    rounding adds at most 2 * ALIGN per DIRECT_MIN (+ ranges split at the chunk's ends)."""
    return chunk + chunk // 8 + 4 * ALIGN


def direct_cover(offset: int, n: int) -> tuple[int, int]:
    """The aligned range an O_DIRECT read of bytes `[offset, offset + n)` must cover."""
    return offset - offset % ALIGN, -(-(offset + n) // ALIGN) * ALIGN


def read_direct(fd: int, path: Path, buf: Buffer, at: int, offset: int, n: int) -> int:
    """Read bytes `[offset, offset + n)` of `path` (open with O_DIRECT as `fd`) into `buf` from
    its aligned offset `at` (the whole aligned cover is read); returns where in `buf` they
    start. Raises ShardcutError if the file ends first."""
    c0, c1 = direct_cover(offset, n)
    if pread_into(fd, buf.view[at : at + c1 - c0], c0) < offset + n - c0:
        raise ShardcutError("source ends early (truncated while read?)", path)
    return at + offset - c0


@dataclass
class Staged:
    """Source bytes the direct writer read with `O_DIRECT` for one chunk, kept for the chunk's
    compare (the follower gives `buf` back): `spans[a] = (b, at)` says output bytes `[a, b)`
    were copied from `buf[at : at + b - a]`. Output bytes in no span were read through the page
    cache and are read again from it for the compare."""

    buf: Buffer | None
    spans: dict[int, tuple[int, int]]


@dataclass(frozen=True)
class Segment:
    """Output bytes `[start, start + length)` and what they must be: `data` (the header) or the
    source range `piece` of tensor `tensor`."""

    start: int
    length: int
    tensor: str | None = None
    piece: Piece | None = None
    data: bytes | None = None


def shard_segments(header: bytes, tensors: list[OutTensor]) -> list[Segment]:
    """Every byte of a shard written by `write_shard(tensors)` (header included), in file order."""
    out = [Segment(0, len(header), data=header)]
    return out + tensor_segments(len(header), tensors)


def tensor_segments(start: int, tensors: list[OutTensor]) -> list[Segment]:
    """The source ranges of `tensors` laid out one after another from file offset `start`."""
    out = []
    for t in tensors:
        for p in t.pieces:
            out.append(Segment(start, p.length, t.name, p))
            start += p.length
    return out


class Follower:
    """Flush, read back and compare one shard while (or after) it is written; see the module doc.

    `segments` say what every compared byte must be (`shard_segments`); `written(fd, pos)` is
    the writer's progress callback, `writer_done()` says the writer stopped (finished or
    failed), `cancel(exc)` stops both sides, `run()` is the follower's body: it raises
    ShardcutError at the first byte that differs. `verify=False` only fsyncs the finished file
    and drops its pages (as a plain write would); `complete=True` checks a file already written
    (nothing flushed or dropped); `direct=True` follows a writer using `O_DIRECT`
    (`direct_write`): what it reports written is on the device already, so there is no
    write-back to start or wait for and no page to drop, and it hands over with each chunk the
    source bytes it read (`Staged`), which the read-back is compared with.
    """

    def __init__(
        self,
        path: Path,
        segments: list[Segment],
        size: int,
        *,
        verify: bool = True,
        sources: PinnedSources | None = None,
        complete: bool = False,
        direct: bool = False,
        chunk: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.segments = sorted((s for s in segments if s.length), key=lambda s: s.start)
        self.size = size
        self.verify = verify
        self.sources = sources
        self.complete = complete
        self.direct = direct
        self.chunk = chunk or CHUNK
        self._cond = threading.Condition()
        self._written = size if complete else 0
        self._done = complete
        self._checked = 0
        self._kicked = 0
        self._error: BaseException | None = None
        self._staged: dict[int, Staged] = {}  # chunk start -> what the direct writer read for it
        self._direct_sources: DirectSources | None = None
        self.compared = 0

    # --- the writer's side -----------------------------------------------------------------
    def written(self, fd: int, pos: int, staged: Staged | None = None, chunk_start: int = 0) -> None:
        """The writer has written `[0, pos)` (`staged`: what it read for the chunk starting at
        `chunk_start`): start its write-back, wake the follower, and wait while the writer is
        more than the window ahead of the follower (so dirty pages, or staged source bytes, stay
        bounded: WINDOW, or DIRECT_WINDOW_CHUNKS chunks behind a direct writer)."""
        if self.verify and not self.direct and (pos - self._kicked >= self.chunk or pos >= self.size):
            start_writeback(fd, self._kicked, pos - self._kicked)
            self._kicked = pos
        window = DIRECT_WINDOW_CHUNKS * self.chunk if self.direct else WINDOW
        with self._cond:
            if staged is not None:
                if self.verify and self._error is None:
                    self._staged[chunk_start] = staged
                elif staged.buf is not None:
                    return_buffer(staged.buf)
            self._written = pos
            self._cond.notify_all()
            while self.verify and self._error is None and pos - self._checked > window:
                self._cond.wait(1.0)
            if self._error is not None:
                raise self._error

    def writer_done(self) -> None:
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def cancel(self, exc: BaseException) -> None:
        """Stop the writer (its next `written` raises `exc`) and the follower."""
        with self._cond:
            if self._error is None:
                self._error = exc
            self._done = True
            self._cond.notify_all()

    def _wait_written(self, upto: int) -> int:
        with self._cond:
            while self._written < upto and not self._done:
                self._cond.wait(1.0)
            if self._error is not None:
                raise self._error
            return self._written

    def _progress(self, checked: int) -> None:
        with self._cond:
            self._checked = checked
            self._cond.notify_all()

    # --- the follower's side ---------------------------------------------------------------
    def run(self) -> int:
        """Follow the writer to the end of the file; returns the source bytes compared."""
        try:
            self._run()
        except BaseException as exc:
            self.cancel(exc)
            raise
        return self.compared

    def _run(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        direct = _open_direct(self.path) if self.verify else None
        # A finished file's sources are read with O_DIRECT too (nothing of them is in the page
        # cache to reuse); behind a writer they were just read, through the page cache or staged.
        self._direct_sources = DirectSources(lambda p: self._source_fd(p, opened)) if self.complete else None
        src_size = stage_size(self.chunk) if self.complete else self.chunk
        bufs = (take_buffer(self.chunk), take_buffer(src_size)) if self.verify else None
        opened: dict[Path, int] = {}
        try:
            if not self.verify:  # nothing to read back: one fsync once written, as a plain write
                if self._wait_written(self.size) < self.size:
                    raise ShardcutError("the shard's writer stopped before its end", self.path)
                os.fsync(fd)
                _drop(fd, 0, 0)
                return
            seg_i = 0
            lo = 0
            while lo < self.size:
                hi = min(lo + self.chunk, self.size)
                if self._wait_written(hi) < hi:
                    raise ShardcutError("the shard's writer stopped before its end", self.path)
                flushed = self.complete or self.direct  # on the device already: nothing to wait for or drop
                if not flushed:
                    wait_writeback(fd, lo, hi - lo)
                seg_i = self._compare(fd, direct, bufs, opened, lo, hi, seg_i)
                if not flushed:
                    _drop(fd, lo, hi - lo)
                lo = hi
                self._progress(lo)
            if not self.complete:
                os.fsync(fd)  # what is left: metadata and the device's write cache
                _drop(fd, 0, 0)
            if os.fstat(fd).st_size != self.size:
                raise ShardcutError(f"file is {os.fstat(fd).st_size} bytes, expected {self.size}", self.path)
        finally:
            os.close(fd)
            if direct is not None:
                os.close(direct)
            if self._direct_sources is not None:
                self._direct_sources.close()
            for src in opened.values():
                os.close(src)
            if bufs is not None:
                for b in bufs:
                    return_buffer(b)
            with self._cond:
                left, self._staged = list(self._staged.values()), {}
            for st in left:
                if st.buf is not None:
                    return_buffer(st.buf)

    def _compare(self, fd: int, direct: int | None, bufs, opened: dict[Path, int], lo: int, hi: int, i: int) -> int:
        """Compare output bytes [lo, hi) with segments from index `i`; returns the next index."""
        with self._cond:
            staged = self._staged.pop(lo, None)
        try:
            return self._compare_chunk(fd, direct, bufs, staged, opened, lo, hi, i)
        finally:
            if staged is not None and staged.buf is not None:
                return_buffer(staged.buf)

    def _compare_chunk(self, fd, direct, bufs, staged: Staged | None, opened, lo: int, hi: int, i: int) -> int:
        segs = self.segments
        if i >= len(segs) or segs[i].start >= hi:
            return i  # nothing to compare here (a header region not checked byte for byte)
        out, src = bufs
        n = hi - lo
        if direct is not None:
            got = pread_into(direct, out.view[: -(-n // ALIGN) * ALIGN], lo)
        else:  # written back, so clean: dropped, the read comes from the device
            if not self.complete:
                _drop(fd, lo, n)
            got = pread_into(fd, out.view[:n], lo)
        if got < n:
            raise ShardcutError(f"file ends at {lo + got}, expected {self.size} bytes", self.path)
        while i < len(segs) and segs[i].start < hi:
            seg = segs[i]
            a, b = max(seg.start, lo), min(seg.start + seg.length, hi)
            if b > a:
                span = staged.spans.get(a) if staged is not None else None
                if span is not None and staged is not None and staged.buf is not None:
                    if span[0] != b:
                        raise AssertionError(f"staged span [{a}, {span[0]}) is not the segment's [{a}, {b})")
                    expect, at = staged.buf, span[1]  # the source bytes as the writer read them
                elif seg.data is not None:
                    src.view[: b - a] = seg.data[a - seg.start : b - seg.start]
                    expect, at = src, 0
                elif seg.piece is not None:
                    path, offset = seg.piece.path, seg.piece.offset + a - seg.start
                    c0, c1 = direct_cover(offset, b - a)
                    start = None
                    if self._direct_sources is not None and b - a >= DIRECT_MIN and c1 - c0 <= len(src.map):
                        start = self._direct_sources.read(path, src, 0, offset, b - a)
                    if start is None:
                        if pread_into(self._source_fd(path, opened), src.view[: b - a], offset) < b - a:
                            raise ShardcutError("source ends early (truncated while read?)", path)
                        start = 0
                    expect, at = src, start
                if not same_bytes(out, a - lo, expect, at, b - a):
                    what = f"tensor {seg.tensor!r}" if seg.tensor else "the header"
                    raise ShardcutError(f"{what} differs from its source bytes (read back from the disk)", self.path)
                if seg.piece is not None:
                    self.compared += b - a
            if seg.start + seg.length > hi:
                break  # continues in the next chunk
            i += 1
        return i

    def _source_fd(self, path: Path, opened: dict[Path, int]) -> int:
        if self.sources is not None and path in self.sources:
            return self.sources.fd(path)
        if path not in opened:
            opened[path] = os.open(path, os.O_RDONLY)
        return opened[path]


def _open_direct(path: Path) -> int | None:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError:  # EINVAL: this filesystem refuses direct I/O; the fallback drops pages instead
        return None


def compare_written(
    out_dir: Path, shards: list[list[OutTensor]], names: list[str], pinned: PinnedSources | None = None
) -> int:
    """Re-read every tensor of written shards from the disk and compare it with its source ranges.

    Each file's header must name every tensor with its dtype and shape; its data is read back
    (O_DIRECT where the filesystem allows) and compared in chunks, so memory stays flat. Raises
    ShardcutError at the first difference; returns the bytes compared. `pinned`: the source
    files the copy read (compared through those same descriptors, not re-opened by path).
    """
    compared = 0
    for name, tensors in zip(names, shards, strict=True):
        path = out_dir / name
        header = read_header(path)
        segs = []
        for t in tensors:
            info = header.tensors.get(t.name)
            if info is None or info.shape != t.shape or info.dtype != t.dtype:
                raise ShardcutError(f"tensor {t.name!r} missing or with the wrong dtype/shape", path)
            segs += tensor_segments(info.start, [t])
        compared += Follower(path, segs, header.file_size, sources=pinned, complete=True).run()
    return compared
