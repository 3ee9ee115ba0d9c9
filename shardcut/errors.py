"""The one exception type shardcut raises for bad input.

Every message is one line that names the file (or layer) and the problem, so the CLI can print
it as is and exit with code 2.
"""

from __future__ import annotations

from pathlib import Path


class ShardcutError(Exception):
    """Bad input: a malformed file, an inconsistent plan, an unsupported layout.

    Example:
        >>> raise ShardcutError("plan.json: layer 3 keeps 3 experts, other layers keep 4")
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)
