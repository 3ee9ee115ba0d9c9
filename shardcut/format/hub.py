"""MODEL arguments: a local checkpoint folder or a Hub repo id `org/name[@revision]`.

Everything Hub-facing goes through huggingface_hub's public API and one `HfApi`-compatible
object (`hub_api()`, replaceable in tests), so the local cache, `HF_HUB_OFFLINE`, `HF_TOKEN`
and the stored login behave exactly as in every other Hugging Face tool:

- `resolve_model` gives a local folder with every file (the cached snapshot, downloading what
  is missing unless offline): for commands that read tensor bytes (prune, verify, calibrate).
- `open_model` gives a `Checkpoint` from config.json, the index and the shard headers only:
  from the cache when the shards are there, else by HTTP range reads of the headers
  (`HfApi.get_safetensors_metadata`). For `inspect` and `plan`, which never read tensor data.

Every failure becomes one `ShardcutError` line naming the repo; the token never appears in it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shardcut.format.cache_paths import repo_folder_name
from shardcut.format.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_NAME,
    WEIGHT_PATTERNS,
    Checkpoint,
    open_checkpoint,
    read_json_object,
)
from shardcut.format.container import ShardHeader, TensorInfo, parse_header_bytes
from shardcut.format.errors import ShardcutError

# Weights in other formats that a repo may carry next to its safetensors: never downloaded
# (they would cost disk, and the side-file rules leave them out of every output anyway).
OTHER_WEIGHTS = [p for p in WEIGHT_PATTERNS if p != "*.safetensors"] + ["consolidated*.safetensors", "metal/*"]
_REVISION = re.compile(r"^[\w][\w./-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
LOGIN_HINT = "set HF_TOKEN or run `hf auth login`"


@dataclass(frozen=True)
class RepoRef:
    """A Hub model repo and an optional revision (branch, tag or commit)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def is_local(model: str | Path) -> bool:
    """Whether MODEL names an existing path (a local path always wins over a repo id)."""
    return Path(model).exists()


def parse_repo_id(text: str) -> RepoRef:
    """`org/name` or `org/name@revision` -> RepoRef; malformed ids raise ShardcutError.

    Example:
        >>> parse_repo_id("Qwen/Qwen3-30B-A3B@main")
        RepoRef(repo_id='Qwen/Qwen3-30B-A3B', revision='main')
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, at, revision = str(text).partition("@")
    if repo_id.count("/") != 1:
        raise ShardcutError("no such folder, and not a Hub repo id of the form org/name[@revision]", text)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ShardcutError(f"malformed Hub repo id ({str(exc).splitlines()[0]})", text) from None
    if at and not (_REVISION.match(revision) and ".." not in revision):
        raise ShardcutError(f"malformed revision {revision!r} after '@' (expected a branch, tag or commit)", text)
    return RepoRef(repo_id, revision or None)


def hub_api():
    """The `HfApi` every Hub call goes through (tests replace this function with a fake)."""
    from huggingface_hub import HfApi

    from shardcut import __version__

    return HfApi(library_name="shardcut", library_version=__version__)


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub sees it (read when huggingface_hub is imported)."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def current_token() -> str | None:
    """The token huggingface_hub would send (HF_TOKEN, then the stored login); never printed."""
    from huggingface_hub import get_token

    try:
        return get_token()
    except Exception:  # e.g. a failed OIDC exchange: treat as "no token", the Hub call will say why
        return None


def scrub(text: str) -> str:
    """`text` with the token, should a library message ever carry it, replaced by ***."""
    token = current_token()
    return text.replace(token, "***") if token else text


def cache_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cache_folder(ref: RepoRef) -> Path:
    """`models--org--name` in the cache, laid out as huggingface_hub does."""
    return cache_root() / repo_folder_name(ref.repo_id)


@contextmanager
def hub_errors(ref: RepoRef | str, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line ShardcutErrors naming `ref`."""
    from huggingface_hub import errors as e

    revision = revision or (ref.revision if isinstance(ref, RepoRef) else None)
    try:
        yield
    except ShardcutError:
        raise
    except e.GatedRepoError:
        raise ShardcutError(
            f"gated repo: accept its conditions on the Hub and authenticate ({LOGIN_HINT})", ref
        ) from None
    except e.RepositoryNotFoundError:
        why = (
            "it is private and your token cannot read it"
            if current_token()
            else f"it is private and no token is set ({LOGIN_HINT})"
        )
        raise ShardcutError(f"repository not found on the Hub, or {why}", ref) from None
    except e.RevisionNotFoundError:
        raise ShardcutError(f"revision {revision or 'main'!r} does not exist in this repo", ref) from None
    except e.RemoteEntryNotFoundError as exc:
        raise ShardcutError(f"file not found in the repo ({_first_line(exc)})", ref) from None
    except (e.OfflineModeIsEnabled, e.LocalEntryNotFoundError) as exc:
        raise ShardcutError(f"not available offline ({_first_line(exc)})", ref) from None
    except e.NotASafetensorsRepoError:
        raise ShardcutError(f"no {INDEX_NAME} or {SINGLE_NAME} in the repo", ref) from None
    except (e.HfHubHTTPError, e.SafetensorsParsingError, e.HFValidationError, OSError, ValueError) as exc:
        raise ShardcutError(f"Hub request failed ({type(exc).__name__}: {_first_line(exc)})", ref) from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return scrub(lines[0][:200]) if lines else type(exc).__name__


