"""Commands: inspect, prune, verify, demo."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from shardcut.format.text import span
from shardcut.plans.options import PlanOptions
from shardcut_cli.common import byte_progress, console, fail, handle_errors, human_bytes, safe
from shardcut_cli.options import check_size
from shardcut_cli.plan_options import takes_plan_options


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_cmd)
    app.command("prune")(prune_cmd)
    app.command("verify")(verify_cmd)
    app.command("demo")(demo_cmd)


@handle_errors
def inspect_cmd(
    model: str = typer.Argument(..., help="Checkpoint folder or Hub repo id (org/name[@revision])."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Describe a MoE checkpoint: architecture, MoE layers, experts, routing, dtypes, size."""
    from shardcut.ops.summary import inspect_model

    info = inspect_model(model)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    t = Table(title=safe(info["path"]), show_header=False)
    keys = info["moe_layers"]
    routing = info["routing"]
    rows = [
        ("architecture", f"{info['architecture']} (model_type {info['model_type']})"),
        (
            "MoE layers",
            f"{len(keys)}: {_span(keys)}" + (f" (MTP: {', '.join(info['mtp_layers'])})" if info["mtp_layers"] else ""),
        ),
        ("experts per layer", _by_config(info.get("num_experts_by_config")) or str(info["num_experts"])),
        ("top-k", str(info["top_k"])),
        (
            "routing",
            f"{routing['scoring']}"
            + (
                f", grouped n_group={routing['n_group']} topk_group={routing['topk_group']}"
                if routing["grouped"]
                else ""
            )
            + (f", selection bias {routing['selection_bias']}" if routing["selection_bias"] else ""),
        ),
        ("dtypes", ", ".join(f"{k} {human_bytes(v)}" for k, v in info["dtypes"].items())),
        ("quantization", str(info["quantization"] or "none")),
        *((f"  {group} tensors", _group_line(g)) for group, g in info["quantization_groups"].items()),
        ("size", f"{human_bytes(info['total_bytes'])} in {info['shards']} shards, {info['tensors']} tensors"),
        (
            "expert bytes",
            f"{human_bytes(info['expert_bytes'])} ({human_bytes(info['bytes_per_expert'])} per expert per layer)",
        ),
        ("pruning saves", _savings_line(info["bytes_saved_per_expert_removed"])),
    ]
    for k, v in rows:
        t.add_row(safe(k), safe(v))  # model_type, quantization, layer keys: all from the checkpoint
    console.print(t)


