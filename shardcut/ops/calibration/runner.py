"""`calibrate()`: REAP statistics of a MoE checkpoint of any size, one decoder layer at a time.

Steps: read and tokenise the data; build the model on the meta device; compute every sample's
embeddings; then for each decoder layer read its tensors from the shards (the next layer's
while this one runs), run it on every batch (recording, in MoE layers, the router's real
decisions and the routed experts' outputs), and free it. After each layer the accumulators and
the position are saved in a work folder that shardcut marks as its own
(shardcut/ops/calibration/resume.py), with the activations at a checkpoint interval, so
`resume=True` continues after a crash, recomputing at most the layers since the last
checkpoint, with identical results. The output is locked against a second run, refused when it
is an input or exists (unless `overwrite`), and written durably before the work folder goes.
Settings are one `CalibrateOptions`; the run's state lives in the private attributes of `Calibrator`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from shardcut.format.checkpoint import open_checkpoint
from shardcut.format.durable import check_output
from shardcut.format.errors import OutputError, ShardcutError
from shardcut.format.fingerprint import data_sketch
from shardcut.format.hub import resolve_model
from shardcut.moe.model import describe
from shardcut.ops.calibration.batches import Batch, make_batches, sample_rows
from shardcut.ops.calibration.data import CalibData, load_data
from shardcut.ops.calibration.device import (
    current_memory,
    peak_memory,
    reset_peak_memory,
    resolve_device,
    resolve_dtype,
    synchronize,
)
from shardcut.ops.calibration.distributed import Distributed
from shardcut.ops.calibration.observe import calibration_notes, check_supported, make_observer
from shardcut.ops.calibration.options import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_LENGTH, CalibrateOptions, parse_shard
from shardcut.ops.calibration.progress import CalibEvent, LayerTimes
from shardcut.ops.calibration.resume import (
    Lock,
    RunState,
    check_work_dir,
    fingerprint_of,
    state_dir_for,
)
from shardcut.ops.calibration.store import (
    DEFAULT_RAM_FRACTION,
    ActivationStore,
    StepCheckpoints,
    available_memory,
    checkpoint_interval,
)
from shardcut.ops.calibration.stream import (
    LayerLoader,
    TensorReader,
    capture_call,
    make_skeleton,
    release_free_memory,
    run_layer,
)
from shardcut.plans.scores import GATE_APPLIED, Scores, provenance

# importable from here as before the split (the eval runner and tools use them)
__all__ = [
    "DEFAULT_BATCH_TOKENS",
    "DEFAULT_MAX_LENGTH",
    "Batch",
    "CalibEvent",
    "CalibrateOptions",
    "Calibrator",
    "LayerTimes",
    "calibrate",
    "make_batches",
    "parse_shard",
    "resolve_device",
    "resolve_dtype",
]


def _revision_of(model: str, path: Path) -> str | None:
    from shardcut.format.cache_paths import snapshot_of, split_revision

    snapshot = snapshot_of(path.resolve())
    return split_revision(model)[1] or (snapshot[1] if snapshot else None)


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


def _timed_read(loader: LayerLoader, i: int) -> tuple[dict[str, torch.Tensor], float]:
    t0 = time.perf_counter()
    raw = loader.read_layer(i)
    return raw, time.perf_counter() - t0


class Calibrator:
    """One calibration run of MODEL on DATA into OUT with `options`; `calibrate()` is
    `Calibrator(...).run()`.

    `progress(event)` receives `CalibEvent`s. `on_layer(step, calibrator)` (tests, tools) is
    called after every step, while `store` holds that step's output: `hidden_states(j)` reads
    sample j's rows, `local` holds the samples this rank computes (token ids), `skeleton` the
    model. Everything else is the run's private state.
    """

    def __init__(
        self,
        model: str | Path,
        data: str,
        out: str | Path,
        options: CalibrateOptions | None = None,
        *,
        progress: Callable[[CalibEvent], None] | None = None,
        on_layer: Callable[[int, Calibrator], None] | None = None,
    ):
        self.model, self.data, self.out = str(model), data, Path(out)
        self.options = options or CalibrateOptions()
        self.progress, self.on_layer = progress, on_layer

    # -- what tools and tests may look at ----------------------------------------------------

    @property
    def local(self) -> list[np.ndarray]:
        """The token ids of the samples this rank computes, in the order `hidden_states` indexes."""
        return self._local

    @property
    def skeleton(self):
        return self._skeleton

    @property
    def store(self) -> ActivationStore:
        return self._store

    def hidden_states(self, sample: int) -> torch.Tensor:
        """Sample `sample`'s (local index) rows of the last finished step's output."""
        start, n = self._sample_rows[sample]
        return self._store.read(start, start + n).clone()

    # -- setup -------------------------------------------------------------------------------

    def _emit(self, event: CalibEvent) -> None:
        if self.progress is not None:
            self.progress(event)

    def _info(self, message: str) -> None:
        if self._dist.rank == 0:
            self._emit(CalibEvent("info", message))

    def _prepare(self) -> None:
        o = self.options
        if not self.out.parent.is_dir():
            raise OutputError("the output's folder does not exist", self.out.parent)
        self._model_dir = resolve_model(self.model)
        self._ckpt = open_checkpoint(self._model_dir)
        # before any work: never write over an input, never over an existing score file unasked
        inputs = [
            *(s.path for s in self._ckpt.shards),
            self._model_dir / "config.json",
            *_data_paths(self.data),
            self._model_dir,
        ]  # files first: the message names the very file
        check_output(self.out, inputs, overwrite=o.overwrite, what="score file")
        self._work_path = o.work_dir or state_dir_for(self.out)
        check_work_dir(self._work_path, [*inputs, self.out])
        self._revision = _revision_of(str(self.model), self._model_dir)
        self._info_model = info = describe(self._ckpt)
        check_supported(info, self._model_dir / "config.json")
        TensorReader(self._ckpt)  # refuses quantization schemes it cannot read, before any data is loaded
        self._device = resolve_device(o.device)
        self._dist = Distributed.from_env(self._device)
        if self._dist.world > 1 and self._dist.device is not None:
            self._device = self._dist.device
        self._dtype = resolve_dtype(o.dtype, self._device)
        self._shard = parse_shard(o.shard)
        self._batch_tokens = o.batch_tokens or DEFAULT_BATCH_TOKENS[self._device.type]
        vocab = info.text_config.get("vocab_size", info.config.get("vocab_size"))
        if not isinstance(vocab, int):
            raise ShardcutError("config has no integer vocab_size", self._model_dir / "config.json")
        self._all_data: CalibData = load_data(
            self.data,
            self._model_dir,
            samples=o.samples,
            max_length=o.max_length,
            seed=o.seed,
            vocab_size=vocab,
            trust_remote_code=o.trust_remote_code,
            sequences=o.sequences,
        )
        picked = self._all_data.samples
        if self._shard:
            i, n = self._shard
            picked = picked[i - 1 :: n]
            if not picked:
                raise ShardcutError(f"shard {i}/{n} holds no samples ({len(self._all_data.samples)} in all)")
        self._shard_samples, self._shard_tokens = len(picked), int(sum(len(s) for s in picked))
        self._local = picked[self._dist.rank :: self._dist.world]
        self._batches = make_batches([len(s) for s in self._local], self._batch_tokens)
        self._rows = sum(len(s) for s in self._local)
        self._sample_rows = sample_rows(self._batches)

        self._skeleton = make_skeleton(self._ckpt, info, self._dtype, o.trust_remote_code)
        self._loader = LayerLoader(self._skeleton, self._ckpt, info, self._device)
        n = self._skeleton.num_layers
        self._keys = {
            layer.index: layer.key
            for layer in info.layers  # the text stack's (not MTP, talker, vision)
            if not layer.mtp and layer.stack is info.arch.stacks[0] and layer.index < n
        }
        if not self._keys:
            raise ShardcutError("the model's forward reaches no MoE layer", self._model_dir / "config.json")
        self._steps = n + 1
        self._calib = info.arch.calibration_of(info.config.get("model_type"))

    def _fingerprint(self) -> dict[str, str]:
        o = self.options
        return fingerprint_of(
            SimpleNamespace(
                ckpt=self._ckpt,
                revision=self._revision,
                all_data=self._all_data,
                data=self.data,
                max_length=o.max_length,
                seed=o.seed,
                torch_dtype=self._dtype,
                shard_of=self._shard,
                dist=self._dist,
                budget_tokens=self._batch_tokens,
                trust_remote_code=o.trust_remote_code,
            )
        )

    def _metadata(self) -> dict[str, str]:
        from shardcut import __version__

        info, o = self._info_model, self.options
        meta = {
            "model": self.model,
            "architecture": info.arch.name,
            "model_type": str(info.config.get("model_type")),
            "num_experts": str(info.num_experts),
            "top_k": str(info.top_k),
            "data": self.data,
            "samples": str(self._shard_samples),
            "tokens": str(self._shard_tokens),
            "max_length": str(o.max_length),
            "seed": str(o.seed),
            "dtype": str(self._dtype).removeprefix("torch."),
            "shardcut_version": __version__,
            "created": self._created,
            **provenance(self._ckpt, gate=GATE_APPLIED),
            "sequences": self._all_data.sequences,
            "data_fingerprint": self._all_data.fingerprint(),
        }
        if self._revision:
            meta["revision"] = self._revision
        if self._shard:
            meta["shard"] = f"{self._shard[0]}/{self._shard[1]}"
        meta.update(calibration_notes(info))
        meta["data_sketch"] = data_sketch(self._all_data.samples)  # so `shardcut eval` can spot calibration text
        return meta

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> Scores:
        """Calibrate and write the score file; returns the scores (on every rank)."""
        self._dist = Distributed()  # rank 0 of 1 until _prepare joins a torchrun group
        self._prepare()
        lock = Lock(self.out.with_name(f".{self.out.name}.shardcut-lock"), self.out) if self._dist.rank == 0 else None
        try:
            state = RunState(self._work_path, self._dist)
            state.open()
            try:
                return self._run(state)
            finally:
                state.close()
        finally:
            if lock is not None:
                lock.release()

    def _run(self, state: RunState) -> Scores:
        o = self.options
        start = state.begin(self._fingerprint(), o.resume, self._info)
        keys = [self._keys[i] for i in sorted(self._keys)]
        scores = state.load_scores() if start > 0 else None
        if scores is None:
            start = 0
            scores = Scores.zeros(keys, self._info_model.num_experts)
        self._created = (state.created_at() if start > 0 else None) or _now()
        scores.metadata = self._metadata()
        self._scores = scores

        hidden = self._skeleton.hidden_size
        nbytes = self._rows * hidden * torch.empty((), dtype=self._dtype).element_size()
        first, resume_file = state.activations_file(nbytes) if start > 0 else (0, None)
        self._store = ActivationStore(
            self._rows, hidden, self._dtype, self._budget(), state.rank_dir, resume_file=resume_file
        )
        every = self._checkpoint_policy(state, nbytes)
        self._log_start(start, first, resume_file)
        if first > 0:
            self._loader.buffers_to_device()  # rotary frequencies & co; the embedding is not needed any more
        checkpoints = StepCheckpoints(self._store, state.rank_dir, every, state.activations)
        prefetch = ThreadPoolExecutor(1, thread_name_prefix="shardcut-prefetch") if o.prefetch else None
        total = LayerTimes()
        try:
            pending = None
            for step in range(first, self._steps):
                record = step >= start
                t0 = time.perf_counter()
                pending, times = self._step(step, record, pending, prefetch)
                checkpoints.computed(time.perf_counter() - t0)
                total.add(times)
                if record:
                    activations = checkpoints.after(step, step + 1 < self._steps, self._dist.all_true)
                    state.save(step + 1, scores, activations, self._created, in_use=self._store.in_use())
                if self.on_layer is not None:
                    self.on_layer(step, self)
                if record:
                    self._emit(
                        CalibEvent(
                            "layer_done",
                            step=step + 1,
                            steps=self._steps,
                            layer=step - 1,
                            key=self._keys.get(step - 1),
                            memory=current_memory(self._device),
                            times=times,
                        )
                    )
        finally:
            if prefetch is not None:
                prefetch.shutdown(wait=True, cancel_futures=True)
        self._store.close()
        state.finish(scores, self.out)
        self._info(f"time: {total.describe()}; peak memory {total.peak_memory / 1e6:,.0f} MB")
        self._emit(CalibEvent("done", message=str(self.out), step=self._steps, steps=self._steps, times=total))
        return scores

    def _log_start(self, start: int, first: int, resume_file: Path | None) -> None:
        data, o = self._all_data, self.options
        self._info(
            f"data: {data.tokens} tokens in {len(data.samples)} samples "
            f"({'; '.join(data.notes)}); max length {o.max_length}"
        )
        if self._shard or self._dist.world > 1:
            self._info(
                f"this {'shard' if self._shard else 'run'}: {self._shard_samples} samples, "
                f"{self._shard_tokens} tokens" + (f", {self._dist.world} ranks" if self._dist.world > 1 else "")
            )
        self._info(
            f"{self._store.describe()}; device {self._device}, dtype "
            f"{str(self._dtype).removeprefix('torch.')}, {len(self._batches)} batches of <= "
            f"{self._batch_tokens} tokens"
        )
        if start > 0:
            how = " from the activations saved there"
            if resume_file is None:
                how = f" (recomputing the {start} finished steps: no activations were saved)"
            elif first < start:
                how = f" (recomputing {start - first} finished steps from the activations saved at step {first})"
            self._info(f"resuming at step {start} of {self._steps}{how}")

    def _checkpoint_policy(self, state: RunState, nbytes: int) -> int | None:
        """The checkpoint interval of RAM activations, after a free-space check (a new checkpoint
        is written before the old one goes, so two must fit)."""
        every = self.options.checkpoint_every
        return checkpoint_interval(every, self._store, state.rank_dir, nbytes, self._info)

    def _budget(self) -> int:
        if self.options.max_memory is None:
            return int(available_memory() * DEFAULT_RAM_FRACTION)
        from shardcut.rewrite.writer import parse_size

        return int(parse_size(self.options.max_memory)) // max(1, self._dist.local_world)

    def _step(
        self, step: int, record: bool, pending: Future | None, prefetch: ThreadPoolExecutor | None
    ) -> tuple[Future | None, LayerTimes]:
        """Run step `step` on every batch; returns the prefetch of the next layer's tensors and
        where the step's time went."""
        layer_index, dev = step - 1, self._device
        key = self._keys.get(layer_index)
        times = LayerTimes()
        self._emit(
            CalibEvent(
                "layer_start",
                step=step,
                steps=self._steps,
                layer=layer_index,
                key=key,
                batches=len(self._batches),
                layer_tokens=self._rows,
            )
        )
        reset_peak_memory(dev)
        t0 = time.perf_counter()
        if step == 0:
            self._loader.load_outside()
            layer = observer = None
        else:
            raw, times.read_s = pending.result() if pending is not None else _timed_read(self._loader, layer_index)
            t1 = time.perf_counter()
            times.wait_s = t1 - t0
            layer = self._loader.load_layer(layer_index, raw)
            del raw
            observer = None
            if key is not None:
                observer = make_observer(
                    layer, self._calib, self._scores, key, self._info_model.top_k, self.options.pair_chunk
                )
                if record:
                    _zero_row(self._scores, key)
                observer.record = record
        synchronize(dev)
        t2 = time.perf_counter()
        times.load_s = t2 - t0 - times.wait_s
        next_layer = step  # the decoder layer of step + 1
        pending = None
        if prefetch is not None and next_layer < self._steps - 1:
            pending = prefetch.submit(_timed_read, self._loader, next_layer)
        done = 0
        with torch.inference_mode():
            for b_idx, batch in enumerate(self._batches):
                self._run_batch(step, layer, observer, batch)
                done += batch.rows
                dt = max(time.perf_counter() - t2, 1e-9)
                self._emit(
                    CalibEvent(
                        "batch",
                        step=step,
                        steps=self._steps,
                        layer=layer_index,
                        key=key,
                        batch=b_idx + 1,
                        batches=len(self._batches),
                        tokens=done,
                        layer_tokens=self._rows,
                        tokens_per_s=done / dt,
                        memory=current_memory(dev),
                    )
                )
        synchronize(dev)
        times.stats_s = observer.stats_s if observer is not None else 0.0
        times.forward_s = time.perf_counter() - t2 - times.stats_s
        times.peak_memory = peak_memory(dev)
        if step == 0:
            self._loader.free_outside_params()
        elif layer is not None:
            self._loader.free(layer)
        release_free_memory()
        if observer is not None and key is not None and record:
            self._dist.reduce_row(self._scores, key)
        self._store.commit()
        return pending, times

    def _run_batch(self, step: int, layer, observer, batch: Batch) -> None:
        dev = self._device
        B, T = len(batch.samples), batch.width
        lengths = torch.tensor(batch.lengths, device=dev)
        mask = torch.arange(T, device=dev)[None, :] < lengths[:, None]  # right padding
        attention = None if bool(mask.all()) else mask.long()
        if step == 0:
            ids = torch.zeros((B, T), dtype=torch.long, device=dev)
            ids[mask] = torch.from_numpy(np.concatenate([self._local[j] for j in batch.samples])).to(dev)
            call = capture_call(self._skeleton, 0, input_ids=ids, attention_mask=attention)
            out = call.hidden
        else:
            flat = self._store.read(batch.start, batch.start + batch.rows).to(dev)
            hidden = flat.new_zeros((B, T, flat.shape[-1]))
            hidden[mask] = flat
            call = capture_call(self._skeleton, step - 1, inputs_embeds=hidden, attention_mask=attention)
            if observer is not None:
                observer.valid = mask.reshape(-1)
                with observer:
                    out = run_layer(layer, hidden, call)
            else:
                out = run_layer(layer, hidden, call)
        self._store.write(batch.start, batch.start + batch.rows, out[mask].to("cpu"))


