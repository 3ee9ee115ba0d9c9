"""The safetensors container: exact header parsing and byte-range shard writing.

A safetensors file is `u64 header length (little endian) | JSON header | data`. Tensors never
pass through Python here: readers get each tensor's absolute byte range in its shard, and the
writer assembles new shards from byte ranges of existing files with `os.copy_file_range`
(in-kernel, zero-copy on most filesystems) and falls back to a bounded read/write loop.
"""

from __future__ import annotations

import errno
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import orjson

from shardcut.format.errors import ShardcutError

# Bits per element of every dtype safetensors defines (sub-byte dtypes are packed).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
COPY_CHUNK = 64 << 20
PREFETCH = 64 << 20  # source bytes asked for (POSIX_FADV_WILLNEED) ahead of the copy


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a shard: its dtype, shape and absolute byte range `[start, end)`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class ShardHeader:
    """The parsed header of one safetensors file; tensors are in file (offset) order."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    data_start: int
    file_size: int


def tensor_nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """Byte length of a tensor; raises ValueError for an unknown dtype or a partial byte."""
    bits = DTYPE_BITS[dtype] * math.prod(shape)
    if bits % 8:
        raise ValueError(f"{dtype}{list(shape)} does not fill whole bytes")
    return bits // 8


def parse_header_bytes(raw: bytes, file_size: int, path: Path) -> ShardHeader:
    """Parse and validate a header given the file's first bytes (at least 8 + header length)."""
    if file_size < 8 or len(raw) < 8:
        raise ShardcutError("truncated safetensors file (shorter than the 8-byte header length)", path)
    n = int.from_bytes(raw[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise ShardcutError(f"header length {n} exceeds the safetensors limit of {MAX_HEADER_BYTES}", path)
    if 8 + n > file_size:
        raise ShardcutError(f"header length {n} runs beyond the end of the file ({file_size} bytes)", path)
    if len(raw) < 8 + n:
        raise ShardcutError("truncated header", path)
    try:
        header = orjson.loads(raw[8 : 8 + n])  # strict: UTF-8 only, no NaN, bounded nesting
    except (orjson.JSONDecodeError, RecursionError) as exc:
        raise ShardcutError(f"corrupt header JSON ({type(exc).__name__}: {str(exc)[:80]})", path) from None
    if not isinstance(header, dict):
        raise ShardcutError("header JSON is not an object", path)
    data_start = 8 + n
    data_len = file_size - data_start
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise ShardcutError("__metadata__ must map strings to strings", path)
    tensors: list[TensorInfo] = []
    for name, entry in header.items():
        tensors.append(_parse_entry(name, entry, data_start, data_len, path))
    tensors.sort(key=lambda t: (t.start, t.end))
    prev_end, prev_name = data_start, None
    for t in tensors:
        if t.start < prev_end and t.nbytes > 0:
            raise ShardcutError(f"tensor {t.name!r} overlaps {prev_name!r}", path)
        if t.nbytes:
            prev_end, prev_name = t.end, t.name
    return ShardHeader(path, {t.name: t for t in tensors}, metadata, data_start, file_size)


def _parse_entry(name: str, entry: object, data_start: int, data_len: int, path: Path) -> TensorInfo:
    if not isinstance(entry, dict):
        raise ShardcutError(f"tensor {name!r}: entry is not an object", path)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise ShardcutError(f"tensor {name!r}: unknown dtype {dtype!r}", path)
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise ShardcutError(f"tensor {name!r}: shape must be a list of non-negative integers", path)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise ShardcutError(f"tensor {name!r}: data_offsets must be two integers", path)
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ShardcutError(f"tensor {name!r}: data_offsets {offsets} are not ordered", path)
    if end > data_len:
        raise ShardcutError(
            f"tensor {name!r}: data_offsets {offsets} out of bounds (data is {data_len} bytes; truncated file?)", path
        )
    try:
        expected = tensor_nbytes(dtype, shape)
    except ValueError as exc:
        raise ShardcutError(f"tensor {name!r}: {exc}", path) from None
    if end - begin != expected:
        raise ShardcutError(
            f"tensor {name!r}: {dtype}{shape} needs {expected} bytes but data_offsets span {end - begin}", path
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_header(path: str | Path) -> ShardHeader:
    """Read and validate the header of a safetensors file without touching its data.

    Example:
        >>> h = read_header("model-00001-of-00002.safetensors")
        >>> h.tensors["model.embed_tokens.weight"].shape
        (151936, 2048)
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) == 8:
                n = int.from_bytes(head, "little")
                if n <= MAX_HEADER_BYTES and 8 + n <= size:
                    head += f.read(n)
    except FileNotFoundError:
        raise ShardcutError("file not found", path) from None
    except IsADirectoryError:
        raise ShardcutError("is a directory, expected a safetensors file", path) from None
    return parse_header_bytes(head, size, path)


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class Piece:
    """A byte range `[offset, offset + length)` of a source file."""

    path: Path
    offset: int
    length: int


@dataclass
class OutTensor:
    """A tensor of an output shard, assembled from byte ranges of source files."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: list[Piece] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(p.length for p in self.pieces)


def merge_pieces(pieces: list[Piece]) -> list[Piece]:
    """Join ranges that follow each other in the same file, so slices copy in as few calls as possible."""
    out: list[Piece] = []
    for p in pieces:
        if out and out[-1].path == p.path and out[-1].offset + out[-1].length == p.offset:
            out[-1] = Piece(p.path, out[-1].offset, out[-1].length + p.length)
        elif p.length:
            out.append(p)
    return out


def encode_header(tensors: list[OutTensor], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length plus JSON header for `tensors` laid out in order, padded to 8 bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for t in tensors:
        expected = tensor_nbytes(t.dtype, t.shape)
        if expected != t.nbytes:
            raise ValueError(f"{t.name}: {t.dtype}{list(t.shape)} needs {expected} bytes, pieces give {t.nbytes}")
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def shard_size(tensors: list[OutTensor], metadata: dict[str, str] | None) -> int:
    return len(encode_header(tensors, metadata)) + sum(t.nbytes for t in tensors)


class PinnedSources:
    """Source shards opened once and held for a whole rewrite, so that every byte copied and
    every byte the self-check compares comes from the very files whose headers were parsed.

    A shard replaced on disk (a new file renamed onto its path) or changed in place while the
    rewrite runs would otherwise give an output built from two files and "verified" against the
    second. `check()` compares each file's identity (device, inode, size, mtime and header
    bytes, through the open descriptor and through the path) with what was pinned.

    Example:
        >>> with PinnedSources(ckpt.shards) as pinned:
        ...     write_shard("out.safetensors", tensors, sources=pinned)
        ...     pinned.check()
    """

    def __init__(self, shards: list[ShardHeader]) -> None:
        self._fds: dict[Path, int] = {}
        self._ident: dict[Path, tuple[tuple[int, int, int, int], bytes]] = {}
        _allow_open_files(len(shards) + 256)  # checkpoints of a thousand shards exist
        try:
            for shard in shards:
                self._pin(shard)
        except BaseException:
            self.close()
            raise

    def _pin(self, shard: ShardHeader) -> None:
        path = shard.path
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ShardcutError(f"cannot open ({exc.strerror or exc})", path) from None
        self._fds[path] = fd
        _fadvise(fd, _NO_READAHEAD)
        st = os.fstat(fd)
        head = os.pread(fd, shard.data_start, 0)
        again = parse_header_bytes(head, st.st_size, path) if len(head) == shard.data_start else None
        if again is None or (again.tensors, again.metadata, again.file_size) != (
            shard.tensors,
            shard.metadata,
            shard.file_size,
        ):
            raise ShardcutError("source shard changed between reading its header and opening it", path)
        self._ident[path] = (_identity(st), head)

    def __contains__(self, path: object) -> bool:
        return path in self._fds

    def fd(self, path: Path) -> int:
        return self._fds[path]

    def check(self) -> None:
        """Raise ShardcutError naming the first source shard that is no longer what was pinned."""
        for path, fd in self._fds.items():
            ident, head = self._ident[path]
            try:
                through_path = _identity(os.stat(path))
            except OSError:
                through_path = None
            if _identity(os.fstat(fd)) != ident:
                why = "modified in place"
            elif through_path is None or through_path[:2] != ident[:2]:
                why = "replaced by another file" if through_path else "removed"
            elif os.pread(fd, len(head), 0) != head:
                why = "header rewritten"
            else:
                continue
            raise ShardcutError(f"source shard changed while shardcut read it ({why}); no output was committed", path)

    def close(self) -> None:
        for fd in self._fds.values():
            _fadvise(fd, getattr(os, "POSIX_FADV_DONTNEED", None))
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> PinnedSources:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _allow_open_files(n: int) -> None:
    """Raise the soft limit on open descriptors to `n` where the hard limit allows it."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < n:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n if hard == resource.RLIM_INFINITY else min(n, hard), hard))
    except (ImportError, ValueError, OSError):
        pass  # the open itself then fails with a clear "cannot open" naming the shard


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class SourceFiles:
    """Keeps one read descriptor per source file open while a shard is written (pinned files
    are used as they are and left open)."""

    def __init__(self, pinned: PinnedSources | None = None) -> None:
        self._fds: dict[Path, int] = {}
        self._pinned = pinned

    def fd(self, path: Path) -> int:
        if self._pinned is not None and path in self._pinned:
            return self._pinned.fd(path)
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
            _fadvise(self._fds[path], _NO_READAHEAD)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            _fadvise(fd, getattr(os, "POSIX_FADV_DONTNEED", None))
            os.close(fd)
        self._fds.clear()


def _fadvise(fd: int, advice: int | None, offset: int = 0, length: int = 0) -> None:
    # Advice only: a terabyte rewrite should not evict everything else from the page cache.
    if advice is not None and hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, length, advice)
        except OSError:
            pass


# Sources are read without the kernel's readahead, which would also read the dropped experts
# between kept ranges (half the input, measured: a 0.9 GB prune writing 0.5 GB read 0.87 GB);
# `Prefetch` asks for exactly the ranges the copy needs next instead.
_NO_READAHEAD = getattr(os, "POSIX_FADV_RANDOM", None)
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)


class Prefetch:
    """Keeps `PREFETCH` bytes of the upcoming source ranges requested (asynchronous readahead
    of those ranges only), so the copy finds them in the page cache."""

    def __init__(self, files: SourceFiles, pieces: list[Piece]) -> None:
        self._files, self._pieces = files, pieces
        self._next = 0  # first piece not yet requested
        self._ahead = 0  # bytes requested and not yet copied

    def copied(self, n: int) -> None:
        self._ahead -= n
        while self._next < len(self._pieces) and self._ahead < PREFETCH:
            p = self._pieces[self._next]
            _fadvise(self._files.fd(p.path), _WILLNEED, p.offset, p.length)
            self._ahead += p.length
            self._next += 1


_copy_file_range_ok = hasattr(os, "copy_file_range")
# errnos meaning "this kernel or filesystem pair cannot do copy_file_range": use read/write instead
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM}


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int, on_bytes) -> None:
    # The fallback is decided per call, not remembered: one filesystem pair without
    # copy_file_range must not slow every later copy of a long-lived process.
    kernel = _copy_file_range_ok
    while length > 0:
        n = 0
        if kernel:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(length, COPY_CHUNK), offset)
            except OSError as exc:
                if exc.errno not in _NO_COPY_FILE_RANGE:
                    raise  # a real failure (disk full, I/O error) must surface, not fall back
                kernel = False
                n = 0
        if n == 0:
            buf = os.pread(src_fd, min(length, COPY_CHUNK), offset)
            if not buf:
                raise OSError(f"unexpected end of source file at offset {offset}")
            n = os.write(dst_fd, buf)
        offset += n
        length -= n
        if on_bytes is not None:
            on_bytes(n)


def write_shard(
    path: str | Path,
    tensors: list[OutTensor],
    metadata: dict[str, str] | None = None,
    on_bytes=None,
    sources: PinnedSources | None = None,
    sync: bool = True,
    on_written=None,
) -> int:
    """Write a safetensors file whose tensors are copied byte for byte from source ranges.

    `on_bytes(n)` is called as data is copied (for progress bars). `sources`: source files
    already open (pinned), read through their descriptors. `sync=False` leaves the fsync to the
    caller (`sync_file`), e.g. to overlap it with writing the next shard. `on_written(fd, pos)`
    is called after the header and after each piece with the bytes written so far (a
    `readback.Follower` starts their write-back and reads them back). Returns the file size.

    Example:
        >>> src = read_header("in.safetensors").tensors["w"]
        >>> write_shard("out.safetensors", [OutTensor("w", src.dtype, src.shape,
        ...             [Piece(Path("in.safetensors"), src.start, src.nbytes)])])
    """
    header = encode_header(tensors, metadata)
    files = SourceFiles(sources)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(header)
        while view:
            view = view[os.write(fd, view) :]
        pos = len(header)
        if on_written is not None:
            on_written(fd, pos)
        prefetch = Prefetch(files, [p for t in tensors for p in t.pieces])
        prefetch.copied(0)
        for t in tensors:
            for p in t.pieces:
                _copy_range(files.fd(p.path), fd, p.offset, p.length, on_bytes)
                pos += p.length
                prefetch.copied(p.length)
                if on_written is not None:
                    on_written(fd, pos)
        if sync:
            _sync_and_drop(fd)
        size = os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)
        files.close()
    return size


def _sync_and_drop(fd: int) -> None:
    os.fsync(fd)
    # Written pages are on disk now; dropping them keeps a terabyte rewrite from evicting
    # everything else, and makes the verification pass read back what the disk holds.
    _fadvise(fd, getattr(os, "POSIX_FADV_DONTNEED", None))


def sync_file(path: str | Path) -> None:
    """fsync a written file and drop its pages from the page cache (see `write_shard`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _sync_and_drop(fd)
    finally:
        os.close(fd)


def hash_pieces(pieces: list[Piece], hasher) -> None:
    """Feed the bytes of `pieces` into `hasher` in bounded chunks."""
    for p in pieces:
        with open(p.path, "rb") as f:
            f.seek(p.offset)
            left = p.length
            while left:
                buf = f.read(min(left, COPY_CHUNK))
                if not buf:
                    raise ShardcutError(f"unexpected end of file at offset {p.offset + p.length - left}", p.path)
                hasher.update(buf)
                left -= len(buf)


COMPARE_CHUNK = 16 << 20  # bytes per read when comparing files


def slice_expert_axis(
    path: Path, t: TensorInfo, axis: int, num_experts: int, kept: list[int] | list[list[int]]
) -> OutTensor:
    """Byte ranges of `t` restricted to the kept experts' blocks along `axis`.

    The axis holds `num_experts` equal blocks (one row per expert for routers and fused
    `[E, …]` tensors, `F` rows for DBRX-style `[E·F, H]`). `kept` lists the blocks to keep, in
    output order; a list of lists gives each index of the dims before `axis` its own
    (ERNIE-VL's `[2, E]` statics: text row, vision row).
    """
    if axis >= len(t.shape) or t.shape[axis] % num_experts:
        raise ShardcutError(
            f"tensor {t.name!r} {list(t.shape)}: dim {axis} is not a multiple of num_experts={num_experts}", path
        )
    block = t.shape[axis] // num_experts
    try:
        block_bytes = tensor_nbytes(t.dtype, (block, *t.shape[axis + 1 :]))
    except ValueError:
        raise ShardcutError(f"tensor {t.name!r}: expert blocks of {t.dtype} do not fill whole bytes", path) from None
    outer = math.prod(t.shape[:axis])
    if kept and isinstance(kept[0], list):
        per_outer = cast("list[list[int]]", kept)
    else:
        per_outer = [cast("list[int]", kept)] * outer
    if len(per_outer) != outer or len({len(k) for k in per_outer}) != 1:
        raise ShardcutError(f"tensor {t.name!r} {list(t.shape)}: {outer} rows need equal kept lists for each", path)
    pieces = [
        Piece(path, t.start + (o * num_experts + k) * block_bytes, block_bytes)
        for o in range(outer)
        for k in per_outer[o]
    ]
    shape = list(t.shape)
    shape[axis] = block * len(per_outer[0])
    return OutTensor(t.name, t.dtype, tuple(shape), merge_pieces(pieces))
