"""Command: calibrate (REAP statistics, one decoder layer at a time)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from shardcut_cli.common import console, err_console, fail, handle_errors, human_bytes
from shardcut_cli.options import check_int, check_size


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate_cmd)


class _Display:
    """Renders CalibEvents: live bars on a terminal, one line per finished layer otherwise."""

    def __init__(self, live: bool):
        self.live = live
        self.bar: Progress | None = None
        self.overall = self.layer = None
        self.started = time.perf_counter()
        self.layer_started = self.started
        self.last = None

    def __enter__(self) -> _Display:
        if self.live:
            self.bar = Progress(
                TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[memory]}"), TimeElapsedColumn(),
                TimeRemainingColumn(), console=err_console, transient=True,
            )
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def print(self, text: str) -> None:
        (self.bar.console if self.bar else err_console).print(text, highlight=False, soft_wrap=True)

    def __call__(self, event) -> None:
        if event.kind == "info":
            self.print(event.message)
            return
        name = "embeddings" if event.layer < 0 else f"layer {event.layer}" + (f" (MoE {event.key})" if event.key else "")
        if event.kind == "layer_start":
            self.layer_started = time.perf_counter()
            if self.bar is not None:
                if self.overall is None:
                    self.overall = self.bar.add_task("overall", total=event.steps, completed=event.step, rate="",
                                                     memory="")
                if self.layer is not None:
                    self.bar.remove_task(self.layer)
                self.layer = self.bar.add_task(name, total=event.layer_tokens, rate="", memory="")
        elif event.kind == "batch" and self.bar is not None and self.layer is not None:
            fields = {"rate": f"{event.tokens_per_s:,.0f} tok/s", "memory": human_bytes(event.memory)}
            self.bar.update(self.layer, completed=event.tokens, **fields)
            self.bar.update(self.overall, completed=event.step + event.tokens / max(1, event.layer_tokens), **fields)
            self.last = fields
        elif event.kind == "layer_done":
            seconds = time.perf_counter() - self.layer_started
            if self.bar is not None:
                self.bar.update(self.overall, completed=event.step)
            else:
                self.print(f"[{event.step}/{event.steps}] {name} done in {seconds:.1f} s, "
                           f"memory {human_bytes(event.memory)}")


@handle_errors
def calibrate_cmd(
    model: str = typer.Argument(..., help="Checkpoint folder or Hub repo id (org/name[@revision])."),
    data: str = typer.Option(..., "--data", help="Calibration data: FILE.txt, FILE.jsonl (text, messages or "
                             "input_ids), a dataset folder, org/name[subset](split); mix with commas, "
                             "e.g. code.jsonl:700,chat.jsonl:300."),
    out: Path = typer.Option(..., "-o", "--out", help="Score file to write (shardcut-scores/1, safetensors)."),
    samples: int | None = typer.Option(None, "--samples", help="Samples in all (default: every record; "
                                       "per-source :N counts take precedence)."),
    max_length: int = typer.Option(2048, "--max-length", help="Keep the first L tokens of each sample."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cuda, cuda:N or cpu."),
    dtype: str | None = typer.Option(None, "--dtype", help="bfloat16 (default on GPU) or float32 (default on CPU)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last finished layer."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample selection."),
    max_memory: str | None = typer.Option(None, "--max-memory", help="RAM for activations, e.g. 64GB "
                                          "(default: half the available memory); beyond it they spill to disk."),
    shard: str | None = typer.Option(None, "--shard", help="i/N: compute the i-th of N disjoint sample shards "
                                     "(combine the files with `shardcut scores merge`)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the checkpoint's own "
                                           "modeling code (off by default)."),
    batch_tokens: int | None = typer.Option(None, "--batch-tokens", help="Token budget of one batch "
                                            "(default 16384 on GPU, 4096 on CPU)."),
    work_dir: Path | None = typer.Option(None, "--work-dir", help="Resume state and spilled activations "
                                         "(default: OUT.calib next to the output)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary at the end."),
) -> None:
    """Compute REAP saliency statistics of a MoE checkpoint, one decoder layer at a time."""
    from shardcut.calibration.runner import calibrate

    check_int("--samples", samples)
    check_int("--max-length", max_length)
    check_int("--seed", seed, low=0)
    check_int("--batch-tokens", batch_tokens)
    check_size("--max-memory", max_memory)
    if work_dir is not None and work_dir.exists() and not work_dir.is_dir():
        fail(f"{escape(str(work_dir))}: --work-dir exists and is not a folder")
    live = err_console.is_terminal and not as_json
    try:
        with _Display(live) as display:
            scores = calibrate(model, data, out, samples=samples, max_length=max_length, device=device, dtype=dtype,
                               seed=seed, resume=resume, max_memory=max_memory, shard=shard,
                               trust_remote_code=trust_remote_code, progress=display, batch_tokens=batch_tokens,
                               work_dir=work_dir)
    except KeyboardInterrupt:
        err_console.print("interrupted: rerun with --resume to continue from the last finished layer")
        raise typer.Exit(130) from None
    meta = scores.metadata
    if as_json:
        typer.echo(json.dumps({"out": str(out), "layers": scores.layers, "num_experts": scores.num_experts,
                               "samples": int(meta["samples"]), "tokens": int(meta["tokens"]), "metadata": meta},
                              indent=2))
        return
    console.print(f"[green]wrote[/] {out}: {len(scores.layers)} MoE layers x {scores.num_experts} experts, "
                  f"{int(meta['tokens']):,} tokens from {meta['samples']} samples; "
                  f"see it with `shardcut scores show {out}`", highlight=False, soft_wrap=True)
