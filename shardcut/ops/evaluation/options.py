"""The options of one `shardcut eval` run: one frozen dataclass, shared by `cli/eval_cmd.py` and
`shardcut.evaluate(...)`. Each field's metadata names its CLI flag; library messages name the
field in backticks (`ratios`) and the CLI shows the flag instead (`flag_message`). No torch here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from shardcut.format.errors import ShardcutError
from shardcut.plans.options import PlanOptions

DEFAULT_MAX_LENGTH = 2048


def _opt(flag: str, default: Any, help: str) -> Any:
    return field(default=default, metadata={"flag": flag, "help": help})


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate and how; `evaluate(model, data, options)` or `evaluate(model, data, **fields)`.

    plans: shardcut-plan/1 files or `Plan`s; ratios: one plan per ratio, made from `scores` with
    `plan_options` (a `PlanOptions`: criterion, protect, mtp_policy, ...; declared there once, for
    `shardcut plan` and eval alike; its `ratio` / `experts` stay unset); pruned:
    `shardcut prune` outputs streamed next to MODEL. `out`: where the report goes (for a `shard`,
    the shard's tally, which `merge_tallies` combines); `resume` continues an interrupted run
    from its work folder (`work_dir`, default OUT.eval), recomputing at most the layers since the
    last activation checkpoint (`checkpoint_every`, as in calibration). Each field's metadata
    holds its CLI flag and help.
    """

    plans: tuple = _opt("--plan", (), "A shardcut-plan/1 file (repeatable).")
    scores: str | Path | None = _opt(
        "--scores",
        None,
        "Score file: plans for --ratio come from it, and the data is checked against the calibration data it records.",
    )
    ratios: tuple[float, ...] = _opt(
        "--ratio", (), "With --scores: fractions to prune, e.g. 0.25,0.5,0.75 (one pass for all)."
    )
    plan_options: PlanOptions = _opt(
        "(PlanOptions' flags)",
        PlanOptions(),
        "With `ratios`: how each plan is made (`make_plan`'s options; each ratio sets `ratio`).",
    )
    pruned: tuple = _opt("--source", (), "Pruned checkpoints (`shardcut prune` outputs) streamed next to MODEL.")
    samples: int | None = _opt("--samples", None, "Samples in all (default: every record).")
    max_length: int = _opt("--max-length", DEFAULT_MAX_LENGTH, "Keep the first L tokens of each sample.")
    device: str = _opt("--device", "auto", "auto (CUDA when present), cuda, cuda:N or cpu.")
    dtype: str | None = _opt("--dtype", None, "bfloat16 (default on GPU) or float32 (default on CPU).")
    seed: int = _opt("--seed", 0, "Seed of the sample selection.")
    max_memory: int | str | None = _opt(
        "--max-memory",
        None,
        "RAM for all streams' activations, e.g. 64GB (default: half the available memory); "
        "beyond it they spill to disk.",
    )
    batch_tokens: int | None = _opt(
        "--batch-tokens", None, "Token budget of one batch (default 16384 on GPU, 4096 on CPU)."
    )
    trust_remote_code: bool = _opt("--trust-remote-code", False, "Allow the checkpoint's own modeling code.")
    work_dir: Path | None = _opt(
        "--work-dir",
        None,
        "Resume state and spilled activations (default: OUT.eval next to -o, else a temporary folder): "
        "a new or empty folder, or one shardcut made; shardcut removes only its own files.",
    )
    out: Path | None = _opt(
        "-o", None, "Write the report as JSON (for `push --eval`); with --shard, the shard's tally (for eval-merge)."
    )
    resume: bool = _opt(
        "--resume", False, "Continue an interrupted run with the same -o (or --work-dir) from its last saved layer."
    )
    shard: str | tuple[int, int] | None = _opt(
        "--shard", None, "i/N: evaluate the i-th of N disjoint sample shards (combine them with `shardcut eval-merge`)."
    )
    overwrite: bool = _opt("--overwrite", False, "Replace an existing -o.")
    prefetch: bool = _opt(
        "--prefetch/--no-prefetch",
        True,
        "Read layer i+1 while layer i runs, on CUDA and on the CPU, as calibrate (costs one layer's bytes of RAM).",
    )
    checkpoint_every: int | None = _opt(
        "--checkpoint-every",
        None,
        "Save activations held in RAM every N layers, so --resume recomputes at most N "
        "(default: as often as costs <= 10% of the compute; 0: never).",
    )

    def __post_init__(self) -> None:
        # sequences become tuples (the dataclass is frozen; a caller's list must not change it later)
        for name in ("plans", "ratios", "pruned"):
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        for name in ("work_dir", "out"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))

    def check(self) -> None:
        """Refuse contradictory options (before any file is read)."""
        if not (self.plans or self.ratios or self.pruned):
            raise ShardcutError(
                "nothing to evaluate: give `plans`, `ratios` with `scores`, or pruned checkpoints (`pruned`)"
            )
        if self.ratios and self.scores is None:
            raise ShardcutError("`ratios` need the score file to plan from (`scores`)")
        if self.plan_options.ratio is not None or self.plan_options.experts is not None:
            raise ShardcutError("`plan_options` set ratio or experts: give the fractions as `ratios`")
        for r in self.ratios:
            PlanOptions(ratio=r).check()
        self.plan_options.check(count=False)
        if self.resume and self.out is None and self.work_dir is None:
            raise ShardcutError("`resume` needs the report path (`out`) or the work folder (`work_dir`) to resume from")
        if self.shard is not None and self.out is None:
            raise ShardcutError("a `shard` run writes its tally to `out`: give one")
        if self.checkpoint_every is not None and self.checkpoint_every < 0:
            raise ShardcutError(f"`checkpoint_every` must be >= 0 layers (got {self.checkpoint_every})")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ShardcutError(f"`batch_tokens` must be positive (got {self.batch_tokens})")


FLAGS = {f.name: f.metadata["flag"] for f in (*fields(PlanOptions), *fields(EvalOptions)) if f.name != "plan_options"}
FLAGS["ratio"] = FLAGS["ratios"]  # a plan option's message about one of the `ratios`
# plan options with no eval flag: a count (eval's `ratios` give it) or a name eval uses for its own (`seed`)
NOT_EVAL_FLAGS = ("ratio", "experts", "seed")


def split_fields(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keywords of `evaluate(...)` as (EvalOptions fields, PlanOptions fields): a plan option
    (`criterion="ean"`) may be given directly, as `make_plan` takes it."""
    plan_names = {f.name for f in fields(PlanOptions)} - {f.name for f in fields(EvalOptions)} - set(NOT_EVAL_FLAGS)
    return (
        {k: v for k, v in values.items() if k not in plan_names},
        {k: v for k, v in values.items() if k in plan_names},
    )


def flag_message(message: str) -> str:
    """A library message with each backticked option name replaced by its CLI flag."""
    return re.sub(r"`(\w+)`", lambda m: FLAGS.get(m.group(1), m.group(0)), message)
