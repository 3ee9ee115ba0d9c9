"""The one check of numeric and enumerated command-line options (issue 15): finite, in range,
spelled as documented. A bad value ends as one line naming the option, its value and the rule,
exit code 2, before any file is read or written."""

from __future__ import annotations

import math
import re

from rich.markup import escape

from shardcut_cli.common import fail

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]I?B|B)?\s*", re.IGNORECASE)
_MTP = re.compile(r"reuse-last|(?:scores-of|same-ids-as):[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
MAX_BYTES = 1 << 60  # an exabyte: beyond any disk or memory this tool will meet


def check_int(option: str, value: int | None, low: int = 1, high: int | None = None) -> None:
    """`value` (None: not given) within [low, high]."""
    if value is None:
        return
    if value < low or high is not None and value > high:
        rule = f"at least {low}" if high is None else f"in {low}..{high}"
        fail(f"{option} {value}: must be an integer {rule}")


def check_ratio(option: str, value: float | None) -> None:
    """A fraction strictly between 0 and 1."""
    if value is not None and not (math.isfinite(value) and 0 < value < 1):
        fail(f"{option} {value}: must be a number strictly between 0 and 1")


def check_size(option: str, text: str | None) -> None:
    """A positive, finite byte size: 5GB, 500MB, 2GiB or a byte count."""
    if text is None:
        return
    m = _SIZE.fullmatch(text)
    units = {
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
    if m is None:
        fail(f"{option} {escape(repr(text))}: not a size (try 5GB or 500MB)")
        return  # fail raised; mypy cannot see it through the shardcut_cli package name (an editable finder)
    value = float(m.group(1)) * units[(m.group(2) or "").upper()]
    if not (math.isfinite(value) and 1 <= value <= MAX_BYTES):
        fail(f"{option} {escape(repr(text))}: must be a size from 1 byte to 1 EB")


def check_mtp_policy(option: str, policy: str | None) -> None:
    """reuse-last, scores-of:N or same-ids-as:N (N a layer key)."""
    if policy is not None and not _MTP.fullmatch(policy):
        fail(f"{option} {escape(repr(policy))}: unknown policy (known: reuse-last, scores-of:N, same-ids-as:N)")
