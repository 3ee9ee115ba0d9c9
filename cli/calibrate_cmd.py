"""Command: calibrate (REAP statistics, one decoder layer at a time)."""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from shardcut.ops.calibration.options import FLAGS, CalibrateOptions
from shardcut_cli.common import console, err_console, fail, handle_errors, human_bytes, safe
from shardcut_cli.options import check_int, check_size

DATA_HELP = (
    "Calibration data, SOURCE[{MAPPING}][:N] mixed with commas. SOURCE: FILE.txt (lines or paragraphs), "
    "FILE.jsonl / .json / .csv / .parquet, a save_to_disk folder (FOLDER(split) for a DatasetDict), a parquet "
    "folder, or a Hub dataset org/name\\[subset](split) (offline from the local cache with HF_HUB_OFFLINE=1). "
    "Rows need text, messages or input_ids, or the columns of a REAP reference dataset (evol-codealpaca-v1, "
    "xlam-function-calling-60k, SWE-smith-trajectories, tulu-3-sft-mixture, Magicoder-Evol-Instruct-110K, "
    "CodeFeedback-Filtered-Instruction, c4, mmlu, WritingPrompts_curated, tulu-3-sft-personas-math, "
    "Mixture-of-Thoughts), formatted exactly as the reference formats them (by Hub id, {recipe=NAME} for a "
    "local copy, or recognised by its columns). Other columns: MAPPING is KEY=COLUMN;... with keys text, "
    "messages, prompt, response, system, tools (tools go to the chat template), or recipe=FILE.json holding "
    "those keys. Example: theblackcat102/evol-codealpaca-v1:700,Salesforce/xlam-function-calling-60k:330,"
    "qa.jsonl{prompt=question;response=answer}:300."
)


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate_cmd)


class _Display:
    """Renders CalibEvents: live bars on a terminal, one line per finished layer otherwise."""

    def __init__(self, live: bool):
        self.live = live
        self.bar: Progress | None = None
        self.overall: TaskID | None = None
        self.layer: TaskID | None = None
        self.started = time.perf_counter()
        self.layer_started = self.started
        self.last: dict[str, str] | None = None

    def __enter__(self) -> _Display:
        if self.live:
            self.bar = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[memory]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=err_console,
                transient=True,
            )
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def print(self, text: str) -> None:
        (self.bar.console if self.bar else err_console).print(safe(text), highlight=False, soft_wrap=True)

    def __call__(self, event) -> None:
        if event.kind == "info":
            self.print(event.message)
            return
        name = (
            "embeddings" if event.layer < 0 else f"layer {event.layer}" + (f" (MoE {event.key})" if event.key else "")
        )
        if event.kind == "layer_start":
            self.layer_started = time.perf_counter()
            if self.bar is not None:
                if self.overall is None:
                    self.overall = self.bar.add_task(
                        "overall", total=event.steps, completed=event.step, rate="", memory=""
                    )
                if self.layer is not None:
                    self.bar.remove_task(self.layer)
                self.layer = self.bar.add_task(name, total=event.layer_tokens, rate="", memory="")
        elif event.kind == "batch" and self.bar is not None and self.layer is not None and self.overall is not None:
            fields = {"rate": f"{event.tokens_per_s:,.0f} tok/s", "memory": human_bytes(event.memory)}
            self.bar.update(self.layer, completed=event.tokens, **fields)
            self.bar.update(self.overall, completed=event.step + event.tokens / max(1, event.layer_tokens), **fields)
            self.last = fields
        elif event.kind == "layer_done":
            seconds = time.perf_counter() - self.layer_started
            if self.bar is not None and self.overall is not None:
                self.bar.update(self.overall, completed=event.step)
            else:
                self.print(
                    f"[{event.step}/{event.steps}] {name} done in {seconds:.1f} s, memory {human_bytes(event.memory)}"
                )


_FIELDS = {f.name: f for f in fields(CalibrateOptions)}


def _opt(name: str) -> Any:
    """The typer option of CalibrateOptions field `name` (its flag, default and help live there)."""
    f = _FIELDS[name]
    return typer.Option(f.default, f.metadata["flag"], help=f.metadata["help"])


def _as_flags(message: str) -> str:
    field, sep, rest = message.partition(" ")
    return f"{FLAGS[field]} {rest}" if sep and field in FLAGS else message


