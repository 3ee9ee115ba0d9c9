"""The safetensors container: every dtype travels byte for byte, and bad headers are refused
with a one-line error naming the file. Written files are read back with the safetensors
library's own parser, so the writer is checked against the reference, not against itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors import deserialize

import shardcut.format.container as container
from shardcut.format.container import DTYPE_BITS, OutTensor, Piece, merge_pieces, read_header, write_shard
from shardcut.format.errors import ShardcutError

# Every dtype safetensors 0.8 defines, with its bits per element (packed sub-byte types included).
SAFETENSORS_DTYPES = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
SHAPE = (6, 4)  # 24 elements: whole bytes for 4- and 6-bit types; 6 "experts" of 4 elements


def raw_file(path: Path, header: dict | bytes, data: bytes) -> Path:
    """A safetensors file written by hand: u64 length | header | data."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(len(body).to_bytes(8, "little") + body + data)
    return path


def nbytes(dtype: str, shape=SHAPE) -> int:
    return SAFETENSORS_DTYPES[dtype] * shape[0] * shape[1] // 8


@pytest.fixture
def every_dtype(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """One tensor of each dtype, filled with distinct pseudo-random bytes."""
    header, data, blobs = {"__metadata__": {"format": "pt", "note": "all dtypes"}}, b"", {}
    for i, dtype in enumerate(SAFETENSORS_DTYPES):
        blob = os.urandom(nbytes(dtype))
        header[f"t.{i}.{dtype}"] = {
            "dtype": dtype,
            "shape": list(SHAPE),
            "data_offsets": [len(data), len(data) + len(blob)],
        }
        blobs[f"t.{i}.{dtype}"] = blob
        data += blob
    return raw_file(tmp_path / "src.safetensors", header, data), blobs


def test_dtype_table_covers_safetensors():
    assert {k: DTYPE_BITS.get(k) for k in SAFETENSORS_DTYPES} == SAFETENSORS_DTYPES


def test_read_header_gives_exact_byte_ranges(every_dtype):
    path, blobs = every_dtype
    header = read_header(path)
    assert header.metadata == {"format": "pt", "note": "all dtypes"}
    raw = path.read_bytes()
    for name, blob in blobs.items():
        t = header.tensors[name]
        assert (t.dtype, t.shape) == (name.split(".")[-1], SHAPE)
        assert raw[t.start : t.end] == blob


@pytest.mark.parametrize("copy_file_range", [True, False], ids=["copy_file_range", "read_write"])
def test_every_dtype_round_trips_byte_exact(every_dtype, tmp_path, monkeypatch, copy_file_range):
    if not copy_file_range:
        monkeypatch.setattr(container, "_copy_file_range_ok", False)  # the portable fallback
    path, blobs = every_dtype
    src = read_header(path)
    out = [
        OutTensor(t.name, t.dtype, t.shape, [Piece(path, t.start, t.nbytes)]) for t in reversed(src.tensors.values())
    ]
    copied = []
    size = write_shard(tmp_path / "out.safetensors", out, {"format": "pt"}, on_bytes=copied.append)
    raw = (tmp_path / "out.safetensors").read_bytes()
    assert size == len(raw) and sum(copied) == sum(map(len, blobs.values()))
    parsed = dict(deserialize(raw))  # the reference parser
    assert set(parsed) == set(blobs)
    for name, blob in blobs.items():
        assert parsed[name]["dtype"] == name.split(".")[-1] and list(parsed[name]["shape"]) == list(SHAPE)
        assert bytes(parsed[name]["data"]) == blob
    assert read_header(tmp_path / "out.safetensors").metadata == {"format": "pt"}


@pytest.mark.parametrize("dtype", ["F4", "F6_E2M3", "F8_E4M3", "BF16", "F32"])
def test_expert_row_slices_copy_the_right_bytes(every_dtype, tmp_path, dtype):
    path, blobs = every_dtype
    t = next(t for t in read_header(path).tensors.values() if t.dtype == dtype)
    row = t.nbytes // SHAPE[0]
    kept = [0, 2, 3, 5]
    pieces = merge_pieces([Piece(path, t.start + k * row, row) for k in kept])
    assert len(pieces) == 3  # rows 2 and 3 are adjacent: one copy
    write_shard(tmp_path / "rows.safetensors", [OutTensor("rows", dtype, (len(kept), SHAPE[1]), pieces)])
    ((name, got),) = deserialize((tmp_path / "rows.safetensors").read_bytes())
    blob = blobs[t.name]
    assert bytes(got["data"]) == b"".join(blob[k * row : (k + 1) * row] for k in kept)


def test_writer_refuses_pieces_of_the_wrong_size(every_dtype, tmp_path):
    path, _ = every_dtype
    with pytest.raises(ValueError, match="needs"):
        write_shard(tmp_path / "bad.safetensors", [OutTensor("x", "F32", (2, 2), [Piece(path, 8, 12)])])


def _entry(dtype="F32", shape=(2, 2), offsets=(0, 16)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_HEADERS = {
    "not JSON": (b"{'a': 1}", 0, "corrupt header JSON"),
    "not UTF-8": (b'{"\xff": 1}', 0, "corrupt header JSON"),
    "NaN": (b'{"a": NaN}', 0, "corrupt header JSON"),
    "not an object": (b"[1, 2]", 0, "not an object"),
    "metadata not strings": ({"__metadata__": {"a": 1}}, 0, "__metadata__"),
    "entry not an object": ({"w": [1]}, 16, "entry is not an object"),
    "unknown dtype": ({"w": _entry(dtype="F12")}, 16, "unknown dtype"),
    "negative dim": ({"w": _entry(shape=(-1, 2))}, 16, "shape"),
    "float dim": ({"w": {**_entry(), "shape": [2.0, 2]}}, 16, "shape"),
    "one offset": ({"w": {**_entry(), "data_offsets": [0]}}, 16, "two integers"),
    "reversed offsets": ({"w": _entry(offsets=(16, 0))}, 16, "not ordered"),
    "out of bounds": ({"w": _entry(offsets=(8, 24))}, 16, "out of bounds"),
    "size mismatch": ({"w": _entry(offsets=(0, 12))}, 16, "needs 16 bytes"),
    "partial byte": ({"w": _entry(dtype="F4", shape=(3,), offsets=(0, 2))}, 16, "whole bytes"),
    "overlap": ({"a": _entry(), "b": _entry(offsets=(8, 24))}, 24, "overlaps"),
}


@pytest.mark.parametrize("case", BAD_HEADERS, ids=list(BAD_HEADERS))
def test_bad_header_is_one_line_naming_the_file(tmp_path, case):
    header, data_len, words = BAD_HEADERS[case]
    path = raw_file(tmp_path / "bad.safetensors", header, bytes(data_len))
    with pytest.raises(ShardcutError) as err:
        read_header(path)
    message = str(err.value)
    assert words in message and str(path) in message and "\n" not in message


@pytest.mark.parametrize(
    "length, size, words",
    [
        (None, 5, "shorter than the 8-byte"),
        (200_000_000, 64, "exceeds the safetensors limit"),
        (1000, 64, "beyond the end of the file"),
    ],
)
def test_bad_header_length(tmp_path, length, size, words):
    path = tmp_path / "bad.safetensors"
    body = b"" if length is None else length.to_bytes(8, "little")
    path.write_bytes((body + b"{}" + bytes(size))[:size])
    with pytest.raises(ShardcutError, match=words):
        read_header(path)


def test_zero_size_tensors_and_empty_header_are_fine(tmp_path):
    path = raw_file(tmp_path / "ok.safetensors", {"e": _entry(shape=(0, 4), offsets=(0, 0)), "w": _entry()}, bytes(16))
    header = read_header(path)
    assert header.tensors["e"].nbytes == 0 and header.tensors["w"].nbytes == 16
    assert read_header(raw_file(tmp_path / "empty.safetensors", {}, b"")).tensors == {}


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ShardcutError, match="not found"):
        read_header(tmp_path / "absent.safetensors")
    with pytest.raises(ShardcutError, match="directory"):
        read_header(tmp_path)
