"""Commands: scores show / merge / import, and plan."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from shardcut.format.text import span
from shardcut.plans.options import CRITERION_HELP, PlanOptions
from shardcut_cli.common import console, handle_errors, human_bytes, safe
from shardcut_cli.options import check_int
from shardcut_cli.plan_options import takes_plan_options

scores_app = typer.Typer(help="Read, merge and import score files (shardcut-scores/1).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(scores_app, name="scores")
    app.command("plan")(plan_cmd)


@scores_app.command("show")
@handle_errors
def show_cmd(
    scores: Path = typer.Argument(..., help="A shardcut-scores/1 file."),
    criterion: str | None = typer.Option(None, "--criterion", "-c", help=CRITERION_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of the random criterion."),
    top: int = typer.Option(3, "--top", help="How many lowest and highest experts to list per layer."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Per-layer summary of a score file: tokens, never-routed experts, lowest and highest experts."""
    from shardcut.plans.scores import Scores
    from shardcut.plans.select import summarize_scores

    check_int("--top", top)
    check_int("--seed", seed, low=0)
    s = Scores.load(scores)
    summary = summarize_scores(s, criterion, seed, top)
    if as_json:
        typer.echo(json.dumps({"file": str(scores), **summary}, indent=2))
        return
    meta = summary["metadata"]
    multi = "layer_experts" in summary  # stacks with their own expert counts
    widths = " or ".join(str(n) for n in sorted(set(s.experts_per_row), reverse=True))
    t = Table(title=safe(f"{scores}: {len(s.layers)} layers x {widths} experts, criterion {summary['criterion']}"))
    for col in ("layer", *(("experts",) if multi else ()), "tokens", "never routed", f"lowest {top}", f"highest {top}"):
        t.add_column(col, justify="right" if col in ("tokens", "experts") else "left")
    for row in summary["layers"]:
        never = row["never_routed"]
        t.add_row(
            safe(row["layer"]),
            *((str(row["experts"]),) if multi else ()),
            "-" if row["tokens"] is None else f"{row['tokens']:.0f}",
            "-" if never is None else (f"{len(never)}: {_ids(never)}" if never else "0"),
            _pairs(row["lowest"]),
            _pairs(row["highest"]),
        )
    console.print(t)
    console.print(safe(f"{summary['criterion']} = {summary['criterion_definition']}"))
    if not s.has_sums:
        console.print(safe(f"imported values only ({', '.join(s.values)}): no sums, so no other criteria and no merge"))
    shown = {
        k: v
        for k, v in meta.items()
        if k
        in (
            "model",
            "revision",
            "model_fingerprint",
            "architecture",
            "data",
            "samples",
            "sequences",
            "gate_convention",
            "caveats",
            "imported_from",
            "merged_from",
            "created",
        )
    }
    for k, v in shown.items():
        console.print(safe(f"{k}: {v}"), highlight=False)  # metadata: anyone's text, escapes included


@scores_app.command("merge")
@handle_errors
def merge_cmd(
    inputs: list[str] = typer.Argument(..., help="Score files, each optionally PATH:WEIGHT (e.g. code.safetensors:2)."),
    out: Path = typer.Option(..., "-o", "--out", help="The merged score file to write (never one of the inputs)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    force: bool = typer.Option(
        False,
        "--force",
        help="Merge files whose gate sums follow different conventions "
        "(the applied gates vs the REAP reference's softmax of the logits); recorded as a "
        "caveat in the merged file.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable summary."),
) -> None:
    """Merge score files of one model: sums add (times each file's weight), maxima take the max.

    The files must be of one model (by recorded fingerprint and commit, else by name) and follow
    one gate convention unless --force; every input's caveats are kept.
    """
    from shardcut.plans.score_merge import merge_score_files, parse_weighted

    parsed = [parse_weighted(a) for a in inputs]
    merged = merge_score_files(parsed, out, overwrite=overwrite, force=force)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "out": str(out),
                    "inputs": [{"file": str(p), "weight": w} for p, w in parsed],
                    "layers": merged.layers,
                    "num_experts": merged.num_experts,
                    **({"layer_experts": merged.layer_experts} if merged.layer_experts else {}),
                    "tokens": merged.tokens.tolist(),
                    "sha256": merged.sha256(),
                },
                indent=2,
            )
        )
        return
    console.print(
        f"[green]wrote[/] {safe(out)}: {len(parsed)} files merged ("
        + ", ".join(f"{safe(p)} x{w:g}" for p, w in parsed)
        + f"), {len(merged.layers)} layers, "
        f"{merged.num_experts} experts"
    )


