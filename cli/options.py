"""The one check of numeric and enumerated command-line options (issue 15): finite, in range,
spelled as documented. A bad value ends as one line naming the option, its value and the rule,
exit code 2, before any file is read or written. The plan options' rules are `PlanOptions.check`'s
(shardcut/plans/options.py), which the library applies as well."""

from __future__ import annotations

from rich.markup import escape

from shardcut.format.errors import ShardcutError
from shardcut_cli.common import fail


def check_int(option: str, value: int | None, low: int = 1, high: int | None = None) -> None:
    """`value` (None: not given) within [low, high]."""
    if value is None:
        return
    if value < low or high is not None and value > high:
        rule = f"at least {low}" if high is None else f"in {low}..{high}"
        fail(f"{option} {value}: must be an integer {rule}")


def check_size(option: str, text: str | None) -> None:
    """A positive, finite byte size: 5GB, 500MB, 2GiB or a byte count (`parse_size`'s rule)."""
    from shardcut.format.text import parse_size

    try:
        parse_size(text, option)
    except ShardcutError as exc:
        fail(escape(str(exc)))
