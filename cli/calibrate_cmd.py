"""Commands: calibrate_cmd (to be built)."""

import typer


def register(app: typer.Typer) -> None:
    pass
