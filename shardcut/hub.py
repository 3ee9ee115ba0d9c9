"""Resolve MODEL arguments: a local checkpoint folder or a Hub repo id (`org/name[@revision]`)."""

from __future__ import annotations

import re
from pathlib import Path

from shardcut.errors import ShardcutError

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")


def resolve_model(model: str | Path) -> Path:
    """A local folder for MODEL: the folder itself, or the Hub snapshot of a repo id.

    Repo ids resolve through huggingface_hub's cache (downloading what is missing unless
    HF_HUB_OFFLINE=1). Example: `resolve_model("Qwen/Qwen3-30B-A3B@main")`.
    """
    path = Path(model)
    if path.exists():
        return path
    text = str(model)
    if not _REPO_ID.match(text):
        raise ShardcutError("no such folder, and not a Hub repo id of the form org/name[@revision]", text)
    repo_id, _, revision = text.partition("@")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision or None))
    except Exception as exc:  # huggingface_hub raises many types; all mean "cannot resolve"
        raise ShardcutError(f"cannot resolve Hub repo ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})",
                            text) from None
