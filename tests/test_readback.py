"""The verification that trails the writer (shardcut/format/readback.py): a byte that differs on
disk fails the prune (header or tensor, in any chunk, with direct I/O or the fallback), nothing
is committed and nothing hangs; the read-back uses O_DIRECT where the filesystem allows it and
leaves no written page in the page cache; `verify --source` uses the same comparison."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

import shardcut.format.readback as readback
from shardcut.format.errors import ShardcutError
from shardcut.ops.synthetic import SyntheticSpec, write_synthetic_checkpoint
from shardcut.ops.verification import verify
from shardcut.plans.plan import Plan
from shardcut.rewrite.outdir import partial_dir
from shardcut.rewrite.writer import prune, write_followed

SPEC = SyntheticSpec(layers=4, experts=8, top_k=2, hidden=64, moe_inter=32, shards=4, vocab=256)
KEEP = {"1": [0, 2, 3, 7], "2": [1, 2, 5, 6], "3": [0, 1, 4, 5]}


@pytest.fixture
def source(tmp_path) -> Path:
    return write_synthetic_checkpoint(tmp_path / "model", SPEC)


@pytest.fixture(params=["small-chunks", "one-chunk"])
def chunking(request, monkeypatch):
    """Small chunks make segments straddle chunk boundaries and the writer wait on the window."""
    if request.param == "small-chunks":
        monkeypatch.setattr(readback, "CHUNK", 3 * readback.ALIGN)
        monkeypatch.setattr(readback, "WINDOW", 4 * 3 * readback.ALIGN)
    return request.param


@pytest.fixture(params=["direct", "page-cache", "fallback"])
def io_path(request, monkeypatch):
    """`direct`: O_DIRECT writes and read-back (where the filesystem allows them); `page-cache`:
    writes through the page cache (`SHARDCUT_DIRECT_IO=0`), write-back awaited, O_DIRECT
    read-back; `fallback`: no O_DIRECT and no sync_file_range (fdatasync, drop, buffered read)."""
    if request.param == "direct":  # tensors of 512 bytes and up are read with O_DIRECT too, smaller ones are not
        monkeypatch.setattr(readback, "DIRECT_MIN", 512)
    else:
        monkeypatch.setenv("SHARDCUT_DIRECT_IO", "0")
    if request.param == "fallback":
        monkeypatch.setattr(readback, "_open_direct", lambda path: None)
        monkeypatch.setattr(readback, "_SYNC_FILE_RANGE", None)
    return request.param


def _expected_byte(follower: readback.Follower, offset: int) -> int:
    for seg in follower.segments:
        if seg.start <= offset < seg.start + seg.length:
            if seg.data is not None:
                return seg.data[offset - seg.start]
            with open(seg.piece.path, "rb") as f:
                f.seek(seg.piece.offset + offset - seg.start)
                return f.read(1)[0]
    raise AssertionError(f"offset {offset} not covered")


def _corrupt(monkeypatch, shard_index: int, where: str) -> list[tuple[str, int]]:
    """Flip one written byte of the `shard_index`-th shard (in its header, or its last byte)
    right after the writer wrote it, as a fault on the way to the disk would (through a
    descriptor of its own: the writer's may be O_DIRECT); returns what was flipped."""
    real = readback.Follower.written
    seen: list[Path] = []
    flipped: list[tuple[str, int]] = []

    def written(self, fd, pos, *staged):
        if self.path not in seen:
            seen.append(self.path)
        target = 20 if where == "header" else self.size - 1
        if not flipped and seen.index(self.path) == shard_index and pos > target:
            own = os.open(self.path, os.O_WRONLY)
            try:
                os.pwrite(own, bytes([_expected_byte(self, target) ^ 0x10]), target)
            finally:
                os.close(own)
            flipped.append((self.path.name, target))
        real(self, fd, pos, *staged)

    monkeypatch.setattr(readback.Follower, "written", written)
    return flipped


def _prune_in_time(*args, **kwargs):
    """Run prune on a thread: a pipeline that deadlocks fails the test instead of hanging it."""
    result: dict = {}

    def body():
        try:
            result["report"] = prune(*args, **kwargs)
        except BaseException as exc:
            result["error"] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "prune hung"
    if "error" in result:
        raise result["error"]
    return result["report"]


@pytest.mark.parametrize("where", ["tensor", "header"])
@pytest.mark.parametrize("shard", [0, 2])
def test_a_byte_that_differs_on_disk_fails_the_prune(source, tmp_path, monkeypatch, chunking, io_path, where, shard):
    flipped = _corrupt(monkeypatch, shard, where)
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    what = "the header" if where == "header" else "tensor '"
    with pytest.raises(ShardcutError, match=f"{what}.*differs from its source bytes \\(read back from the disk\\)"):
        _prune_in_time(source, out, Plan(KEEP))
    assert flipped, "the corruption was not injected"
    assert not out.exists() and not partial_dir(out).exists()
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


def test_without_verification_the_same_fault_goes_through(source, tmp_path, monkeypatch, chunking):
    """The check above is the verification's doing: with `verify=False` the flipped byte is
    committed, and `verify --source` then finds it (the same comparison, on a finished OUT)."""
    flipped = _corrupt(monkeypatch, 1, "tensor")
    out = tmp_path / "out"
    report = _prune_in_time(source, out, Plan(KEEP), verify=False)
    assert flipped and not report.verified and out.is_dir()
    checked = verify(out, source=source)
    assert not checked.ok
    assert any(
        "differs from its source bytes" in p and flipped[0][0].removesuffix(".part") in p for p in checked.problems
    )


def test_clean_prune_verifies_and_is_byte_identical_either_way(source, tmp_path, chunking, io_path):
    a = _prune_in_time(source, tmp_path / "a", Plan(KEEP))
    b = _prune_in_time(source, tmp_path / "b", Plan(KEEP), verify=False)
    assert a.verified and not b.verified
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert shards and all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in shards)
    report = verify(tmp_path / "a", source=source)
    assert report.ok and report.compared_bytes == sum(
        t.nbytes for n in shards for t in readback.read_header(tmp_path / "a" / n).tensors.values()
    )


