"""The `shardcut` command: a Typer app whose commands live in one module per topic.

`main()` imports only the topic module of the command it runs (`shardcut prune` never imports
calibration's or push's CLI, nor the rich widgets they use: start-up is a cost every prune
pays, ~0.1 s of a 1 GB one). `app`, the whole command set, is built on first use (tests,
`--help`, an unknown command).
"""

from __future__ import annotations

import gc
import importlib
import sys

import typer

from shardcut import __version__

# Every command, and the topic module (shardcut_cli.<module>) whose `register` adds it;
# tests/test_startup.py checks this table against what the modules register.
TOPICS: dict[str, str] = {
    "inspect": "core",
    "prune": "core",
    "verify": "core",
    "demo": "core",
    "scores": "scores_cmd",
    "plan": "scores_cmd",
    "calibrate": "calibrate_cmd",
    "eval": "eval_cmd",
    "eval-merge": "eval_cmd",
    "push": "hub_cmd",
}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"shardcut {__version__}")
        raise typer.Exit()


def build(commands: list[str] | None = None) -> typer.Typer:
    """The app with the topic modules of `commands` registered (None: every command)."""
    new = typer.Typer(
        name="shardcut",
        help="Prune experts out of MoE safetensors checkpoints with REAP, without loading the model.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )

    @new.callback()
    def _root(
        version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    ):
        pass

    wanted = TOPICS.values() if commands is None else (TOPICS[c] for c in commands)
    for module in dict.fromkeys(wanted):  # in table order, each once
        importlib.import_module(f"shardcut_cli.{module}").register(new)
    return new


def _command_of(argv: list[str]) -> str | None:
    """The command `argv` runs, when it is the first argument (options before it: None)."""
    return argv[0] if argv and argv[0] in TOPICS else None


_app: typer.Typer | None = None


def __getattr__(name: str) -> typer.Typer:
    global _app
    if name != "app":
        raise AttributeError(name)
    if _app is None:
        _app = build()
    return _app


def main() -> None:
    # The collector would walk every object of start-up (modules, dataclasses, tensor headers)
    # a few times over, ~0.08 s of a 0.5 s `prune --dry-run` (measured): collect young objects
    # after 30x more allocations than the default, and freeze what the CLI's modules built.
    gc.set_threshold(20_000, 10, 10)
    command = _command_of(sys.argv[1:])
    app = build([command] if command else None)
    gc.freeze()
    app()


if __name__ == "__main__":
    main()