def _cached_refs(ref: RepoRef) -> list[str]:
    refs = cache_folder(ref) / "refs"
    return sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []


def resolve_commit(ref: RepoRef, api=None) -> str:
    """The commit sha `ref.revision` (default main) points to: from the cache's refs when
    offline, else from the Hub (`HfApi.repo_info`)."""
    revision = ref.revision or "main"
    if offline():
        folder = cache_folder(ref)
        if not folder.is_dir():
            raise ShardcutError(
                f"not in the local Hugging Face cache ({cache_root()}) and HF_HUB_OFFLINE=1 forbids downloading it", ref
            )
        ref_file = folder / "refs" / revision
        commit = ref_file.read_text().strip() if ref_file.is_file() else revision
        if not (_COMMIT.match(commit) and (folder / "snapshots" / commit).is_dir()):
            cached = ", ".join(_cached_refs(ref)) or "none"
            raise ShardcutError(
                f"revision {revision!r} is not in the local Hugging Face cache (cached: {cached}) "
                "and HF_HUB_OFFLINE=1 forbids looking it up",
                ref,
            )
        return commit
    with hub_errors(ref):
        sha = (api or hub_api()).repo_info(ref.repo_id, revision=revision).sha
    if not sha:
        raise ShardcutError(f"the Hub returned no commit for revision {revision!r}", ref)
    return sha


