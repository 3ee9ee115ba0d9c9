"""Hugging Face cache paths and `org/name@revision` model references, spelled once.

huggingface_hub lays a repo out as `<cache>/models--org--name/snapshots/<commit>/`, whose files
link into `../../blobs/`. Reading a path back (`snapshot_of`) and building one
(`repo_folder_name`) both live here, so the checkpoint's link checks, prune's provenance and
calibration's recorded revision agree on what a snapshot is.
"""

from __future__ import annotations

from pathlib import Path

REPO_PREFIX = "models--"


def repo_folder_name(repo_id: str) -> str:
    """`org/name` -> `models--org--name`, the repo's folder in the cache."""
    return REPO_PREFIX + repo_id.replace("/", "--")


def snapshot_of(folder: str | Path) -> tuple[str, str] | None:
    """(repo id, commit) when `folder` is a snapshot folder of the cache, else None.

    Example:
        >>> snapshot_of("/cache/models--Qwen--Qwen3-30B-A3B/snapshots/0123abcd")
        ('Qwen/Qwen3-30B-A3B', '0123abcd')
    """
    folder = Path(folder)
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith(REPO_PREFIX):
        return folder.parent.parent.name.removeprefix(REPO_PREFIX).replace("--", "/"), folder.name
    return None


def split_revision(model: str | Path) -> tuple[str, str | None]:
    """`org/name@revision` -> ("org/name", "revision") unless the text names an existing path
    (a local path always wins over a repo id); anything else -> (text, None)."""
    text = str(model)
    if "@" in text and not Path(text).exists():
        repo, _, revision = text.partition("@")
        return repo, revision
    return text, None
