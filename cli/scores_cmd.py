"""Commands: scores show / merge / import, and plan."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from shardcut_cli.common import console, fail, handle_errors, human_bytes
from shardcut_cli.options import check_int, check_mtp_policy, check_ratio

CRITERION_HELP = ("Saliency criterion: reap (mean g·‖f‖ over routed tokens), ean (Σ‖f‖), ean_mean (mean ‖f‖), "
                  "frequency (routed tokens), weighted_frequency (Σ g), random (seeded), or an imported one. "
                  "Default: reap, or the only criterion an imported values-only file holds.")
MTP_HELP = ("How to prune MoE layers the scores do not cover (MTP layers): reuse-last (rank with the last scored "
            "layer's scores), scores-of:N (with layer N's), same-ids-as:N (keep exactly layer N's ids).")

scores_app = typer.Typer(help="Read, merge and import score files (shardcut-scores/1).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(scores_app, name="scores")
    app.command("plan")(plan_cmd)


SUPER_HELP = ("Keep super experts whatever their score. Defined as in the REAP reference: experts whose act_max "
              "exceeds max(99.5th percentile of act_max over all scored layers, global max / 10), in the first 75% "
              "of the scored MoE layers (by layer key).")


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
    from shardcut.scores import Scores
    from shardcut.select import summarize_scores

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
    t = Table(title=f"{scores}: {len(s.layers)} layers x {widths} experts, criterion {summary['criterion']}")
    for col in ("layer", *(("experts",) if multi else ()), "tokens", "never routed", f"lowest {top}", f"highest {top}"):
        t.add_column(col, justify="right" if col in ("tokens", "experts") else "left")
    for row in summary["layers"]:
        never = row["never_routed"]
        t.add_row(
            row["layer"],
            *((str(row["experts"]),) if multi else ()),
            "-" if row["tokens"] is None else f"{row['tokens']:.0f}",
            "-" if never is None else (f"{len(never)}: {_ids(never)}" if never else "0"),
            _pairs(row["lowest"]), _pairs(row["highest"]),
        )
    console.print(t)
    console.print(f"{summary['criterion']} = {summary['criterion_definition']}")
    if not s.has_sums:
        console.print(f"imported values only ({', '.join(s.values)}): no sums, so no other criteria and no merge")
    shown = {k: v for k, v in meta.items() if k in ("model", "revision", "architecture", "data", "samples",
                                                     "imported_from", "merged_from", "created")}
    for k, v in shown.items():
        console.print(f"{k}: {v}", highlight=False, markup=False)


@scores_app.command("merge")
@handle_errors
def merge_cmd(
    inputs: list[str] = typer.Argument(..., help="Score files, each optionally PATH:WEIGHT (e.g. code.safetensors:2)."),
    out: Path = typer.Option(..., "-o", "--out", help="The merged score file to write."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable summary."),
) -> None:
    """Merge score files of one model: sums add (times each file's weight), maxima take the max."""
    from shardcut.scores import Scores, merge_scores, parse_weighted

    parsed = [parse_weighted(a) for a in inputs]
    _refuse_overwrite(out, [p for p, _ in parsed])
    merged = merge_scores([(Scores.load(p), w) for p, w in parsed], [str(p) for p, _ in parsed])
    merged.save(out)
    if as_json:
        typer.echo(json.dumps({"out": str(out), "inputs": [{"file": str(p), "weight": w} for p, w in parsed],
                               "layers": merged.layers, "num_experts": merged.num_experts,
                               **({"layer_experts": merged.layer_experts} if merged.layer_experts else {}),
                               "tokens": merged.tokens.tolist(), "sha256": merged.sha256()}, indent=2))
        return
    console.print(f"[green]wrote[/] {out}: {len(parsed)} files merged ("
                  + ", ".join(f"{p} x{w:g}" for p, w in parsed) + f"), {len(merged.layers)} layers, "
                  f"{merged.num_experts} experts")


@scores_app.command("import")
@handle_errors
def import_cmd(
    file: Path = typer.Argument(..., help="REAP observer .pt, JSON saliency report, or keep-list JSON."),
    model: str = typer.Option(..., "--model", "-m", help="The model the file is for (folder or Hub id)."),
    out: Path = typer.Option(..., "-o", "--out", help="The shardcut-scores/1 file to write."),
    fmt: str = typer.Option("auto", "--format", help="auto, reap-observer, saliency-json or keep-list."),
    criterion: str | None = typer.Option(None, "--criterion", "-c",
                                         help="Criterion of a saliency report's values when the file does not say."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable summary."),
) -> None:
    """Convert a published score file into shardcut-scores/1, checked against MODEL.

    REAP observer files are read with torch.load(weights_only=True) only; a file that needs
    arbitrary unpickling is refused.
    """
    from shardcut.score_import import import_scores

    _refuse_overwrite(out, [file])
    scores, report = import_scores(file, model, fmt=fmt, criterion=criterion)
    scores.save(out)
    if as_json:
        typer.echo(json.dumps({"out": str(out), "source": str(file), "format": report.format,
                               "layers": report.layers, "num_experts": report.num_experts,
                               "has_sums": report.has_sums, "criterion": report.criterion,
                               "notes": report.notes, "sha256": scores.sha256()}, indent=2))
        return
    console.print(f"[green]wrote[/] {out}: {report.format} with {len(report.layers)} layers x "
                  f"{report.num_experts} experts" + ("" if report.has_sums else f", {report.criterion!r} values only"))
    for note in report.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)


@handle_errors
def plan_cmd(
    model: str = typer.Argument(..., help="Checkpoint folder or Hub repo id (only headers are read)."),
    scores: Path = typer.Option(..., "--scores", "-s", help="A shardcut-scores/1 file."),
    ratio: float | None = typer.Option(None, "--ratio", help="Fraction of routed experts removed, in (0, 1); "
                                       "pruned per layer = floor(E x ratio), with E each stack's own count where "
                                       "stacks differ (Qwen3-Omni's talker)."),
    experts: int | None = typer.Option(None, "--experts", help="Experts kept per layer. A model with several expert "
                                       "counts keeps this many in every stack; refused, naming the stack, where it "
                                       "does not fit one (not below its count, or below its top-k): use --ratio."),
    criterion: str | None = typer.Option(None, "--criterion", "-c", help=CRITERION_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of the random criterion."),
    protect_super_experts: bool = typer.Option(False, "--protect-super-experts", help=SUPER_HELP),
    protect: list[str] | None = typer.Option(None, "--protect", help="Always keep these experts: LAYER:ID[,ID...] "
                                             "(repeatable), e.g. --protect 3:0,17."),
    mtp_policy: str | None = typer.Option(None, "--mtp-policy", help=MTP_HELP),
    out: Path | None = typer.Option(None, "-o", "--out", help="Plan file to write (without it: print only)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable plan and report."),
) -> None:
    """Choose the experts to keep from a score file; print the per-layer table and size estimate."""
    from shardcut.select import make_plan, parse_protect

    check_ratio("--ratio", ratio)
    check_int("--experts", experts)
    check_int("--seed", seed, low=0)
    check_mtp_policy("--mtp-policy", mtp_policy)
    if (ratio is None) == (experts is None):
        fail("give exactly one of --ratio or --experts")
    if out is not None and out.resolve() == scores.resolve():
        fail(f"{out}: output is the score file itself")
    plan, report = make_plan(model, scores, ratio=ratio, experts=experts, criterion=criterion, seed=seed,
                             protect_super_experts=protect_super_experts, protect=parse_protect(protect),
                             mtp_policy=mtp_policy)
    if out is not None:
        tmp = out.with_name(f".{out.name}.tmp")
        try:  # whole or not at all
            plan.save(tmp)
            tmp.replace(out)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            fail(f"{out}: cannot write the plan ({exc.strerror or exc})")
    if as_json:
        typer.echo(json.dumps({"plan": plan.to_json(), "report": report.to_json(),
                               "out": str(out) if out else None}, indent=2))
        return
    print_plan_report(report)
    if out is not None:
        console.print(f"[green]wrote[/] {out}")


def print_plan_report(report) -> None:
    """The per-layer plan table (also printed by `prune --scores`)."""
    counts = (", ".join(f"{name} {g['num_experts']} -> {g['kept']}" for name, g in report.by_config.items())
              or f"{report.num_experts} -> {report.kept}")
    t = Table(title=f"{report.architecture}: {counts} experts per layer (criterion {report.criterion})")
    for col in ("layer", "kept", "pruned", "lowest kept", "highest pruned", "protected", "note"):
        t.add_column(col, justify="right" if col in ("kept", "pruned") else "left")
    for row in report.rows:
        note = []
        if row.source != "scores":
            note.append("no scores (mtp policy)")
        if row.protection_overrode:
            note.append("protection overrode order")
        if row.group_balance_overrode:
            note.append("group balance overrode order")
        t.add_row(row.layer, str(row.kept), str(row.pruned), _num(row.lowest_kept), _num(row.highest_pruned),
                  _ids(row.protected) if row.protected else "", "; ".join(note))
    console.print(t)
    console.print(f"rounding: {report.rule}", highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    saved = report.input_bytes - report.output_bytes
    console.print(f"size estimate: {human_bytes(report.input_bytes)} -> {human_bytes(report.output_bytes)} "
                  f"({report.output_bytes} bytes, {saved / max(1, report.input_bytes):.0%} smaller)", soft_wrap=True)


def _refuse_overwrite(out: Path, inputs: list[Path]) -> None:
    for p in inputs:
        if p.exists() and out.exists() and out.resolve() == p.resolve():
            fail(f"{out}: output is one of the inputs (inputs are never modified)")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _pairs(pairs: list[list]) -> str:
    return ", ".join(f"{i} ({v:.3g})" for i, v in pairs)


def _ids(ids: list[int]) -> str:
    return " ".join(map(str, ids)) if len(ids) <= 12 else f"{' '.join(map(str, ids[:10]))} … ({len(ids)})"