def test_read_back_bypasses_the_page_cache(source, tmp_path, monkeypatch):
    """Every written byte is read back through an O_DIRECT descriptor, which reads the device,
    never the page cache (on a filesystem that refuses O_DIRECT the fallback above applies)."""
    direct: dict[int, int] = {}  # fd -> its F_GETFL flags
    read_through: dict[int, int] = {}
    real_open, real_read = readback._open_direct, readback.pread_into

    def spy_open(path):
        fd = real_open(path)
        if fd is not None:
            direct[fd] = fcntl.fcntl(fd, fcntl.F_GETFL)
        return fd

    def spy_read(fd, view, offset):
        n = real_read(fd, view, offset)
        read_through[fd] = read_through.get(fd, 0) + n if fd in direct else read_through.get(fd, 0)
        return n

    monkeypatch.setattr(readback, "_open_direct", spy_open)
    monkeypatch.setattr(readback, "pread_into", spy_read)
    out = tmp_path / "out"
    _prune_in_time(source, out, Plan(KEEP))
    if not direct:
        pytest.skip("this filesystem refuses O_DIRECT (the fallback is tested above)")
    assert all(flags & os.O_DIRECT for flags in direct.values())
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert sum(n for fd, n in read_through.items() if fd in direct) == written


def test_stream_writes_are_read_back_too(source, tmp_path, monkeypatch, chunking):
    """`writer.write_followed` (one shard written with its follower, as `writer.write_shards` does for
    plain and streamed prunes): a byte that differs on disk is an error, a clean shard is byte-exact."""
    from shardcut.format.checkpoint import open_checkpoint
    from shardcut.format.container import PinnedSources
    from shardcut.moe.model import describe
    from shardcut.rewrite.writer import layout

    ckpt = open_checkpoint(source)
    lay = layout(ckpt, describe(ckpt), Plan(KEEP))
    with PinnedSources(ckpt.shards) as pinned:
        clean = tmp_path / "clean.safetensors"
        size = write_followed(clean, lay.shards[1], lay.metadata[1], sources=pinned)
        assert clean.stat().st_size == size
        assert readback.compare_written(tmp_path, [lay.shards[1]], [clean.name], pinned) == sum(
            t.nbytes for t in lay.shards[1]
        )
        flipped = _corrupt(monkeypatch, 0, "tensor")
        with pytest.raises(ShardcutError, match="differs from its source bytes"):
            write_followed(tmp_path / "bad.safetensors", lay.shards[1], lay.metadata[1], sources=pinned)
        assert flipped
