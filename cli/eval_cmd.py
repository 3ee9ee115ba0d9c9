"""Command: eval (what a prune costs: loss, KL, agreement, per-layer error, before writing anything)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from shardcut_cli.common import console, err_console, fail, handle_errors


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)


def _ratios(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        return [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        fail(f"--ratio must be comma-separated fractions, e.g. 0.25,0.5 (got {text!r})")
    return []


@handle_errors
def eval_cmd(
    model: str = typer.Argument(
        ...,
        help="The checkpoint to prune (folder or Hub repo id); with --source, the "
        "pruned checkpoint (a `shardcut prune` output).",
    ),
    data: str = typer.Option(..., "--data", help="Held-out text, as calibrate's --data (not the calibration data)."),
    plan: list[Path] | None = typer.Option(None, "--plan", help="A shardcut-plan/1 file (repeatable)."),
    scores: Path | None = typer.Option(
        None,
        "--scores",
        help="Score file: plans for --ratio come from it, and the "
        "data is checked against the calibration data it records.",
    ),
    ratio: str | None = typer.Option(
        None, "--ratio", help="With --scores: fractions to prune, e.g. 0.25,0.5,0.75 (one pass for all)."
    ),
    source: str | None = typer.Option(
        None, "--source", help="MODEL is a pruned checkpoint: stream it next to this source and compare."
    ),
    criterion: str = typer.Option("reap", "--criterion", help="With --ratio: the saliency criterion."),
    protect_super_experts: bool = typer.Option(
        False, "--protect-super-experts", help="With --ratio: keep super experts."
    ),
    protect: list[str] | None = typer.Option(None, "--protect", help="With --ratio: always keep LAYER:ID[,ID...]."),
    mtp_policy: str | None = typer.Option(
        None,
        "--mtp-policy",
        help="With --ratio: reuse-last, scores-of:N or same-ids-as:N for MoE layers without scores (MTP).",
    ),
    samples: int | None = typer.Option(None, "--samples", help="Samples in all (default: every record)."),
    max_length: int = typer.Option(2048, "--max-length", help="Keep the first L tokens of each sample."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cuda, cuda:N or cpu."),
    dtype: str | None = typer.Option(None, "--dtype", help="bfloat16 (default on GPU) or float32 (default on CPU)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample selection."),
    max_memory: str | None = typer.Option(
        None,
        "--max-memory",
        help="RAM for all streams' activations, e.g. 64GB "
        "(default: half the available memory); beyond it they spill to disk.",
    ),
    batch_tokens: int | None = typer.Option(None, "--batch-tokens", help="Token budget of one batch."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the checkpoint's own code."),
    work_dir: Path | None = typer.Option(
        None, "--work-dir", help="Where spilled activations go (default: a temporary folder, removed at the end)."
    ),
    out: Path | None = typer.Option(None, "-o", "--out", help="Also write the report as JSON (for `push --eval`)."),
    plot: Path | None = typer.Option(None, "--plot", help="Write a PNG: quality against ratio, per-layer error."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Measure what pruning costs on held-out text, streaming the model one layer at a time."""
    from shardcut.ops.evaluation.runner import evaluate
    from shardcut.plans.select import parse_protect
    from shardcut_cli.calibrate_cmd import _Display

    ratios = _ratios(ratio)
    if ratios and scores is None:
        fail("--ratio needs --scores")
    if source is None and not plan and not ratios:
        fail("give --plan, or --scores with --ratio, or a pruned checkpoint with --source")
    if source is not None and (plan or ratios):
        fail("with --source, MODEL is the pruned checkpoint: give no --plan or --ratio")
    src, pruned = (source, [model]) if source is not None else (model, [])
    live = err_console.is_terminal and not as_json
    with _Display(live) as display:
        report = evaluate(
            src,
            data,
            plans=plan or [],
            scores=scores,
            ratios=ratios,
            criterion=criterion,
            protect_super_experts=protect_super_experts,
            protect=parse_protect(protect),
            mtp_policy=mtp_policy,
            pruned=pruned,
            samples=samples,
            max_length=max_length,
            device=device,
            dtype=dtype,
            seed=seed,
            max_memory=max_memory,
            batch_tokens=batch_tokens,
            trust_remote_code=trust_remote_code,
            work_dir=work_dir,
            progress=display if not as_json else None,
        )
    if out is not None:
        report.save(out)
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
