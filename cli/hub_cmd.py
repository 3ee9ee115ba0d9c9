"""Commands: push (publish a pruned checkpoint to the Hub)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markdown import Markdown
from rich.table import Table

from shardcut_cli.common import console, handle_errors, human_bytes, safe


def register(app: typer.Typer) -> None:
    app.command("push")(push_cmd)


@handle_errors
def push_cmd(
    out: Path = typer.Argument(..., help="A pruned checkpoint folder written by `shardcut prune`."),
    repo_id: str = typer.Argument(..., help="Hub repo to upload to (org/name); created if needed."),
    private: bool = typer.Option(
        False, "--private", help="Create the repo private (an existing repo keeps its visibility)."
    ),
    revision: str | None = typer.Option(None, "--revision", help="Branch to commit to (created if needed)."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of committing to main."),
    scores: Path | None = typer.Option(
        None, "--scores", help="The score file the plan came from: uploaded under calibration/ so others can re-prune."
    ),
    base_model: str | None = typer.Option(
        None, "--base-model", help="The source repo id for the card, when the plan names a local folder."
    ),
    eval_report: Path | None = typer.Option(
        None, "--eval", help="A `shardcut eval --json` report: its table goes on the card, the file under eval/."
    ),
    eval_plot: Path | None = typer.Option(
        None, "--eval-plot", help="With --eval: its `--plot` picture, shown on the card."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files and print the card; upload nothing."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable summary."),
) -> None:
    """Upload OUT with a generated model card, the scores and plan under calibration/, and provenance.

    Authenticates with HF_TOKEN or the stored login (`hf auth login`); the token is never printed.
    """
    from shardcut.ops.publish import push

    report = push(
        out,
        repo_id,
        private=private,
        revision=revision,
        create_pr=create_pr,
        dry_run=dry_run,
        scores=scores,
        base_model=base_model,
        eval_report=eval_report,
        eval_plot=eval_plot,
    )
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    t = Table(
        title=safe(
            f"{'dry run: would upload' if dry_run else 'uploaded'} to {report.repo_id}"
            + (f"@{report.revision}" if report.revision else "")
            + (" (pull request)" if create_pr else "")
        )
    )
    t.add_column("path in repo")
    t.add_column("size", justify="right")
    t.add_column("from")
    for f in report.files:
        t.add_row(safe(f.path_in_repo), human_bytes(f.size), safe(f.origin))
    console.print(t)
    console.print(f"{len(report.files)} files, {human_bytes(sum(f.size for f in report.files))}")
    if dry_run:
        console.rule("README.md")
        card = safe(report.card, markup=False, lines=True)  # names and metadata from the files
        console.print(
            Markdown(card.split("\n---\n", 1)[-1]) if console.is_terminal else card,
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
    else:
        console.print(f"[green]done[/] {safe(report.url)}")
