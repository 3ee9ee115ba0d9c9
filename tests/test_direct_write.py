"""The O_DIRECT shard writer (shardcut/format/direct_write.py): byte for byte the file
`container.write_shard` writes, at every size around the block and chunk boundaries; a fault in
its buffer after the copy is caught by the read-back (which compares with the source, not with
the buffer); the prune's output leaves no page in the page cache; `SHARDCUT_DIRECT_IO=0` and
filesystems that refuse O_DIRECT take the page-cache writer."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path

import pytest

import shardcut.format.direct_write as direct_write
import shardcut.format.readback as readback
from shardcut.format.container import OutTensor, Piece, read_header, write_shard
from shardcut.format.errors import ShardcutError
from shardcut.ops.synthetic import SyntheticSpec, write_synthetic_checkpoint
from shardcut.plans.plan import Plan
from shardcut.rewrite.outdir import partial_dir
from shardcut.rewrite.writer import prune

SPEC = SyntheticSpec(layers=4, experts=8, top_k=2, hidden=64, moe_inter=32, shards=3, vocab=256)
KEEP = {"1": [0, 2, 3, 7], "2": [1, 2, 5, 6], "3": [0, 1, 4, 5]}


@pytest.fixture
def direct_dir(tmp_path) -> Path:
    if not direct_write.direct_io_supported(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT (the page-cache writer is tested everywhere)")
    return tmp_path


def _source_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("stage_min", [1, 1 << 40], ids=["source-read-direct", "source-read-cached"])
@pytest.mark.parametrize("data_len", [0, 1, 4095 - 64, 4096, 3 * 4096 + 17, 10 * 4096])
def test_same_bytes_as_the_page_cache_writer(direct_dir, monkeypatch, data_len, stage_min):
    """Three-block chunks, so headers, tensors and the padded tail land on and across every
    kind of boundary; sources at odd offsets, read with O_DIRECT or through the page cache."""
    monkeypatch.setattr(readback, "CHUNK", 3 * readback.ALIGN)
    monkeypatch.setattr(readback, "DIRECT_MIN", stage_min)
    monkeypatch.setattr(direct_write, "READ_SPLIT", readback.ALIGN)  # every range read in parallel block reads
    blob = _source_file(direct_dir / "src.bin", os.urandom(data_len + 5000))
    half, rest = data_len // 2, (data_len - data_len // 2) // 2
    tensors = [  # b: two source ranges, one of them empty
        OutTensor("a", "U8", (half,), [Piece(blob, 7, half)]),
        OutTensor("b", "U8", (rest,), [Piece(blob, 3000, rest), Piece(blob, 11, 0)]),
    ]
    written: list[int] = []
    staged_bytes: list[tuple[int, bytes]] = []

    def on_written(fd, pos, staged, lo):
        written.append(pos)
        for a, (b, at) in staged.spans.items():  # what was read with O_DIRECT, for output bytes [a, b)
            assert staged.buf is not None and lo <= a < b <= pos
            staged_bytes.append((a, bytes(staged.buf.view[at : at + b - a])))
        if staged.buf is not None:
            readback.return_buffer(staged.buf)

    out = direct_dir / "direct.safetensors"
    size = direct_write.write_shard_direct(out, tensors, {"k": "v"}, on_written=on_written)
    write_shard(direct_dir / "plain.safetensors", tensors, {"k": "v"})
    assert (direct_dir / "direct.safetensors").read_bytes() == (direct_dir / "plain.safetensors").read_bytes()
    assert size == (direct_dir / "direct.safetensors").stat().st_size
    assert written == sorted(written) and written[-1] == size  # progress in file order, ending at the size
    assert all(pos % readback.CHUNK == 0 for pos in written[:-1])
    data = (direct_dir / "direct.safetensors").read_bytes()
    assert bool(staged_bytes) == (stage_min == 1 and data_len > 1)
    assert all(data[a : a + len(part)] == part for a, part in staged_bytes)  # the staged bytes are the output's


def test_a_source_truncated_while_read_is_an_error(direct_dir):
    blob = _source_file(direct_dir / "src.bin", b"x" * 100)
    tensors = [OutTensor("a", "U8", (200,), [Piece(blob, 0, 200)])]
    with pytest.raises(ShardcutError, match="source ends early"):
        direct_write.write_shard_direct(direct_dir / "out.safetensors", tensors)


def test_a_fault_in_the_buffer_after_the_copy_fails_the_prune(direct_dir, monkeypatch):
    """A bit flipped in the write buffer between the copy and the write (a memory fault) is on
    the disk then, and the read-back, which compares with the source bytes as they were read
    (the staging buffer) and not with the buffer written, stops the prune; nothing is committed."""
    source = write_synthetic_checkpoint(direct_dir / "model", SPEC)
    real = direct_write._write_chunk
    flipped: list[int] = []

    def faulty(fd, buf, offset, length, truncate_to, staged, on_written):
        if not flipped and offset > 0 and staged.spans:
            buf.view[100] = buf.view[100] ^ 0x01
            flipped.append(offset + 100)
        real(fd, buf, offset, length, truncate_to, staged, on_written)

    monkeypatch.setattr(readback, "CHUNK", 4 * readback.ALIGN)
    monkeypatch.setattr(readback, "DIRECT_MIN", 1)  # every source range read with O_DIRECT, kept to compare
    monkeypatch.setattr(direct_write, "_write_chunk", faulty)
    out = direct_dir / "out"
    with pytest.raises(ShardcutError, match="differs from its source bytes"):
        prune(source, out, Plan(KEEP))
    assert flipped and not out.exists() and not partial_dir(out).exists()


def _resident_pages(path: Path) -> int:
    """Pages of `path` in the page cache: mincore of a private mapping, which faults nothing in."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    size = path.stat().st_size
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # writable, so ctypes can take its address
        anchor = ctypes.c_char.from_buffer(m)
        try:
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec)
            assert rc == 0, os.strerror(ctypes.get_errno())
        finally:
            del anchor
            m.close()
    return sum(v & 1 for v in vec)