@scores_app.command("import")
@handle_errors
def import_cmd(
    file: Path = typer.Argument(
        ...,
        help="A torch file ({layer: tensor}, {layer: {stat: tensor}}, wrapped, stacked "
        "[L, E], REAP observer), a folder of REAP block_NNN_metrics.pt checkpoints, a JSON "
        "report (saliency, sums, llm-compressor, keep-list / pruning metadata).",
    ),
    model: str = typer.Option(..., "--model", "-m", help="The model the file is for (folder or Hub id)."),
    out: Path = typer.Option(..., "-o", "--out", help="The shardcut-scores/1 file to write (not inside MODEL)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    fmt: str = typer.Option(
        "auto", "--format", help="auto, torch (= reap-observer), saliency-json, llm-compressor or keep-list."
    ),
    criterion: str | None = typer.Option(
        None, "--criterion", "-c", help="Criterion of a saliency report's values when the file does not say."
    ),
    layer_offset: int | None = typer.Option(
        None,
        "--layer-offset",
        help="Add this to every integer layer key "
        "(keys counted from 0 at the first MoE layer). Without it, keys 0..n-1 "
        "that are not the model's MoE layers are read as positions in its MoE "
        "layer list, and the mapping is printed.",
    ),
    layout: str | None = typer.Option(
        None, "--layout", help="layers-experts or experts-layers, for a stacked square tensor that reads both ways."
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable summary."),
) -> None:
    """Convert a published score file into shardcut-scores/1, checked against MODEL.

    REAP observer files are read with torch.load(weights_only=True) only; a file that needs
    arbitrary unpickling is refused.
    """
    from shardcut.plans.score_import import import_scores

    scores, report = import_scores(
        file,
        model,
        fmt=fmt,
        criterion=criterion,
        layer_offset=layer_offset,
        layout=layout,
        out=out,
        overwrite=overwrite,
    )
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "out": str(out),
                    "source": str(file),
                    "format": report.format,
                    "layers": report.layers,
                    "num_experts": report.num_experts,
                    "has_sums": report.has_sums,
                    "criterion": report.criterion,
                    "notes": report.notes,
                    "sha256": scores.sha256(),
                },
                indent=2,
            )
        )
        return
    console.print(
        f"[green]wrote[/] {safe(out)}: {report.format} with {len(report.layers)} layers x "
        f"{report.num_experts} experts" + ("" if report.has_sums else safe(f", {report.criterion!r} values only"))
    )
    for note in report.notes:
        console.print(f"note: {safe(note)}", highlight=False, soft_wrap=True)


@handle_errors
@takes_plan_options()
def plan_cmd(
    model: str = typer.Argument(..., help="Checkpoint folder or Hub repo id (only headers are read)."),
    scores: Path = typer.Option(..., "--scores", "-s", help="A shardcut-scores/1 file."),
    out: Path | None = typer.Option(
        None,
        "-o",
        "--out",
        help="Plan file to write (without it: print only; never inside MODEL or over the score file).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the plan file if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable plan and report."),
    *,
    options: PlanOptions,
) -> None:
    """Choose the experts to keep from a score file; print the per-layer table and size estimate."""
    from shardcut.ops.planning import make_plan

    plan, report = make_plan(model, scores, options.check(), out=out, overwrite=overwrite)
    if as_json:
        typer.echo(
            json.dumps({"plan": plan.to_json(), "report": report.to_json(), "out": str(out) if out else None}, indent=2)
        )
        return
    print_plan_report(report)
    if out is not None:
        console.print(f"[green]wrote[/] {safe(out)}")


def print_plan_report(report) -> None:
    """The per-layer plan table (also printed by `prune --scores`)."""
    counts = (
        ", ".join(f"{name} {g['num_experts']} -> {g['kept']}" for name, g in report.by_config.items())
        or f"{report.num_experts} -> {report.kept}"
    )
    t = Table(title=safe(f"{report.architecture}: {counts} experts per layer (criterion {report.criterion})"))
    for col in ("layer", "kept", "pruned", "lowest kept", "highest pruned", "protected", "note"):
        t.add_column(col, justify="right" if col in ("kept", "pruned") else "left")
    for row in report.rows:
        note = []
        if row.source.startswith("kept whole"):
            note.append("kept whole (no scores)")
        elif row.source != "scores":
            note.append("no scores (mtp policy)")
        if row.protection_overrode:
            note.append("protection overrode order")
        if row.group_balance_overrode:
            note.append("group balance overrode order")
        t.add_row(
            safe(row.layer),
            str(row.kept),
            str(row.pruned),
            _num(row.lowest_kept),
            _num(row.highest_pruned),
            _ids(row.protected) if row.protected else "",
            safe("; ".join(note)),
        )
    console.print(t)
    console.print(f"rounding: {safe(report.rule)}", highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"note: {safe(note)}", highlight=False, soft_wrap=True)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {safe(warning)}", highlight=False, soft_wrap=True)
    saved = report.input_bytes - report.output_bytes
    console.print(
        f"size estimate: {human_bytes(report.input_bytes)} -> {human_bytes(report.output_bytes)} "
        f"({report.output_bytes} bytes, {saved / max(1, report.input_bytes):.0%} smaller)",
        soft_wrap=True,
    )


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _pairs(pairs: list[list]) -> str:
    return ", ".join(f"{i} ({v:.3g})" for i, v in pairs)


def _ids(ids: list[int]) -> str:
    return span(ids, limit=12, head=10, tail=0, sep=" ", count=True)
