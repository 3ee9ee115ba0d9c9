"""Facts as people write and read them, spelled once: byte sizes (`5GB`, `500MB`, `2GiB` in,
decimal units as in transformers' `max_shard_size`, binary ones with `i`; `1.50 GB` out) and
long lists of layer keys or expert ids shortened for one line (`span`). The CLI's option check,
`prune(max_shard_size=...)`, `max_memory`, messages and printed reports all use these."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import overload

from shardcut.format.errors import ShardcutError

UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
MAX_BYTES = 1 << 60  # an exabyte: beyond any disk or memory this tool will meet
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]I?B|B)?\s*", re.IGNORECASE)


@overload
def parse_size(text: str | int, what: str = "size") -> int: ...
@overload
def parse_size(text: None, what: str = "size") -> None: ...
def parse_size(text: str | int | None, what: str = "size") -> int | None:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes; None stays None. Refused (one line
    naming `what`): text that is no size, and sizes outside 1 byte .. 1 EB (NaN, infinity).

    Example:
        >>> parse_size("5GB"), parse_size("2GiB"), parse_size(1024)
        (5000000000, 2147483648, 1024)
    """
    if text is None:
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        value: float = text
    else:
        m = _SIZE.fullmatch(str(text))
        if m is None:
            raise ShardcutError(f"{what} {str(text)!r}: not a size (try 5GB or 500MB)")
        value = float(m.group(1)) * UNITS[(m.group(2) or "").upper()]
    if not (math.isfinite(value) and 1 <= value <= MAX_BYTES):
        raise ShardcutError(f"{what} {str(text)!r}: must be a size from 1 byte to 1 EB")
    return int(value)


def human_bytes(n: float) -> str:
    """A byte count for people, in decimal units.

    Example:
        >>> human_bytes(999), human_bytes(1_500_000_000)
        ('999 B', '1.50 GB')
    """
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def span(
    items: Iterable[object], *, limit: int = 6, head: int = 3, tail: int = 2, sep: str = ", ", count: bool = False
) -> str:
    """`items` joined by `sep`, or past `limit` items the first `head`, an ellipsis and the last
    `tail` (`count`: and how many in all).

    Example:
        >>> span([str(i) for i in range(1, 61)])
        '1, 2, 3, …, 59, 60'
        >>> span(range(30), limit=12, head=10, tail=0, sep=" ", count=True)
        '0 1 2 3 4 5 6 7 8 9 … (30)'
    """
    texts = [str(x) for x in items]
    if len(texts) <= limit:
        return sep.join(texts)
    shown = [*texts[:head], "…", *(texts[-tail:] if tail else [])]
    return sep.join(shown) + (f" ({len(texts)})" if count else "")
