"""Shards written with `O_DIRECT` from reused, aligned buffers: neither input nor output goes through the page cache.

A shard is cut into `readback.CHUNK`-sized, aligned chunks. The caller's thread assembles each
chunk: the encoded header, then the source ranges, read with `O_DIRECT` (their aligned covers,
READ_SPLIT bytes per read, READERS reads in flight) into a staging buffer and copied from there
(ranges under `readback.DIRECT_MIN` are read through the page cache). A second thread writes
the chunk before it with one aligned `pwrite`; three buffers rotate between them. The last
chunk is padded with zeros to the block size and the file truncated to its length. When a
`pwrite` returns, the chunk is on the device (its volatile cache aside: the follower's fsync at
the end flushes that), so a `readback.Follower(direct=True)` reads it back at once, with no
write-back to wait for and no page to drop, and compares it with the staging buffer it is
handed (`readback.Staged`): the source bytes as read, not the buffer that was written.

Why: going through the page cache means a kernel memcpy into (or out of) freshly allocated
folios, write-back, and dropping them again. On a VM that hands freed memory back to its host
(free page reporting) every fresh folio is a host page fault, and a 30 GB prune spent 82-91% of
its time in the kernel. Measured on this project's VM, 4 GiB in 32 MiB requests: buffered
`pwrite` + fsync 14.5-21.4 s (12-18 s of it system time), `O_DIRECT` 3.2-3.7 s (0.3-0.4 s); a
cold buffered read 11.2-13.6 s (10-12 s), `O_DIRECT` 5.8 s (0.26 s).

Where the filesystem refuses `O_DIRECT` (tmpfs, some network and FUSE filesystems, another
OS), `direct_io_supported` says no and the caller writes with `container.write_shard`;
`SHARDCUT_DIRECT_IO=0` forces that path everywhere.

    >>> if direct_io_supported(out_dir):
    ...     write_shard_direct(out_dir / "model.safetensors", tensors, sources=pinned, on_written=follower.written)
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from shardcut.format import readback
from shardcut.format.container import OutTensor, Piece, PinnedSources, Prefetch, SourceFiles, encode_header
from shardcut.format.errors import ShardcutError

BUFFERS = 3  # one being filled, up to two queued for (or in) the write

_O_DIRECT = getattr(os, "O_DIRECT", 0)


def direct_io_supported(folder: Path) -> bool:
    """Whether files in `folder` can be written with `O_DIRECT` at `readback.ALIGN` granularity
    (probed with a small file, removed again; False where `SHARDCUT_DIRECT_IO=0`)."""
    if not _O_DIRECT or os.environ.get("SHARDCUT_DIRECT_IO", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    probe = Path(folder) / f".shardcut-direct-probe-{os.getpid()}-{threading.get_ident()}"
    buf = readback.Buffer(2 * readback.ALIGN)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_DIRECT, 0o600)
        try:  # at an offset that is a multiple of ALIGN only, then a tail cut off by ftruncate
            ok = os.pwrite(fd, buf.view[: readback.ALIGN], readback.ALIGN) == readback.ALIGN
            os.ftruncate(fd, readback.ALIGN + 1)
            return ok
        finally:
            os.close(fd)
    except OSError:  # EINVAL: this filesystem refuses direct I/O (or the folder is not writable)
        return False
    finally:
        buf.close()
        try:
            probe.unlink()
        except OSError:
            pass


def write_shard_direct(
    path: str | Path,
    tensors: list[OutTensor],
    metadata: dict[str, str] | None = None,
    on_bytes=None,
    *,
    sources: PinnedSources | None = None,
    on_written=None,
) -> int:
    """Write the safetensors file `container.write_shard` writes, with `O_DIRECT` (module doc).

    `on_bytes(n)` is called as source bytes are copied; `on_written(fd, pos, staged, lo)`
    after each chunk `[lo, pos)` is on the device, on the writing thread (an exception it
    raises stops the writer); it takes over `staged` (`readback.Staged`: the source bytes the
    chunk was copied from) and gives its buffer back (`readback.return_buffer`).
    Raises
    OSError where the filesystem refuses `O_DIRECT` (see `direct_io_supported`). Returns the
    file size.
    """
    header = encode_header(tensors, metadata)
    size = len(header) + sum(t.nbytes for t in tensors)
    chunk = readback.CHUNK
    files = SourceFiles(sources)
    direct_sources = readback.DirectSources(files.fd)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_DIRECT, 0o644)
    bufs: list[readback.Buffer] = []
    writes: list[Future] = []
    pool = ThreadPoolExecutor(1, thread_name_prefix="shardcut-direct")
    readers = ThreadPoolExecutor(READERS, thread_name_prefix="shardcut-read")
    try:
        bufs += [readback.take_buffer(chunk) for _ in range(BUFFERS)]
        pieces = [p for t in tensors for p in t.pieces]
        prefetch = Prefetch(files, [p for p in pieces if not direct_sources.staged(p)])
        prefetch.copied(0)
        parts = _chunk_parts(readback.shard_segments(header, tensors), size, chunk)
        for k, lo in enumerate(range(0, size, chunk)):
            if k >= BUFFERS:
                writes[k - BUFFERS].result()  # that buffer is free again (or its write failed)
            buf, hi = bufs[k % BUFFERS], min(lo + chunk, size)
            staged = _fill(buf, lo, next(parts), files, direct_sources, readers, prefetch, on_bytes)
            padded = -(-(hi - lo) // readback.ALIGN) * readback.ALIGN
            buf.view[hi - lo : padded] = bytes(padded - (hi - lo))  # the last chunk's tail, cut off after
            last = size if hi == size else 0  # the file is cut to its size after the last write
            writes.append(pool.submit(_write_chunk, fd, buf, lo, padded, last, staged, on_written))
        for w in writes:
            w.result()
    finally:
        readers.shutdown(wait=True, cancel_futures=True)  # no read or write may still use a buffer
        pool.shutdown(wait=True, cancel_futures=True)
        os.close(fd)
        direct_sources.close()
        files.close()
        for b in bufs:
            readback.return_buffer(b)
    return size


def _fill(
    buf: readback.Buffer,
    lo: int,
    parts,
    files: SourceFiles,
    direct_sources: readback.DirectSources,
    readers: ThreadPoolExecutor,
    prefetch: Prefetch,
    on_bytes,
) -> readback.Staged:
    """Assemble output bytes `[lo, lo + chunk)` in `buf` from `parts` (`_chunk_parts`); returns
    the `readback.Staged` of the source bytes read with O_DIRECT on the way.

    The O_DIRECT reads of the chunk run on `readers`, READ_SPLIT bytes each (a direct read
    waits for the device, and a few at once keep it busier), while this thread reads the short
    ranges through the page cache; then the staged bytes are copied into `buf`."""
    stage: readback.Buffer | None = None
    spans: dict[int, tuple[int, int]] = {}
    staged: list[tuple[int, int, Piece, int, list[Future]]] = []  # (a, n, piece, source offset, reads)
    at = 0  # next free, aligned offset in the stage buffer
    for a, b, data, src_off, piece in parts:
        n = b - a
        if data is not None:
            buf.view[a - lo : b - lo] = data[src_off : src_off + n]
            continue
        c0, c1 = readback.direct_cover(src_off, n)
        if direct_sources.staged(piece):
            if stage is None:
                stage = readback.take_buffer(readback.stage_size(readback.CHUNK))
            if at + c1 - c0 <= len(stage.map):
                reads = [
                    readers.submit(direct_sources.read, piece.path, stage, at + s - s % readback.ALIGN - c0, s, e - s)
                    for s, e in _split(src_off, src_off + n)
                ]
                staged.append((a, n, piece, src_off, reads))
                at += c1 - c0
                continue
        _read_cached(files, piece, buf.view[a - lo : b - lo], src_off, prefetch)
        if on_bytes is not None:
            on_bytes(n)
    for a, n, piece, src_off, reads in staged:
        starts = [r.result() for r in reads]
        first = starts[0]
        if stage is not None and first is not None and None not in starts:
            ctypes.memmove(buf.address + a - lo, stage.address + first, n)
            spans[a] = (a + n, first)
        else:  # the file refused O_DIRECT after all: read through the page cache (and compared from it)
            _read_cached(files, piece, buf.view[a - lo : a - lo + n], src_off, prefetch)
        if on_bytes is not None:
            on_bytes(n)
    return readback.Staged(stage, spans)


READ_SPLIT = 4 << 20  # bytes per O_DIRECT source read (a multiple of ALIGN)
READERS = 3  # O_DIRECT source reads in flight at once


def _split(start: int, end: int) -> list[tuple[int, int]]:
    """`[start, end)` cut at the multiples of READ_SPLIT inside it (aligned, so the reads' covers
    are contiguous and never overlap)."""
    cuts = list(range(start - start % READ_SPLIT + READ_SPLIT, end, READ_SPLIT))
    points = [start, *cuts, end]
    return list(zip(points, points[1:], strict=False))


def _read_cached(files: SourceFiles, piece: Piece, view: memoryview, offset: int, prefetch: Prefetch) -> None:
    if readback.pread_into(files.fd(piece.path), view, offset) < len(view):
        raise ShardcutError("source ends early (truncated while read?)", piece.path)
    prefetch.copied(len(view))


def _chunk_parts(segments: list[readback.Segment], size: int, chunk: int):
    """For each chunk `[lo, hi)` of the file, in order, the list of its parts `(a, b, data,
    offset, piece)`: output bytes `[a, b)` are `data[offset:]` (the header) or the source bytes
    at `offset` of `piece`'s file. `segments`: the file's bytes, as `readback.shard_segments`."""
    segs = [seg for seg in segments if seg.length]
    i = 0
    for lo in range(0, size, chunk):
        hi = min(lo + chunk, size)
        out = []
        while i < len(segs):
            seg = segs[i]
            end = seg.start + seg.length
            a, b = max(seg.start, lo), min(end, hi)
            if b > a:
                base = seg.piece.offset if seg.piece is not None else 0
                out.append((a, b, seg.data, base + a - seg.start, seg.piece))
            if end > hi:
                break  # continues in the next chunk
            i += 1
        yield out


def _write_chunk(
    fd: int, buf: readback.Buffer, offset: int, length: int, truncate_to: int, staged: readback.Staged, on_written
) -> None:
    """Write `buf[:length]` at `offset` (both aligned), cut the file to `truncate_to` if not 0,
    and report the bytes written so far with the chunk's staged source bytes."""
    done = 0
    while done < length:
        n = os.pwrite(fd, buf.view[done:length], offset + done)
        if n <= 0 or n % readback.ALIGN:  # a direct write stops only at a block boundary, or fails
            raise OSError(errno.EIO, f"short direct write at offset {offset + done}")
        done += n
    if truncate_to:
        os.ftruncate(fd, truncate_to)
    if on_written is not None:
        on_written(fd, truncate_to or offset + length, staged, offset)
    elif staged.buf is not None:
        readback.return_buffer(staged.buf)
