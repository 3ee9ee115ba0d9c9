"""The plan options of `shardcut plan` and `prune --scores`, made from `PlanOptions`' fields.

`takes_plan_options` gives a command one typer option per field (flag, help, default from the
field's metadata) and hands the command one `PlanOptions`: the commands never list the options
themselves, so a new field is a new flag of both.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import Field
from typing import Any

import typer

from shardcut.plans.options import PlanOptions, option_default, option_fields, parse_protect


def takes_plan_options(help_prefix: str = "", exclude: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorate a command whose parameter `options: PlanOptions` is to come from the command
    line; `help_prefix` starts every option's help (prune's "With --scores: "); fields in
    `exclude` get no flag and keep their defaults (eval's own --ratio takes a list)."""

    def decorate(command: Callable) -> Callable:
        hints = typing.get_type_hints(command)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(command).parameters.values()
            if p.name != "options"
        ]
        chosen = [f for f in option_fields() if f.name not in exclude]
        flags = [_parameter(f, help_prefix) for f in chosen]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {f.name: kwargs.pop(f.name) for f in chosen}
            if values.get("protect") is not None:  # LAYER:ID[,ID...] texts
                values["protect"] = parse_protect(values["protect"]) or None
            return command(**kwargs, options=PlanOptions(**values))

        # keyword-only after the command's own parameters: typer reads names, not positions
        wrapper.__signature__ = inspect.Signature([*own, *flags])  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in [*own, *flags]}
        return wrapper

    return decorate


def _parameter(f: Field, help_prefix: str) -> inspect.Parameter:
    meta = f.metadata
    names = [meta["flag"], *([meta["short"]] if "short" in meta else [])]
    option = typer.Option(option_default(f), *names, help=help_prefix + meta["help"], metavar=meta.get("metavar"))
    annotation = list[str] | None if meta.get("text") else typing.get_type_hints(PlanOptions)[f.name]
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
