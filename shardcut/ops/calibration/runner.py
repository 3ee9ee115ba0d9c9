"""`calibrate()`: REAP statistics of a MoE checkpoint of any size, one decoder layer at a time.

Steps: read and tokenise the data; build the model on the meta device; compute every sample's
embeddings; then for each decoder layer read its tensors from the shards, run it on every batch
(recording, in MoE layers, the router's real decisions and the routed experts' outputs), and
free it. After each layer the accumulators and the position are saved in a work folder that
shardcut marks as its own (shardcut/ops/calibration/resume.py), with the activations at a checkpoint
interval, so `resume=True` continues after a crash, recomputing at most the layers since the last
checkpoint, with identical results. The output is locked against a second run, refused when it
is an input or exists (unless `overwrite`), and written durably before the work folder goes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from shardcut.format.checkpoint import open_checkpoint
from shardcut.format.durable import check_output
from shardcut.format.errors import OutputError, ShardcutError
from shardcut.format.fingerprint import data_sketch
from shardcut.format.hub import resolve_model
from shardcut.moe.model import describe
from shardcut.ops.calibration.data import CalibData, load_data
from shardcut.ops.calibration.distributed import Distributed
from shardcut.ops.calibration.observe import (
    DEFAULT_PAIR_CHUNK,
    ExpertObserver,
    calibration_notes,
    check_supported,
    find_experts,
)
from shardcut.ops.calibration.resume import (
    Lock,
    RunState,
    check_work_dir,
    checkpoint_due,
    fingerprint_of,
    state_dir_for,
)
from shardcut.ops.calibration.store import DEFAULT_RAM_FRACTION, ActivationStore, available_memory, check_space
from shardcut.ops.calibration.stream import (
    LayerLoader,
    TensorReader,
    capture_call,
    current_memory,
    make_skeleton,
    release_free_memory,
    run_layer,
)
from shardcut.plans.scores import GATE_APPLIED, Scores, provenance

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DEFAULT_MAX_LENGTH = 2048
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}


@dataclass
class CalibEvent:
    """What `progress` callbacks receive.

    kind: "info" (a log line in `message`), "layer_start", "batch", "layer_done" (state saved:
    interrupting here loses nothing) or "done". Steps count the embedding pass as step 0 and
    decoder layer i as step i + 1; `key` is the plan key of a MoE layer (None for dense layers).
    """

    kind: str
    message: str = ""
    step: int = 0
    steps: int = 0
    layer: int = -1
    key: str | None = None
    batch: int = 0
    batches: int = 0
    tokens: int = 0
    layer_tokens: int = 0
    tokens_per_s: float = 0.0
    memory: int = 0


@dataclass
class Batch:
    """Samples run together: store rows `[start, start + rows)`, samples back to back."""

    start: int
    samples: list[int]
    lengths: list[int]

    @property
    def rows(self) -> int:
        return sum(self.lengths)

    @property
    def width(self) -> int:
        return max(self.lengths)


def make_batches(lengths: list[int], batch_tokens: int) -> list[Batch]:
    """Longest samples first, greedily packed so that samples x longest length <= batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[Batch] = []
    row = 0
    for i in order:
        b = batches[-1] if batches else None
        if b is None or (len(b.samples) + 1) * b.width > batch_tokens:
            b = Batch(row, [], [])
            batches.append(b)
        b.samples.append(i)
        b.lengths.append(lengths[i])
        row += lengths[i]
    return batches


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """`"2/4"` -> (2, 4): the second of four disjoint sample shards (1-based)."""
    if shard is None:
        return None
    if isinstance(shard, str):
        head, sep, tail = shard.partition("/")
        if not (sep and head.strip().isdigit() and tail.strip().isdigit()):
            raise ShardcutError(f"--shard must look like i/N, e.g. 1/2 (got {shard!r})")
        shard = (int(head), int(tail))
    i, n = shard
    if not 1 <= i <= n:
        raise ShardcutError(f"--shard {i}/{n}: the shard index runs from 1 to {n}")
    return i, n


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ShardcutError(f"unknown device {device!r} (use auto, cuda, cuda:N or cpu)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ShardcutError("--device cuda asked for, but torch sees no CUDA device")
    if dev.type not in ("cuda", "cpu"):
        raise ShardcutError(f"device {device!r} is not supported (use auto, cuda or cpu)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ShardcutError(f"unknown dtype {dtype!r} (use bfloat16 or float32)")
    return DTYPES[dtype]


def _revision_of(model: str, path: Path) -> str | None:
    if "@" in model and not Path(model).exists():
        return model.rpartition("@")[2]
    parts = path.resolve().parts
    if "snapshots" in parts and parts.index("snapshots") + 1 < len(parts):
        return parts[parts.index("snapshots") + 1]
    return None


def _now() -> str:
    """UTC now, or SOURCE_DATE_EPOCH when set (reproducible files, as reproducible builds do)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch.isdigit() else datetime.now(timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _data_paths(spec: str) -> list[Path]:
    """The local files and folders a data spec reads (inputs an output must not overwrite)."""
    from shardcut.ops.calibration.data import parse_spec

    try:
        return [Path(s.spec) for s in parse_spec(spec) if Path(s.spec).exists()]
    except ShardcutError:
        return []  # load_data reports a bad spec with its own message


@dataclass
class Calibrator:
    """One calibration run; `calibrate()` is `Calibrator(...).run()`.

    `on_layer(step, calibrator)` (tests, tools) is called after every step with the store
    holding that step's output; `hidden_states(j)` reads sample j's rows from it.
    `checkpoint_every`: persist RAM activations every k steps (None: as often as costs at most
    10% of the compute, see `resume.checkpoint_due`; 0: never, a resume replays).
    """

    model: str
    data: str
    out: Path
    samples: int | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    device: str = "auto"
    dtype: str | torch.dtype | None = None
    seed: int = 0
    resume: bool = False
    max_memory: int | str | None = None
    shard: str | tuple[int, int] | None = None
    trust_remote_code: bool = False
    batch_tokens: int | None = None
    work_dir: Path | None = None
    progress: Callable[[CalibEvent], None] | None = None
    on_layer: Callable[[int, Calibrator], None] | None = None
    pair_chunk: int = DEFAULT_PAIR_CHUNK
    sequences: str = "truncate"  # or "pack" (see shardcut.ops.calibration.data)
    prefetch: bool | None = None  # read layer i+1 while layer i runs (None: on CUDA only)
    overwrite: bool = False
    checkpoint_every: int | None = None

    # -- setup -------------------------------------------------------------------------------

    def _emit(self, event: CalibEvent) -> None:
        if self.progress is not None:
            self.progress(event)

    def _info(self, message: str) -> None:
        if self.dist.rank == 0:
            self._emit(CalibEvent("info", message))

    def _prepare(self) -> None:
        self.out = Path(self.out)
        if not self.out.parent.is_dir():
            raise OutputError("the output's folder does not exist", self.out.parent)
        if self.checkpoint_every is not None and self.checkpoint_every < 0:
            raise ShardcutError(f"the checkpoint interval must be >= 0 layers (got {self.checkpoint_every})")
        self.model_dir = resolve_model(self.model)
        self.ckpt = open_checkpoint(self.model_dir)
        # before any work: never write over an input, never over an existing score file unasked
        inputs = [
            *(s.path for s in self.ckpt.shards),
            self.model_dir / "config.json",
            *_data_paths(self.data),
            self.model_dir,
        ]  # files first: the message names the very file
        check_output(self.out, inputs, overwrite=self.overwrite, what="score file")
        self.work_path = Path(self.work_dir) if self.work_dir else state_dir_for(self.out)
        check_work_dir(self.work_path, [*inputs, self.out])
        self.revision = _revision_of(str(self.model), self.model_dir)
        self.info = describe(self.ckpt)
        check_supported(self.info, self.model_dir / "config.json")
        TensorReader(self.ckpt)  # refuses quantization schemes it cannot read, before any data is loaded
        self.torch_device = resolve_device(self.device)
        self.dist = Distributed.from_env(self.torch_device)
        if self.dist.world > 1:
            self.torch_device = self.dist.device or self.torch_device
        self.torch_dtype = resolve_dtype(self.dtype, self.torch_device)
        self.shard_of = parse_shard(self.shard)
        self.budget_tokens = self.batch_tokens or DEFAULT_BATCH_TOKENS[self.torch_device.type]
        if self.budget_tokens < 1:
            raise ShardcutError(f"the batch token budget must be positive (got {self.budget_tokens})")
        vocab = self.info.text_config.get("vocab_size", self.info.config.get("vocab_size"))
        if not isinstance(vocab, int):
            raise ShardcutError("config has no integer vocab_size", self.model_dir / "config.json")
        self.all_data: CalibData = load_data(
            self.data,
            self.model_dir,
            samples=self.samples,
            max_length=self.max_length,
            seed=self.seed,
            vocab_size=vocab,
            trust_remote_code=self.trust_remote_code,
            sequences=self.sequences,
        )
        picked = self.all_data.samples
        if self.shard_of:
            i, n = self.shard_of
            picked = picked[i - 1 :: n]
            if not picked:
                raise ShardcutError(f"shard {i}/{n} holds no samples ({len(self.all_data.samples)} in all)")
        self.shard_samples, self.shard_tokens = len(picked), int(sum(len(s) for s in picked))
        self.local = picked[self.dist.rank :: self.dist.world]
        self.lengths = [len(s) for s in self.local]
        self.batches = make_batches(self.lengths, self.budget_tokens)
        self.rows = sum(self.lengths)
        self.sample_rows: dict[int, tuple[int, int]] = {}
        for b in self.batches:
            row = b.start
            for j, n in zip(b.samples, b.lengths, strict=True):
                self.sample_rows[j] = (row, n)
                row += n

        self.skeleton = make_skeleton(self.ckpt, self.info, self.torch_dtype, self.trust_remote_code)
        self.loader = LayerLoader(self.skeleton, self.ckpt, self.info, self.torch_device)
        n = self.skeleton.num_layers
        self.keys = {
            layer.index: layer.key
            for layer in self.info.layers  # the text stack's (not MTP, talker, vision)
            if not layer.mtp and layer.stack is self.info.arch.stacks[0] and layer.index < n
        }
        if not self.keys:
            raise ShardcutError("the model's forward reaches no MoE layer", self.model_dir / "config.json")
        self.steps = n + 1
        self.hidden_size = self.skeleton.hidden_size

    def _metadata(self) -> dict[str, str]:
        from shardcut import __version__

        meta = {
            "model": str(self.model),
            "architecture": self.info.arch.name,
            "model_type": str(self.info.config.get("model_type")),
            "num_experts": str(self.info.num_experts),
            "top_k": str(self.info.top_k),
            "data": self.data,
            "samples": str(self.shard_samples),
            "tokens": str(self.shard_tokens),
            "max_length": str(self.max_length),
            "seed": str(self.seed),
            "dtype": str(self.torch_dtype).removeprefix("torch."),
            "shardcut_version": __version__,
            "created": self.created,
            **provenance(self.ckpt, gate=GATE_APPLIED),
            "sequences": self.all_data.sequences,
            "data_fingerprint": self.all_data.fingerprint(),
        }
        if self.revision:
            meta["revision"] = self.revision
        if self.shard_of:
            meta["shard"] = f"{self.shard_of[0]}/{self.shard_of[1]}"
        meta.update(calibration_notes(self.info))
        meta["data_sketch"] = data_sketch(self.all_data.samples)  # so `shardcut eval` can spot calibration text
        return meta

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> Scores:
        """Calibrate and write the score file; returns the scores (on every rank)."""
        self._prepare()
        lock = Lock(self.out.with_name(f".{self.out.name}.shardcut-lock"), self.out) if self.dist.rank == 0 else None
        try:
            state = RunState(self.work_path, self.dist)
            state.open()
            try:
                return self._run(state)
            finally:
                state.close()
        finally:
            if lock is not None:
                lock.release()

    def _run(self, state: RunState) -> Scores:
        start = state.begin(fingerprint_of(self), self.resume, self._info)
        keys = [self.keys[i] for i in sorted(self.keys)]
        scores = state.load_scores() if start > 0 else None
        if scores is None:
            start = 0
            scores = Scores.zeros(keys, self.info.num_experts)
        self.created = (state.created_at() if start > 0 else None) or _now()
        scores.metadata = self._metadata()
        self.scores = scores

        nbytes = self.rows * self.hidden_size * torch.empty((), dtype=self.torch_dtype).element_size()
        first, resume_file = state.activations_file(nbytes) if start > 0 else (0, None)
        self.store = ActivationStore(
            self.rows, self.hidden_size, self.torch_dtype, self._budget(), state.rank_dir, resume_file=resume_file
        )
        every = self._checkpoint_policy(state, nbytes)
        self._info(
            f"data: {self.all_data.tokens} tokens in {len(self.all_data.samples)} samples "
            f"({'; '.join(self.all_data.notes)}); max length {self.max_length}"
        )
        if self.shard_of or self.dist.world > 1:
            self._info(
                f"this {'shard' if self.shard_of else 'run'}: {self.shard_samples} samples, "
                f"{self.shard_tokens} tokens" + (f", {self.dist.world} ranks" if self.dist.world > 1 else "")
            )
        self._info(
            f"{self.store.describe()}; device {self.torch_device}, dtype "
            f"{str(self.torch_dtype).removeprefix('torch.')}, {len(self.batches)} batches of <= "
            f"{self.budget_tokens} tokens"
        )
        if start > 0:
            how = " from the activations saved there"
            if resume_file is None:
                how = f" (recomputing the {start} finished steps: no activations were saved)"
            elif first < start:
                how = f" (recomputing {start - first} finished steps from the activations saved at step {first})"
            self._info(f"resuming at step {start} of {self.steps}{how}")
        if first > 0:
            self.loader.buffers_to_device()  # rotary frequencies & co; the embedding is not needed any more
        activations = state.activations
        since_s, since_steps, write_s = 0.0, 0, None
        overlap = self.prefetch if self.prefetch is not None else self.torch_device.type == "cuda"
        prefetch = ThreadPoolExecutor(1) if overlap else None
        try:
            pending = None
            for step in range(first, self.steps):
                record = step >= start
                t0 = time.perf_counter()
                pending = self._step(step, record, pending, prefetch)
                since_s += time.perf_counter() - t0
                since_steps += 1
                if record:
                    if self.store.mode == "disk":  # the spill file is durable after every step
                        activations = {"step": step + 1, "name": self.store.durable_name()}
                    elif step + 1 < self.steps and self.dist.all_true(
                        checkpoint_due(since_s, write_s, every, since_steps)
                    ):
                        t1 = time.perf_counter()
                        name = f"hidden.s{step + 1:05d}.bin"
                        self.store.checkpoint(state.rank_dir / name)
                        write_s, since_s, since_steps = time.perf_counter() - t1, 0.0, 0
                        activations = {"step": step + 1, "name": name}
                    state.save(step + 1, scores, activations, self.created, in_use=self.store.in_use())
                if self.on_layer is not None:
                    self.on_layer(step, self)
                if record:
                    self._emit(
                        CalibEvent(
                            "layer_done",
                            step=step + 1,
                            steps=self.steps,
                            layer=step - 1,
                            key=self.keys.get(step - 1),
                            memory=current_memory(self.torch_device),
                        )
                    )
        finally:
            if prefetch is not None:
                prefetch.shutdown(wait=True, cancel_futures=True)
        self.store.close()
        state.finish(scores, self.out)
        self._emit(CalibEvent("done", message=str(self.out), step=self.steps, steps=self.steps))
        return scores

    def _checkpoint_policy(self, state: RunState, nbytes: int) -> int | None:
        """The checkpoint interval of RAM activations, after a free-space check (a new checkpoint
        is written before the old one goes, so two must fit)."""
        if self.store.mode == "disk" or self.checkpoint_every == 0:
            return self.checkpoint_every
        try:
            check_space(state.rank_dir, 2 * nbytes, "activation checkpoints")
        except OutputError as exc:
            if self.checkpoint_every is not None:
                raise
            self._info(f"{exc}: no activation checkpoints, a --resume will recompute every finished layer")
            return 0
        return self.checkpoint_every

    def _budget(self) -> int:
        if self.max_memory is None:
            return int(available_memory() * DEFAULT_RAM_FRACTION)
        from shardcut.rewrite.writer import parse_size

        return int(parse_size(self.max_memory)) // max(1, self.dist.local_world)

    def hidden_states(self, sample: int) -> torch.Tensor:
        """Sample `sample`'s (local index) rows of the last finished step's output."""
        start, n = self.sample_rows[sample]
        return self.store.read(start, start + n).clone()

    def _step(self, step: int, record: bool, pending, prefetch):
        """Run step `step` on every batch; returns the prefetch of the next layer's tensors."""
        layer_index = step - 1
        key = self.keys.get(layer_index)
        self._emit(
            CalibEvent(
                "layer_start",
                step=step,
                steps=self.steps,
                layer=layer_index,
                key=key,
                batches=len(self.batches),
                layer_tokens=self.rows,
            )
        )
        t0 = time.perf_counter()
        if step == 0:
            self.loader.load_outside()
            layer = observer = None
        else:
            raw = pending.result() if pending is not None else self.loader.read_layer(layer_index)
            layer = self.loader.load_layer(layer_index, raw)
            observer = None
            if key is not None:
                experts = find_experts(layer, self.info.arch.calibration_of(self.info.config.get("model_type")))
                if experts is None:
                    raise ShardcutError(f"layer {key}: no routed-experts module found in {type(layer).__name__}")
                if record:
                    _zero_row(self.scores, key)
                observer = ExpertObserver(experts, self.scores, key, self.info.top_k, self.pair_chunk)
                observer.record = record
        next_layer = step  # the decoder layer of step + 1
        pending = None
        if prefetch is not None and next_layer < self.steps - 1:
            pending = prefetch.submit(self.loader.read_layer, next_layer)
        done = 0
        with torch.inference_mode():
            for b_idx, batch in enumerate(self.batches):
                self._run_batch(step, layer, observer, batch)
                done += batch.rows
                dt = max(time.perf_counter() - t0, 1e-9)
                self._emit(
                    CalibEvent(
                        "batch",
                        step=step,
                        steps=self.steps,
                        layer=layer_index,
                        key=key,
                        batch=b_idx + 1,
                        batches=len(self.batches),
                        tokens=done,
                        layer_tokens=self.rows,
                        tokens_per_s=done / dt,
                        memory=current_memory(self.torch_device),
                    )
                )
        if step == 0:
            self.loader.free_outside_params()
        elif layer is not None:
            self.loader.free(layer)
        release_free_memory()
        if observer is not None and key is not None and record:
            self.dist.reduce_row(self.scores, key)
        self.store.commit()
        return pending

    def _run_batch(self, step: int, layer, observer, batch: Batch) -> None:
        dev = self.torch_device
        B, T = len(batch.samples), batch.width
        lengths = torch.tensor(batch.lengths, device=dev)
        mask = torch.arange(T, device=dev)[None, :] < lengths[:, None]  # right padding
        attention = None if bool(mask.all()) else mask.long()
        if step == 0:
            ids = torch.zeros((B, T), dtype=torch.long, device=dev)
            ids[mask] = torch.from_numpy(np.concatenate([self.local[j] for j in batch.samples])).to(dev)
            call = capture_call(self.skeleton, 0, input_ids=ids, attention_mask=attention)
            out = call.hidden
        else:
            flat = self.store.read(batch.start, batch.start + batch.rows).to(dev)
            hidden = flat.new_zeros((B, T, flat.shape[-1]))
            hidden[mask] = flat
            call = capture_call(self.skeleton, step - 1, inputs_embeds=hidden, attention_mask=attention)
            if observer is not None:
                observer.valid = mask.reshape(-1)
                with observer:
                    out = run_layer(layer, hidden, call)
            else:
                out = run_layer(layer, hidden, call)
        self.store.write(batch.start, batch.start + batch.rows, out[mask].to("cpu"))


def _zero_row(scores: Scores, key: str) -> None:
    r = scores.row(key)
    for name in ("count", "gate_sum", "norm_sum", "reap_sum", "act_max"):
        getattr(scores, name)[r] = 0.0
    scores.tokens[r] = 0.0


def calibrate(
    model: str | Path,
    data: str,
    out: str | Path,
    *,
    samples: int | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    device: str = "auto",
    dtype: str | None = None,
    seed: int = 0,
    resume: bool = False,
    max_memory: int | str | None = None,
    shard: str | tuple[int, int] | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[CalibEvent], None] | None = None,
    batch_tokens: int | None = None,
    work_dir: str | Path | None = None,
    sequences: str = "truncate",
    overwrite: bool = False,
    checkpoint_every: int | None = None,
) -> Scores:
    """Compute the `shardcut-scores/1` statistics of MODEL on the calibration DATA and write OUT.

    Streams one decoder layer at a time from the shards (never the whole model in memory),
    records the router's real top-k decisions and gates and the routed experts' outputs, and
    saves its position after every layer (`resume=True` continues an interrupted run, recomputing
    at most the layers since the last activation checkpoint, `checkpoint_every`).
    OUT must not be an input; an existing OUT is refused unless `overwrite=True`. `work_dir`
    (default OUT.calib) must be new, empty, or one shardcut made: only shardcut's files are removed.
    Under `torchrun` the samples are split across ranks and only rank 0 writes; `shard="i/N"`
    computes the i-th of N disjoint sample shards, whose files `scores merge` adds up exactly.
    `sequences="pack"` packs samples into `max_length` sequences as the REAP reference does.

    Example:
        >>> scores = calibrate("Qwen/Qwen3-30B-A3B", "code.jsonl:700,chat.jsonl:300", "scores.safetensors",
        ...                    max_length=4096)
        >>> scores.count.sum(axis=1) == scores.tokens * 8
    """
    return Calibrator(
        str(model),
        data,
        Path(out),
        samples=samples,
        max_length=max_length,
        device=device,
        dtype=dtype,
        seed=seed,
        resume=resume,
        max_memory=max_memory,
        shard=shard,
        trust_remote_code=trust_remote_code,
        batch_tokens=batch_tokens,
        work_dir=Path(work_dir) if work_dir else None,
        progress=progress,
        sequences=sequences,
        overwrite=overwrite,
        checkpoint_every=checkpoint_every,
    ).run()
