"""A checkpoint folder on disk: config.json, the shard index and every shard's header.

Opening a checkpoint reads only headers, never tensor data, so it is cheap for any size.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from shardcut.format.cache_paths import snapshot_of
from shardcut.format.container import ShardHeader, TensorInfo, read_header
from shardcut.format.errors import CheckpointError, ShardcutError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# Weights in any format: outside the main index, each one would bring back every pruned expert.
WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.gguf",
    "*.npz",
    "*.npy",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.pkl",
    "*.pickle",
    "*.tflite",
    "*.ot",
    "*.keras",
    "*.pdparams",
    "*.nemo",
    "*.mlmodel",
)


def require_regular(path: Path) -> None:
    """Refuse `path` by `stat`, never opening it, unless it is a regular file: a FIFO would
    block a read forever, a device would never end. A missing file raises FileNotFoundError."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ShardcutError(f"cannot read ({exc.strerror or exc})", path) from None
    if not stat.S_ISREG(mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(mode)
            else "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file"
        )
        raise ShardcutError(f"is {kind}, expected a regular file", path)


def read_regular_file(path: Path) -> bytes:
    """The bytes of `path`, a regular file (see `require_regular`)."""
    require_regular(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ShardcutError(f"cannot read ({exc.strerror or exc})", path) from None


def read_json_object(path: Path) -> dict:
    """Load a JSON file that must hold an object; errors name the file."""
    try:
        raw = read_regular_file(path)
    except FileNotFoundError:
        raise ShardcutError("file not found", path) from None
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=DuplicateKeys(path))
    except ShardcutError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ShardcutError(f"not valid JSON ({type(exc).__name__}: {str(exc)[:80]})", path) from None
    if not isinstance(value, dict):
        raise ShardcutError("expected a JSON object at the top level", path)
    return value


@dataclass
class Checkpoint:
    """A local safetensors checkpoint: its config, its shards (in order) and where each tensor lives."""

    root: Path
    config: dict
    shards: list[ShardHeader]
    tensors: dict[str, tuple[ShardHeader, TensorInfo]]
    index_metadata: dict

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for _, t in self.tensors.values())

    @property
    def file_bytes(self) -> int:
        return sum(s.file_size for s in self.shards)


def _inside(root: Path, candidate: Path) -> bool:
    try:
        candidate.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _link_area(root: Path) -> Path:
    """Where a checkpoint's files may resolve to: the folder itself, or for a Hugging Face cache
    snapshot (`models--org--name/snapshots/<sha>`, whose files link into `../../blobs/`) the
    repo's cache folder."""
    if snapshot_of(root):
        return root.parent.parent
    return root


link_area = _link_area  # public: side_files checks side files against the same area as shards


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read config.json, the index and all shard headers of a local checkpoint folder.

    Example:
        >>> ckpt = open_checkpoint("Qwen3-30B-A3B")
        >>> ckpt.tensors["model.layers.0.mlp.gate.weight"][1].shape
        (128, 2048)
    """
    root = Path(path)
    if not root.is_dir():
        raise ShardcutError("not a directory (expected a checkpoint folder or a Hub repo id)", root)
    config = read_json_object(root / CONFIG_NAME)
    index_path = root / INDEX_NAME
    index_metadata: dict = {}
    if index_path.exists():
        index = read_json_object(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ShardcutError("'weight_map' must map tensor names to shard file names", index_path)
        metadata = index.get("metadata")
        index_metadata = metadata if isinstance(metadata, dict) else {}
        shard_names = list(dict.fromkeys(weight_map.values()))
    elif (root / SINGLE_NAME).exists():
        weight_map = None
        shard_names = [SINGLE_NAME]
    else:
        raise ShardcutError(f"neither {INDEX_NAME} nor {SINGLE_NAME} found", root)

    shards: list[ShardHeader] = []
    by_name: dict[str, ShardHeader] = {}
    tensors: dict[str, tuple[ShardHeader, TensorInfo]] = {}
    for name in shard_names:
        if os.path.isabs(name) or ".." in Path(name).parts or "\\" in name:
            raise ShardcutError(f"shard name {name!r} points outside the checkpoint folder", index_path)
        shard_path = root / name
        if not _inside(_link_area(root), shard_path):
            raise ShardcutError(f"shard {name!r} resolves outside the checkpoint folder (symlink?)", index_path)
        if not shard_path.exists():
            raise ShardcutError(f"shard {name!r} named in the index is missing", index_path)
        require_regular(shard_path)
        header = read_header(shard_path)
        shards.append(header)
        by_name[name] = header
        for tname, info in header.tensors.items():
            if tname in tensors:
                raise ShardcutError(
                    f"tensor {tname!r} appears in two shards ({tensors[tname][0].path.name})", shard_path
                )
            tensors[tname] = (header, info)
    if weight_map is not None:
        for tname, shard in weight_map.items():
            found = tensors.get(tname)
            if found is None or found[0] is not by_name[shard]:
                raise ShardcutError(
                    f"index lists tensor {tname!r} in {shard!r} but that shard does not hold it", index_path
                )
        extra = set(tensors) - set(weight_map)
        if extra:
            raise ShardcutError(
                f"shards hold {len(extra)} tensors the index does not list, e.g. {min(extra)!r}", index_path
            )
    return Checkpoint(root, config, shards, tensors, index_metadata)


def layout_fingerprint(ckpt: Checkpoint) -> str:
    """`layout-sha256:<hex>`: sha256 over config.json (without `_name_or_path`) and every shard's
    tensor names, dtypes, shapes and offsets within the shard's data.

    Equal for a Hub snapshot, a local copy of it, and remote headers of the same commit; it
    changes when any tensor, dtype, shard split or config value does. It reads headers only,
    so it cannot tell two checkpoints whose weights differ but whose layout and config are
    identical (a fine-tune saved the same way): the commit (`revision`) identifies those.
    """
    import hashlib

    config = {k: v for k, v in ckpt.config.items() if k != "_name_or_path"}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for shard in ckpt.shards:
        digest.update(f"\n{shard.path.name}".encode())
        for t in sorted(shard.tensors.values(), key=lambda t: t.start):
            digest.update(f"|{t.name}:{t.dtype}:{list(t.shape)}:{t.start - shard.data_start}".encode())
    return f"layout-sha256:{digest.hexdigest()}"


class DuplicateKeys:
    """`object_pairs_hook` for json.loads that refuses a key given twice in one object
    (JSON allows it and keeps the last; a config that says two things says neither)."""

    def __init__(self, path: str | Path) -> None:
        self.path = path

    def __call__(self, pairs: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(f"key {key!r} appears twice in one JSON object", self.path)
            out[key] = value
        return out
