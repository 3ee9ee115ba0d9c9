"""Chat templates are code the checkpoint brings: render them under a time limit.

transformers renders templates in jinja2's sandbox, which stops attribute tricks but not a
template that loops (`range` is capped at 100 000 items, three nested loops are 10**15 steps).
Compiled jinja templates are plain Python, so a trace function installed for the render (in
this thread only) sees every line it runs and stops it once the deadline passes. It costs a
little per line, and templates are short; nothing else runs traced.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable

from shardcut.format.errors import DataError

TEMPLATE_SECONDS = 10.0  # a real template renders one conversation in milliseconds
TEMPLATE_SECONDS_ENV = "SHARDCUT_TEMPLATE_SECONDS"  # overrides it (a slow machine, or a test)


class _TemplateTimeout(BaseException):
    """BaseException, so a template's own error handling (or jinja's) cannot swallow it."""


def run_limited(fn: Callable[[], object], seconds: float) -> object:
    """`fn()`, stopped with _TemplateTimeout once it has run `seconds` of Python lines."""
    deadline = time.monotonic() + seconds
    ticks = 0

    def local(frame, event, arg):
        nonlocal ticks
        ticks += 1
        if ticks & 0x3FF == 0 and time.monotonic() > deadline:
            raise _TemplateTimeout
        return local

    def trace(frame, event, arg):
        return local

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        return fn()
    finally:
        sys.settrace(previous)


def render_chat_template(
    tokenizer, messages: list | None, source: str, seconds: float | None = None, tools: object = None
) -> str:
    """The text of `messages` (and `tools`) through the tokenizer's chat template, without a
    generation prompt, or DataError naming `source` when the template fails or runs longer than
    `seconds` (None: $SHARDCUT_TEMPLATE_SECONDS, else TEMPLATE_SECONDS)."""
    if seconds is None:
        seconds = _env_seconds()
    kwargs = {"tools": tools} if tools is not None else {}

    def render() -> object:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, **kwargs)

    try:
        return str(run_limited(render, seconds))
    except _TemplateTimeout:
        raise DataError(
            f"chat template ran longer than {seconds:g} s on one conversation (a loop?); "
            "refusing the checkpoint's template",
            source,
        ) from None
    except Exception as exc:  # jinja errors of a template that expects other fields
        raise DataError(f"chat template failed ({type(exc).__name__}: {str(exc)[:80]})", source) from None


def _env_seconds() -> float:
    text = os.environ.get(TEMPLATE_SECONDS_ENV)
    if text is None:
        return TEMPLATE_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise DataError(f"{TEMPLATE_SECONDS_ENV}={text!r}: must be a positive number of seconds")
    return value
