"""The `shardcut` command: a Typer app whose commands live in one module per topic."""

from __future__ import annotations

import typer

from shardcut import __version__
from shardcut_cli import calibrate_cmd, core, eval_cmd, hub_cmd, scores_cmd

app = typer.Typer(
    name="shardcut",
    help="Prune experts out of MoE safetensors checkpoints with REAP, without loading the model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"shardcut {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    pass


for _topic in (core, scores_cmd, calibrate_cmd, eval_cmd, hub_cmd):
    _topic.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