@handle_errors
@takes_plan_options(help_prefix="With --scores: ")
def prune_cmd(
    model: str = typer.Argument(..., help="Checkpoint folder or Hub repo id."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (must not exist, or be empty)."),
    plan: Path | None = typer.Option(None, "--plan", help="A shardcut-plan/1 file."),
    scores: Path | None = typer.Option(None, "--scores", help="A score file to plan from (with --ratio or --experts)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be written; write nothing."),
    max_shard_size: str | None = typer.Option(
        None, "--max-shard-size", help="Re-shard, e.g. 5GB (default: keep source shards)."
    ),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip re-reading the output against the source."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted prune into the same OUT."),
    stream: bool = typer.Option(
        False,
        "--stream",
        help="Hub repo: fetch, rewrite and delete one shard at a time "
        "(disk = output + one shard); a rerun continues an interrupted stream.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable summary."),
    *,
    options: PlanOptions,
) -> None:
    """Write a pruned checkpoint: kept tensors byte for byte, experts renumbered, routers sliced."""
    from shardcut.plans.plan import Plan
    from shardcut.rewrite.from_hub import prune_model

    check_size("--max-shard-size", max_shard_size)
    if (plan is None) == (scores is None):
        fail("give exactly one of --plan or --scores")
    options.check(count=scores is not None)  # before any file is read
    if plan is not None:
        the_plan = Plan.load(plan)
    else:
        from shardcut.ops.planning import make_plan
        from shardcut_cli.scores_cmd import print_plan_report

        assert scores is not None  # exactly one of --plan and --scores, checked above
        the_plan, plan_report = make_plan(model, scores, options)
        if not as_json:
            print_plan_report(plan_report)
    with byte_progress("pruning", enabled=not dry_run and not as_json) as progress:
        report = prune_model(
            model,
            out,
            the_plan,
            stream=stream,
            max_shard_size=max_shard_size,
            dry_run=dry_run,
            verify=not no_verify,
            resume=resume,
            progress=progress,
        )
    if as_json:
        body = {k: str(v) if isinstance(v, Path) else v for k, v in vars(report).items()}
        if not body["experts_by_config"]:  # only for several expert counts, as inspect's num_experts_by_config
            del body["experts_by_config"]
        typer.echo(json.dumps(body, indent=2))
        return
    counts = (
        ", ".join(f"{name} {a} -> {b}" for name, (a, b) in report.experts_by_config.items())
        or f"{report.experts_before} -> {report.experts_after}"
    )
    t = Table(title=safe(f"{'dry run: ' if dry_run else ''}{report.architecture}: {counts} experts per layer"))
    t.add_column("layer")
    t.add_column("kept (original ids)")
    for key, ids in report.layers.items():
        t.add_row(safe(key), _ids(ids))
    console.print(t)
    saved = report.input_bytes - report.output_bytes
    console.print(
        f"size {human_bytes(report.input_bytes)} -> {human_bytes(report.output_bytes)} "
        f"({saved / max(1, report.input_bytes):.0%} smaller) in {len(report.shards)} shards; "
        f"tensors: {report.copied} copied, {report.renamed} renumbered, {report.sliced} sliced, "
        f"{report.dropped} dropped"
    )
    if report.config_changes:
        console.print(
            safe("config.json: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in report.config_changes.items()))
        )
    verbs = {"leave": "left out", "prune": "pruned", "rewrite": "rewrote"}
    for side in report.side_files:  # every side file not copied unchanged, and why
        console.print(
            f"{verbs.get(side['action'], side['action'])} {safe(side['path'])}: {safe(side['why'])}", highlight=False
        )
    if dry_run:
        disk = report.disk
        missing = disk["input"] - disk["input_on_disk"]
        console.print(
            f"disk needed: {human_bytes(disk['plain'])} to prune"
            + (f" (output + {human_bytes(missing)} to download into the Hugging Face cache)" if missing else "")
            + f"; {human_bytes(disk['stream'])} with --stream (output + one shard not yet on disk)"
        )
    else:
        console.print(
            f"[green]wrote[/] {safe(report.out)}"
            + (" (verified against the source)" if report.verified else "")
            + (f"; streamed {len(report.downloaded)} shards" if report.stream else "")
        )


@handle_errors
def verify_cmd(
    out: Path = typer.Argument(..., help="A (pruned) checkpoint folder."),
    source: str | None = typer.Option(None, "--source", help="The source checkpoint: also check every byte."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Prove a checkpoint complete and consistent (and, with --source, byte-exact)."""
    from shardcut.ops.verification import verify

    report = verify(out, source=source)
    if as_json:
        typer.echo(json.dumps({**vars(report), "path": str(report.path), "ok": report.ok}, indent=2))
    else:
        for check in report.checks:
            console.print(f"[green]ok[/] {safe(check)}")
        for problem in report.problems:
            console.print(f"[red]FAIL[/] {safe(problem)}")
    if not report.ok:
        raise typer.Exit(1)


@handle_errors
def demo_cmd(
    directory: Path = typer.Argument(Path("shardcut-demo"), help="Where to build the demo model and its pruned copy."),
) -> None:
    """Offline end to end: build a small MoE checkpoint, prune half its experts, verify, compare logits."""
    from shardcut.ops.demo import run_demo

    report = run_demo(directory, log=lambda text: console.print(safe(text)))
    t = Table(title="shardcut demo")
    t.add_column("")
    t.add_column("original")
    t.add_column("pruned")
    t.add_row("experts per layer", str(report["experts_before"]), str(report["experts_after"]))
    t.add_row("size on disk", human_bytes(report["bytes_before"]), human_bytes(report["bytes_after"]))
    t.add_row("checkpoint", safe(report["source"]), safe(report["pruned"]))
    console.print(t)
    q = report["eval"]  # shardcut eval on held-out text
    console.print(
        f"eval on held-out text: perplexity {q.perplexity:.4g}, KL(original || pruned) mean {q.kl_mean:.3g} "
        f"(p99 {q.kl_p99:.3g}), top-1 agreement {q.top1_agreement:.1%}",
        highlight=False,
    )
    console.print(
        f"logits check: max |pruned - masked original| = {report['max_logit_diff']:.2e} "
        f"(masking changed the original by {report['masking_effect']:.2e}) "
        + ("[green]PASS[/]" if report["passed"] else "[red]FAIL[/]")
    )
    if not report["passed"]:
        raise typer.Exit(1)


def _group_line(group: dict) -> str:
    schemes = ", ".join(f"{name} x{n}" for name, n in group["schemes"].items())
    parts = ", ".join(f"{suffix} {'/'.join(c['dtypes'])}" for suffix, c in group["companions"].items())
    return f"{schemes} ({human_bytes(group['bytes'])}; {parts})"


def _savings_line(saved: dict) -> str:
    low, high = saved["per_layer_min"], saved["per_layer_max"]
    per = human_bytes(low) if low == high else f"{human_bytes(low)}-{human_bytes(high)}"
    return f"{human_bytes(saved['total'])} per expert removed from every MoE layer ({per} per layer)"


def _by_config(counts: dict[str, int] | None) -> str:
    """ "8 (thinker_config.text_config), 6 (talker_config.text_config)" for several expert counts."""
    return ", ".join(f"{n} ({name})" for name, n in counts.items()) if counts else ""


def _span(keys: list[str]) -> str:
    return span(keys, limit=8)


def _ids(ids: list[int]) -> str:
    return span(ids, limit=24, head=20, tail=0, sep=" ", count=True)