@pytest.mark.parametrize("io", ["direct", "page-cache"])
def test_the_output_leaves_no_page_in_the_page_cache(direct_dir, monkeypatch, io):
    """Direct writes never put the output in the page cache; the page-cache writer drops each
    chunk once it is read back. Either way a terabyte prune evicts nothing else, and every
    shard is byte-identical."""
    if io == "page-cache":
        monkeypatch.setenv("SHARDCUT_DIRECT_IO", "0")
    chunks: list[int] = []
    real = direct_write._write_chunk
    monkeypatch.setattr(
        direct_write, "_write_chunk", lambda fd, buf, off, n, *rest: chunks.append(n) or real(fd, buf, off, n, *rest)
    )
    source = write_synthetic_checkpoint(direct_dir / "model", SPEC)
    out = direct_dir / io
    report = prune(source, out, Plan(KEEP))
    shards = [out / name for name in report.shards]
    assert [_resident_pages(p) for p in shards] == [0] * len(shards)  # before anything reads them
    assert report.verified and all(read_header(p).tensors for p in shards)
    assert all(_resident_pages(p) for p in shards)  # the check sees pages where there are some
    padded = sum(-(-p.stat().st_size // readback.ALIGN) * readback.ALIGN for p in shards)
    assert sum(chunks) == (padded if io == "direct" else 0)


def test_a_filesystem_without_direct_io_takes_the_page_cache_writer(tmp_path, monkeypatch):
    """`direct_io_supported` is False where `open(O_DIRECT)` fails (tmpfs before Linux 6.6,
    many FUSE filesystems) and where `SHARDCUT_DIRECT_IO=0`; the probe leaves nothing behind."""
    assert sorted(tmp_path.iterdir()) == []
    direct_write.direct_io_supported(tmp_path)
    assert sorted(tmp_path.iterdir()) == []  # the probe file is removed either way
    monkeypatch.setenv("SHARDCUT_DIRECT_IO", "0")
    assert not direct_write.direct_io_supported(tmp_path)
    monkeypatch.delenv("SHARDCUT_DIRECT_IO")
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    assert not direct_write.direct_io_supported(tmp_path)
    source = write_synthetic_checkpoint(tmp_path / "model", SPEC)
    report = prune(source, tmp_path / "out", Plan(KEEP))  # neither the writer nor the read-back opens O_DIRECT
    assert report.verified and (tmp_path / "out" / report.shards[0]).is_file()


def test_verify_source_reads_the_sources_with_o_direct_too(direct_dir, monkeypatch):
    """`verify OUT --source MODEL` (and a resumed prune's check of finished shards) reads the
    source ranges with O_DIRECT (their aligned covers) and still finds one flipped byte."""
    from shardcut.ops.verification import verify

    source = write_synthetic_checkpoint(direct_dir / "model", SPEC)
    out = direct_dir / "out"
    prune(source, out, Plan(KEEP))
    monkeypatch.setattr(readback, "DIRECT_MIN", 1)
    monkeypatch.setattr(readback, "CHUNK", 3 * readback.ALIGN)
    read: list[int] = []
    real = readback.read_direct
    monkeypatch.setattr(
        readback, "read_direct", lambda fd, path, buf, at, off, n: read.append(n) or real(fd, path, buf, at, off, n)
    )
    report = verify(out, source=source)
    assert report.ok and report.compared_bytes == sum(read) > 0
    shard = out / sorted(p.name for p in out.glob("*.safetensors"))[1]
    last = max(read_header(shard).tensors.values(), key=lambda t: t.end)
    data = bytearray(shard.read_bytes())
    data[last.end - 1] ^= 0x04
    shard.write_bytes(bytes(data))
    checked = verify(out, source=source)
    assert not checked.ok and any(f"tensor {last.name!r} differs from its source bytes" in p for p in checked.problems)


def test_a_source_refusing_direct_reads_midway_is_read_through_the_page_cache(direct_dir, monkeypatch):
    """EINVAL from an O_DIRECT source read (a device whose blocks are larger than ALIGN) is not
    an error: that file is read through the page cache from then on, and compared from it."""
    import errno

    source = write_synthetic_checkpoint(direct_dir / "model", SPEC)
    monkeypatch.setattr(readback, "DIRECT_MIN", 1)
    refused: list[Path] = []

    def einval(fd, path, buf, at, offset, n):
        refused.append(path)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(readback, "read_direct", einval)
    report = prune(source, direct_dir / "out", Plan(KEEP))
    assert report.verified and refused
    assert len(refused) == len(set(refused))  # each file tried once, then read through the page cache
    clean = prune(source, direct_dir / "plain", Plan(KEEP), verify=False)
    assert all((direct_dir / "out" / n).read_bytes() == (direct_dir / "plain" / n).read_bytes() for n in clean.shards)