@handle_errors
def calibrate_cmd(
    model: str = typer.Argument(..., help="Checkpoint folder or Hub repo id (org/name[@revision])."),
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    out: Path = typer.Option(..., "-o", "--out", help="Score file to write (shardcut-scores/1, safetensors)."),
    samples: int | None = _opt("samples"),
    max_length: int = _opt("max_length"),
    pack: bool = typer.Option(
        False,
        "--pack",
        help="Pack samples end to end into sequences of --max-length tokens, "
        "as the REAP reference does (a sample that does not fit is cut; :N counts sequences). "
        "Default: one sequence per sample, truncated. The score metadata records which.",
    ),
    device: str = _opt("device"),
    dtype: str | None = _opt("dtype"),
    resume: bool = _opt("resume"),
    seed: int = _opt("seed"),
    max_memory: str | None = _opt("max_memory"),
    shard: str | None = _opt("shard"),
    trust_remote_code: bool = _opt("trust_remote_code"),
    batch_tokens: int | None = _opt("batch_tokens"),
    work_dir: Path | None = _opt("work_dir"),
    overwrite: bool = _opt("overwrite"),
    checkpoint_every: int | None = _opt("checkpoint_every"),
    prefetch: bool = _opt("prefetch"),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary at the end."),
) -> None:
    """Compute REAP saliency statistics of a MoE checkpoint, one decoder layer at a time.

    Multimodal wrappers (Kimi-K2.5, Qwen3-VL-MoE, Qwen3.5-MoE, GLM-4.5V,
    Llama-4, Gemma-4, ERNIE-4.5-VL, Qwen3-Omni) calibrate their text stack on
    text only, read from the wrapper's own shards and keyed as plan and prune
    key the wrapper. Where image tokens route through the same experts, the
    statistics do not see them: the score file says so (metadata `text_only`).
    Stacks text never reaches are listed as `unscored_stacks`: `plan` keeps
    Qwen3-Omni's talker (its own expert count) whole; ERNIE-4.5-VL's vision
    experts share the text count and need `plan --mtp-policy`.

    Llama-4's router scales the expert input: the statistics take the expert
    on the unscaled token, f_j(x) (as the REAP reference does), with gate the
    sigmoid score the layer applies. LongCat-Flash's zero-computation
    (identity) experts run in the layer but are not scored (they have no
    weights and are never pruned).
    """
    from shardcut.format.errors import ShardcutError
    from shardcut.ops.calibration.runner import calibrate

    check_int("--samples", samples)
    check_int("--max-length", max_length)
    check_int("--seed", seed, low=0)
    check_int("--batch-tokens", batch_tokens)
    check_size("--max-memory", max_memory)
    if work_dir is not None and work_dir.exists() and not work_dir.is_dir():
        fail(f"{safe(str(work_dir))}: --work-dir exists and is not a folder")
    try:
        options = CalibrateOptions(
            samples=samples,
            max_length=max_length,
            sequences="pack" if pack else "truncate",
            seed=seed,
            device=device,
            dtype=dtype,
            batch_tokens=batch_tokens,
            max_memory=max_memory,
            resume=resume,
            checkpoint_every=checkpoint_every,
            work_dir=work_dir,
            shard=shard,
            trust_remote_code=trust_remote_code,
            overwrite=overwrite,
            prefetch=prefetch,
        )
    except ShardcutError as exc:  # the library names its fields; the user typed flags
        fail(_as_flags(str(exc)))
    live = err_console.is_terminal and not as_json
    try:
        with _Display(live) as display:
            scores = calibrate(model, data, out, options, progress=display)
    except KeyboardInterrupt:
        err_console.print("interrupted: rerun with --resume to continue from the last finished layer")
        raise typer.Exit(130) from None
    meta = scores.metadata
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "out": str(out),
                    "layers": scores.layers,
                    "num_experts": scores.num_experts,
                    "samples": int(meta["samples"]),
                    "tokens": int(meta["tokens"]),
                    "metadata": meta,
                },
                indent=2,
            )
        )
        return
    console.print(
        f"[green]wrote[/] {safe(out)}: {len(scores.layers)} MoE layers x {scores.num_experts} experts, "
        f"{int(meta['tokens']):,} tokens from {safe(meta['samples'])} samples; "
        f"see it with `shardcut scores show {safe(out)}`",
        highlight=False,
        soft_wrap=True,
    )
