"""Command: eval (what a prune costs: loss, KL, agreement, per-layer error, before writing anything)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import typer
from rich.table import Table

from shardcut.format.errors import ShardcutError
from shardcut.ops.evaluation.options import NOT_EVAL_FLAGS, EvalOptions
from shardcut.plans.options import PlanOptions
from shardcut_cli.common import console, err_console, fail, handle_errors, safe
from shardcut_cli.options import check_int, check_size
from shardcut_cli.plan_options import takes_plan_options

_FIELDS = {f.name: f for f in fields(EvalOptions)}
_FIELD = object()


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
    app.command("eval-merge")(merge_cmd)


def _opt(name: str, *extra: str, default=_FIELD, help: str | None = None):
    """The typer option of EvalOptions field `name`: its flag, default and help (one home for them)."""
    f = _FIELDS[name]
    value = f.default if default is _FIELD else default
    if isinstance(value, tuple):
        value = None  # repeatable options: typer's own empty list
    return typer.Option(value, f.metadata["flag"], *extra, help=help or f.metadata["help"])


def _ratios(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        return [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        fail(f"--ratio must be comma-separated fractions, e.g. 0.25,0.5 (got {text!r})")
    return []


@handle_errors
@takes_plan_options(help_prefix="With --ratio: ", exclude=NOT_EVAL_FLAGS)
def eval_cmd(
    model: str = typer.Argument(
        ...,
        help="The checkpoint to prune (folder or Hub repo id); with --source, the "
        "pruned checkpoint (a `shardcut prune` output).",
    ),
    data: str = typer.Option(..., "--data", help="Held-out text, as calibrate's --data (not the calibration data)."),
    plan: list[Path] | None = _opt("plans"),
    scores: Path | None = _opt("scores"),
    ratio: str | None = _opt("ratios"),
    source: str | None = typer.Option(
        None, "--source", help="MODEL is a pruned checkpoint: stream it next to this source and compare."
    ),
    samples: int | None = _opt("samples"),
    max_length: int = _opt("max_length"),
    device: str = _opt("device"),
    dtype: str | None = _opt("dtype"),
    seed: int = _opt("seed"),
    max_memory: str | None = _opt("max_memory"),
    batch_tokens: int | None = _opt("batch_tokens"),
    trust_remote_code: bool = _opt("trust_remote_code"),
    work_dir: Path | None = _opt("work_dir"),
    out: Path | None = _opt("out", "--out"),
    resume: bool = _opt("resume"),
    shard: str | None = _opt("shard"),
    overwrite: bool = _opt("overwrite"),
    checkpoint_every: int | None = _opt("checkpoint_every"),
    prefetch: bool = _opt("prefetch"),
    plot: Path | None = typer.Option(None, "--plot", help="Write a PNG: quality against ratio, per-layer error."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    options: PlanOptions = PlanOptions(),
) -> None:
    """Measure what pruning costs on held-out text, streaming the model one layer at a time.

    Under torchrun the samples are split across ranks (rank 0 writes -o).
    """
    from shardcut.ops.evaluation.options import EvalOptions
    from shardcut.ops.evaluation.runner import evaluate
    from shardcut_cli.calibrate_cmd import _Display

    ratios = _ratios(ratio)
    if ratios and scores is None:
        fail("--ratio needs --scores")
    if source is None and not plan and not ratios:
        fail("give --plan, or --scores with --ratio, or a pruned checkpoint with --source")
    if source is not None and (plan or ratios):
        fail("with --source, MODEL is the pruned checkpoint: give no --plan or --ratio")
    check_int("--samples", samples)
    check_int("--max-length", max_length)
    check_int("--seed", seed, low=0)
    check_int("--batch-tokens", batch_tokens)
    check_int("--checkpoint-every", checkpoint_every, low=0)
    check_size("--max-memory", max_memory)
    src, pruned = (source, [model]) if source is not None else (model, [])
    eval_options = EvalOptions(
        plans=tuple(plan or ()),
        scores=scores,
        ratios=tuple(ratios),
        plan_options=options,
        pruned=tuple(pruned),
        samples=samples,
        max_length=max_length,
        device=device,
        dtype=dtype,
        seed=seed,
        max_memory=max_memory,
        batch_tokens=batch_tokens,
        trust_remote_code=trust_remote_code,
        work_dir=work_dir,
        out=out,
        resume=resume,
        shard=shard,
        overwrite=overwrite,
        checkpoint_every=checkpoint_every,
        prefetch=prefetch,
    )
    live = err_console.is_terminal and not as_json
    with _Display(live) as display, _flags():
        report = evaluate(src, data, eval_options, progress=display if not as_json else None)
    _show(report, out if shard is None else None, plot, as_json)
    if out is not None and shard is not None:
        console.print(
            f"[green]wrote[/] shard {safe(shard)} tally {safe(str(out))} (combine with `shardcut eval-merge`)"
        )


@handle_errors
def merge_cmd(
    tallies: list[Path] = typer.Argument(..., help="Tallies of `shardcut eval --shard i/N -o T` runs."),
    out: Path | None = typer.Option(None, "-o", "--out", help="Write the merged report as JSON (for `push --eval`)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing -o."),
    plot: Path | None = typer.Option(None, "--plot", help="Write a PNG: quality against ratio, per-layer error."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Combine the shards of one evaluation exactly into the report of the whole data."""
    from shardcut.ops.evaluation.tally import merge_tally_files

    with _flags():
        report = merge_tally_files(tallies, out, overwrite=overwrite)
    _show(report, out, plot, as_json)


@contextmanager
def _flags():
    """Library messages name EvalOptions fields (`ratios`); show the flags instead."""
    from shardcut.ops.evaluation.options import flag_message

    try:
        yield
    except ShardcutError as exc:
        raise ShardcutError(flag_message(str(exc))) from None


def _show(report, out: Path | None, plot: Path | None, as_json: bool) -> None:
    if plot is not None:
        from shardcut.ops.evaluation.plot import plot_report

        plot_report(report, plot)
    for w in report.warnings:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    t = Table(
        title=f"{report.model}: {report.samples} samples, {report.tokens:,} tokens; original perplexity "
        f"{report.perplexity:.4g}"
    )
    for col in ("variant", "pruned", "kept", "ppl", "KL mean", "KL p50", "KL p99", "top-1", "worst layer"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for p in report.plans:
        worst = max(range(len(p.residual_error)), key=p.residual_error.__getitem__) if p.residual_error else None
        t.add_row(
            p.name,
            f"{p.ratio:.0%}",
            str(p.kept),
            f"{p.perplexity:.4g}",
            f"{p.kl_mean:.3g}",
            f"{p.kl_p50:.3g}",
            f"{p.kl_p99:.3g}",
            f"{p.top1_agreement:.1%}",
            "-" if worst is None else f"{worst}: {p.residual_error[worst]:.2g}",
        )
    console.print(t)
    layers = Table(title="relative error per layer: residual stream / MoE output")
    layers.add_column("layer", justify="right")
    for p in report.plans:
        layers.add_column(p.name, justify="right")
    for i in range(len(report.plans[0].residual_error) if report.plans else 0):
        cells = []
        for p in report.plans:
            moe = p.moe_error.get(str(i))  # main-stack plan keys are layer numbers
            cells.append(f"{p.residual_error[i]:.3g}" + (f" / {moe:.3g}" if moe is not None else ""))
        layers.add_row(str(i), *cells)
    console.print(layers)
    for path, what in ((out, "report"), (plot, "picture")):
        if path is not None:
            console.print(f"[green]wrote[/] {what} {path}", highlight=False)
