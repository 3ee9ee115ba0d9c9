"""`CalibrateOptions`: every setting of a calibration run, declared once.

`shardcut.calibrate(...)` takes them as keywords (or one `options=` object), `Calibrator` reads
them, `shardcut calibrate` builds one from its flags, and the resume fingerprint is taken from
the resolved values. Errors name the field (`shard`, `batch_tokens`), not a CLI flag (the CLI
maps fields to its flags). Torch-free, so the CLI builds options without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardcut.format.errors import ShardcutError

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_LENGTH = 2048
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}
DEFAULT_PAIR_CHUNK = 16384  # (token, expert) pairs per experts call: bounds the f_j(x) buffer


def _opt(flag: str | None, default: Any, help: str = "") -> Any:
    """A field with its command-line flag and help (None: no flag), declared once for the CLI."""
    return field(default=default, metadata={"flag": flag, "help": help})


@dataclass(frozen=True, kw_only=True)
class CalibrateOptions:
    """How one calibration run reads its data and computes (MODEL, DATA and OUT are its inputs).

    samples: samples in all (None: every record; per-source `:N` counts take precedence).
    max_length: tokens kept per sample (with `sequences="pack"`: per packed sequence).
    sequences: "truncate" (one sequence per sample) or "pack" (end to end, as the REAP reference;
        checked with the data, `data.SEQUENCE_MODES`).
    seed: seed of the sample selection.
    device: "auto" (CUDA when present), "cuda", "cuda:N", "cpu" or a `torch.device`.
    dtype: compute dtype, "bfloat16" or "float32" (None: bfloat16 on CUDA, float32 on the CPU).
    batch_tokens: token budget of one batch (None: `DEFAULT_BATCH_TOKENS` of the device).
    max_memory: bytes (or "64GB") of RAM for activations; beyond it they spill to disk
        (None: half the available memory).
    resume: continue an interrupted run with the same data and settings.
    checkpoint_every: save RAM activations every k layers (None: as often as costs <= 10% of
        the compute; 0: never, a resume replays every finished layer).
    work_dir: resume state and spilled activations (None: OUT.calib next to the output).
    shard: "i/N" or (i, N): the i-th of N disjoint sample shards (1-based).
    trust_remote_code: allow the checkpoint's own modelling code.
    overwrite: replace an existing score file OUT.
    prefetch: read layer i+1's tensors on a thread while layer i runs, on CUDA and on the CPU
        (measured with a simulated 25 MB/s disk: 85% of the read hidden, README); costs one
        layer's stored bytes of RAM. False reads each layer when its turn comes.
    pair_chunk: (token, expert) pairs per experts call; bounds the f_j(x) buffer.
    """

    samples: int | None = _opt(
        "--samples", None, "Samples in all (default: every record; per-source :N counts take precedence)."
    )
    max_length: int = _opt(
        "--max-length",
        DEFAULT_MAX_LENGTH,
        "Keep the first L tokens of each sample (with --pack: the length of each packed sequence).",
    )
    sequences: str = _opt(None, "truncate")  # the CLI's --pack sets "pack"
    seed: int = _opt("--seed", 0, "Seed of the sample selection.")
    device: str | torch.device = _opt("--device", "auto", "auto (CUDA when present), cuda, cuda:N or cpu.")
    dtype: str | torch.dtype | None = _opt("--dtype", None, "bfloat16 (default on GPU) or float32 (default on CPU).")
    batch_tokens: int | None = _opt(
        "--batch-tokens", None, "Token budget of one batch (default 16384 on GPU, 4096 on CPU)."
    )
    max_memory: int | str | None = _opt(
        "--max-memory",
        None,
        "RAM for activations, e.g. 64GB (default: half the available memory); beyond it they spill to disk.",
    )
    resume: bool = _opt(
        "--resume",
        False,
        "Continue an interrupted run (same data and settings; --max-memory may differ) from its last saved layer.",
    )
    checkpoint_every: int | None = _opt(
        "--checkpoint-every",
        None,
        "Save activations held in RAM every N layers, so --resume recomputes at most N "
        "(default: as often as costs <= 10% of the compute; 0: never).",
    )
    work_dir: Path | None = _opt(
        "--work-dir",
        None,
        "Resume state and spilled activations (default: OUT.calib next to the output): a new or empty "
        "folder, or one shardcut made; shardcut removes only its own files.",
    )
    shard: str | tuple[int, int] | None = _opt(
        "--shard",
        None,
        "i/N: compute the i-th of N disjoint sample shards (combine the files with `shardcut scores merge`).",
    )
    trust_remote_code: bool = _opt(
        "--trust-remote-code", False, "Allow the checkpoint's own modeling code (off by default)."
    )
    overwrite: bool = _opt("--overwrite", False, "Replace an existing score file OUT.")
    prefetch: bool = _opt(
        "--prefetch/--no-prefetch",
        True,
        "Read layer i+1 while layer i runs, on CUDA and on the CPU (costs one layer's bytes of RAM).",
    )
    pair_chunk: int = _opt(None, DEFAULT_PAIR_CHUNK)  # library only: it changes the float sums' order

    def __post_init__(self) -> None:
        if self.work_dir is not None and not isinstance(self.work_dir, Path):
            object.__setattr__(self, "work_dir", Path(self.work_dir))
        for name in ("batch_tokens", "pair_chunk"):  # samples and max_length: checked with the data
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ShardcutError(f"{name} must be a positive integer (got {value!r})")
        if self.checkpoint_every is not None and self.checkpoint_every < 0:
            raise ShardcutError(f"checkpoint_every must be >= 0 layers (got {self.checkpoint_every})")
        parse_shard(self.shard)

    @classmethod
    def from_settings(cls, options: CalibrateOptions | None = None, **settings: Any) -> CalibrateOptions:
        """`options` (or the defaults) with `settings` (field=value) replacing fields; an unknown
        name is a one-line error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ShardcutError(f"unknown calibration option {unknown[0]!r} (known: {', '.join(sorted(known))})")
        base = {f.name: getattr(options, f.name) for f in fields(cls)} if options is not None else {}
        return cls(**{**base, **settings})


FLAGS = {f.name: f.metadata["flag"].partition("/")[0] for f in fields(CalibrateOptions) if f.metadata["flag"]}


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """`"2/4"` -> (2, 4): the second of four disjoint sample shards (1-based)."""
    if shard is None:
        return None
    if isinstance(shard, str):
        head, sep, tail = shard.partition("/")
        if not (sep and head.strip().isdigit() and tail.strip().isdigit()):
            raise ShardcutError(f"shard must look like i/N, e.g. 1/2 (got {shard!r})")
        shard = (int(head), int(tail))
    i, n = shard
    if not 1 <= i <= n:
        raise ShardcutError(f"shard {i}/{n}: the shard index runs from 1 to {n}")
    return i, n