def cached_file(ref: RepoRef, commit: str | None, filename: str) -> Path | None:
    """The cached copy of `filename` at `commit` (None: main), or None (`try_to_load_from_cache`)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(ref.repo_id, filename, revision=commit)
    return Path(found) if isinstance(found, str) else None


def _shard_names(root: Path) -> tuple[list[str], dict | None]:
    """Shard file names the index lists (or the single file), and the index itself."""
    index_path = root / INDEX_NAME
    if index_path.exists():
        index = read_json_object(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ShardcutError("'weight_map' must map tensor names to shard file names", index_path)
        return list(dict.fromkeys(weight_map.values())), index
    return [SINGLE_NAME], None


def _require_cached(ref: RepoRef, root: Path) -> None:
    names, _ = _shard_names(root)
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise ShardcutError(
            f"{len(missing)} of {len(names)} shards (e.g. {missing[0]}) are not in the local "
            "Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading them",
            ref,
        )


def resolve_model(model: str | Path, *, api=None) -> Path:
    """A local folder holding all of MODEL: the folder itself, or the Hub snapshot of a repo id.

    A repo id resolves through huggingface_hub's cache, downloading what is missing (weights in
    other formats than safetensors excepted) unless HF_HUB_OFFLINE=1.

    Example:
        >>> resolve_model("Qwen/Qwen3-30B-A3B@main")
        PosixPath('~/.cache/huggingface/hub/models--Qwen--Qwen3-30B-A3B/snapshots/…')
    """
    if is_local(model):
        return Path(model)
    ref = parse_repo_id(str(model))
    if offline():
        root = cache_folder(ref) / "snapshots" / resolve_commit(ref)
        if not (root / CONFIG_NAME).is_file():
            raise ShardcutError(
                f"{CONFIG_NAME} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it", ref
            )
        _require_cached(ref, root)
        return root
    with hub_errors(ref):
        return Path(
            (api or hub_api()).snapshot_download(ref.repo_id, revision=ref.revision, ignore_patterns=OTHER_WEIGHTS)
        )


def open_model(model: str | Path, *, api=None) -> Checkpoint:
    """MODEL's config, index and shard headers, never a byte of tensor data.

    A local folder opens directly; a repo id opens from the local cache when its shards are
    there, otherwise config.json and the index are downloaded (small, into the cache) and the
    shard headers read remotely by range requests. A remote checkpoint's shard paths do not
    exist locally: its byte offsets count from a synthetic header and must never be read.

    Example:
        >>> ckpt = open_model("Qwen/Qwen3-30B-A3B")
        >>> len(ckpt.shards), ckpt.config["num_experts"]
        (16, 128)
    """
    if is_local(model):
        return open_checkpoint(model)
    ref = parse_repo_id(str(model))
    api = api or hub_api()
    commit = resolve_commit(ref, api)
    if offline():
        return open_checkpoint(resolve_model(model))
    with hub_errors(ref):
        from huggingface_hub.errors import EntryNotFoundError

        root = Path(api.hf_hub_download(ref.repo_id, CONFIG_NAME, revision=commit)).parent
        try:
            api.hf_hub_download(ref.repo_id, INDEX_NAME, revision=commit)
        except EntryNotFoundError:
            pass  # a single model.safetensors
        names, index = _shard_names(root)
        if all(cached_file(ref, commit, n) for n in names):
            return open_checkpoint(root)
        meta = api.get_safetensors_metadata(ref.repo_id, revision=commit)
    return remote_checkpoint(root, meta, index, ref)


def remote_header(path: Path, file_meta) -> ShardHeader:
    """A ShardHeader from huggingface_hub's `SafetensorsFileMetadata`, validated by the same
    parser as local files. Offsets count from a re-encoded header, not the file's own."""
    header: dict = {
        name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
        for name, t in file_meta.tensors.items()
    }
    if file_meta.metadata:
        header["__metadata__"] = file_meta.metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    data = max((t.data_offsets[1] for t in file_meta.tensors.values()), default=0)
    return parse_header_bytes(len(raw).to_bytes(8, "little") + raw, 8 + len(raw) + data, path)


def remote_checkpoint(root: Path, meta, index: dict | None, ref: RepoRef | str) -> Checkpoint:
    """A Checkpoint from `HfApi.get_safetensors_metadata`'s answer, with the same consistency
    rules as `open_checkpoint` (each tensor in one shard, index and shards agree)."""
    config = read_json_object(root / CONFIG_NAME)
    names = list(dict.fromkeys(index["weight_map"].values())) if index else [SINGLE_NAME]
    shards: list[ShardHeader] = []
    tensors: dict[str, tuple[ShardHeader, TensorInfo]] = {}
    for name in names:
        if name not in meta.files_metadata:
            raise ShardcutError(f"the Hub returned no header for shard {name!r}", ref)
        header = remote_header(root / name, meta.files_metadata[name])
        shards.append(header)
        for tname, info in header.tensors.items():
            if tname in tensors:
                raise ShardcutError(f"tensor {tname!r} appears in two shards ({tensors[tname][0].path.name})", name)
            tensors[tname] = (header, info)
    if index:
        for tname, shard in index["weight_map"].items():
            if tname not in tensors or tensors[tname][0].path.name != shard:
                raise ShardcutError(
                    f"index lists tensor {tname!r} in {shard!r} but that shard does not hold it", INDEX_NAME
                )
        if set(tensors) - set(index["weight_map"]):
            raise ShardcutError("shards hold tensors the index does not list", INDEX_NAME)
    metadata = index.get("metadata") if index else None
    return Checkpoint(root, config, shards, tensors, metadata if isinstance(metadata, dict) else {})


def is_remote(ckpt: Checkpoint) -> bool:
    """Whether `ckpt` came from remote headers (its shards are not on this disk)."""
    return any(not s.path.is_file() for s in ckpt.shards)