def _zero_row(scores: Scores, key: str) -> None:
    r = scores.row(key)
    for name in ("count", "gate_sum", "norm_sum", "reap_sum", "act_max"):
        getattr(scores, name)[r] = 0.0
    scores.tokens[r] = 0.0


def calibrate(
    model: str | Path,
    data: str,
    out: str | Path,
    options: CalibrateOptions | None = None,
    *,
    progress: Callable[[CalibEvent], None] | None = None,
    **settings: Any,
) -> Scores:
    """Compute the `shardcut-scores/1` statistics of MODEL on the calibration DATA and write OUT.

    Settings are the fields of `CalibrateOptions`, given as keywords (`max_length=4096`,
    `device="cuda"`, ...) or as one `options` object (keywords then replace its fields).
    Streams one decoder layer at a time from the shards (never the whole model in memory),
    records the router's real top-k decisions and gates and the routed experts' outputs, and
    saves its position after every layer (`resume=True` continues an interrupted run, recomputing
    at most the layers since the last activation checkpoint, `checkpoint_every`).
    OUT must not be an input; an existing OUT is refused unless `overwrite=True`. `work_dir`
    (default OUT.calib) must be new, empty, or one shardcut made: only shardcut's files are removed.
    Under `torchrun` the samples are split across ranks and only rank 0 writes; `shard="i/N"`
    computes the i-th of N disjoint sample shards, whose files `scores merge` adds up exactly.
    `sequences="pack"` packs samples into `max_length` sequences as the REAP reference does.
    `progress` receives `CalibEvent`s; each "layer_done" carries its `LayerTimes`.

    Example:
        >>> scores = calibrate("Qwen/Qwen3-30B-A3B", "code.jsonl:700,chat.jsonl:300", "scores.safetensors",
        ...                    max_length=4096)
        >>> scores.count.sum(axis=1) == scores.tokens * 8
    """
    opts = CalibrateOptions.from_settings(options, **settings)
    return Calibrator(model, data, out, opts, progress=progress).run()
