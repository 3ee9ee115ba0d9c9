"""`evaluate()`: the quality of pruned variants of a MoE checkpoint, streamed one layer at a time.

Reuses the calibrator's machinery rather than copying it: the data spec and tokenisation
(`calibration.data`), the meta-device skeleton and the layer loader that reads a layer's tensors
from the shards and dequantises them on the device (`calibration.stream`), the padded batches
(`make_batches`), the activation store that spills to disk under a memory budget
(`calibration.store`), the crash-safe work folder behind `resume` (`calibration.resume`) and the
data parallelism of `torchrun` (`calibration.distributed`); `shard="i/N"` takes the same
samples as calibrate's shards.

Streams: the original's hidden states, one per plan (the same loaded layer run with its router
forbidden the pruned experts, `oracle.forbid_pruned_experts`: exactly what the pruned checkpoint
computes, DESIGN.md) and one per pruned checkpoint (its own layers, loaded next to the source's).
Each layer is read once per checkpoint and run once per stream, whatever the number of plans;
all streams live side by side in one activation store ([tokens, streams x hidden]), so one
store, one spill pair and one checkpoint file hold the whole state between layers. After the
last layer each stream goes through the model's own final norm and LM head (the stack's forward
with its layers replaced, so family-specific scaling applies); the per-token values are taken in
float64 (`tokens.py`) and everything accumulates in an `EvalTally` (`tally.py`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from shardcut.format.durable import check_output
from shardcut.format.errors import ShardcutError
from shardcut.ops.calibration.data import CalibData, load_data
from shardcut.ops.calibration.device import current_memory
from shardcut.ops.calibration.distributed import Distributed
from shardcut.ops.calibration.resume import (
    Lock,
    RunState,
    check_work_dir,
    fingerprint_of,
    state_dir_for,
    weights_fingerprint,
)
from shardcut.ops.calibration.runner import (
    DEFAULT_BATCH_TOKENS,
    CalibEvent,
    _data_paths,
    make_batches,
    parse_shard,
    resolve_device,
    resolve_dtype,
)
from shardcut.ops.calibration.store import (
    DEFAULT_RAM_FRACTION,
    ActivationStore,
    StepCheckpoints,
    available_memory,
    checkpoint_interval,
)
from shardcut.ops.evaluation.metrics import EvalReport
from shardcut.ops.evaluation.options import EvalOptions, split_fields
from shardcut.ops.evaluation.passes import StreamPass
from shardcut.ops.evaluation.streams import Stream, check_overlap, open_source, plan_streams, pruned_stream
from shardcut.ops.evaluation.tally import EvalTally, StreamInfo

STATE_SUFFIX = ".eval"  # the work folder of `-o report.json` is `report.json.eval/`


@dataclass
class _Saved:
    """What `RunState.finish` writes at the end: the report, or a shard's tally."""

    value: EvalReport | EvalTally | None

    def save(self, path: Path) -> None:
        if self.value is not None:
            self.value.save(path)


class Evaluator:
    """One evaluation run; `evaluate()` is `Evaluator(model, data, options).run()`."""

    def __init__(
        self,
        model: str | Path,
        data: str,
        options: EvalOptions,
        progress: Callable[[CalibEvent], None] | None = None,
    ):
        self.model, self.data, self.opts, self.progress = str(model), data, options, progress

    def _emit(self, event: CalibEvent) -> None:
        if self.progress is not None and self.dist.rank == 0:
            self.progress(event)

    def _info(self, message: str) -> None:
        self._emit(CalibEvent("info", message))

    # -- setup -------------------------------------------------------------------------------

    def _prepare(self) -> None:
        o = self.opts
        o.check()
        self.torch_device = resolve_device(o.device)
        self.dist = Distributed.from_env(self.torch_device)
        if self.dist.world > 1:
            self.torch_device = self.dist.device or self.torch_device
        self.torch_dtype = resolve_dtype(o.dtype, self.torch_device)
        self.src = open_source(self.model, self.torch_device, self.torch_dtype, o.trust_remote_code)
        self.ckpt, self.revision = self.src.ckpt, None  # what `resume.fingerprint_of` reads
        info = self.src.info
        self.E = info.num_experts
        n = self.src.skeleton.num_layers
        self.keys = {layer.index: layer.key for layer in info.layers if not layer.mtp and layer.index < n}
        if not self.keys:
            raise ShardcutError("the model's forward reaches no MoE layer", self.src.model_dir / "config.json")
        self.streams = [Stream("original", "original", self.src, None, 0.0, self.E)]
        self.streams += plan_streams(self.src, o)
        self.streams += [pruned_stream(self.src, out, self.torch_device, self.torch_dtype, o) for out in o.pruned]
        self.inputs = [
            *(s.path for s in self.src.ckpt.shards),
            self.src.model_dir / "config.json",
            *_data_paths(self.data),
            *(Path(p) for p in o.plans if isinstance(p, (str, Path))),
            *([Path(o.scores)] if o.scores is not None else []),
            self.src.model_dir,
            *(Path(s.source.model_dir) for s in self.streams if s.kind == "checkpoint"),
        ]
        if o.out is not None:
            check_output(o.out, self.inputs, overwrite=o.overwrite, what="shard tally" if o.shard else "report")
        self.budget_tokens = o.batch_tokens or DEFAULT_BATCH_TOKENS[self.torch_device.type]
        vocab = info.text_config.get("vocab_size", info.config.get("vocab_size"))
        if not isinstance(vocab, int):
            raise ShardcutError("config has no integer vocab_size", self.src.model_dir / "config.json")
        self.data_set: CalibData = load_data(
            self.data,
            self.src.model_dir,
            samples=o.samples,
            max_length=o.max_length,
            seed=o.seed,
            vocab_size=vocab,
            trust_remote_code=o.trust_remote_code,
        )
        self._select_samples()
        self.hidden_size = self.src.skeleton.hidden_size
        self.steps = n + 2  # embeddings, the decoder layers, the LM heads

    def _select_samples(self) -> None:
        """This process's samples (a `shard`'s, a rank's share of it) and their rows in the store."""
        ids = list(range(len(self.data_set.samples)))
        self.shard_of = parse_shard(self.opts.shard)
        if self.shard_of:
            i, n = self.shard_of
            ids = ids[i - 1 :: n]
            if not ids:
                raise ShardcutError(f"shard {i}/{n} holds no samples ({len(self.data_set.samples)} in all)")
        self.shard_samples = len(ids)
        self.sample_ids = ids[self.dist.rank :: self.dist.world]  # index in the whole data set
        self.local = [self.data_set.samples[g] for g in self.sample_ids]
        self.batches = make_batches([len(s) for s in self.local], self.budget_tokens)
        self.rows = sum(len(s) for s in self.local)
        # next-token targets and the sample of every row, in store row order; target -1: the last position
        targets = np.full(self.rows, -1, dtype=np.int64)
        for b in self.batches:
            row = b.start
            for j, length in zip(b.samples, b.lengths, strict=True):
                targets[row : row + length - 1] = self.local[j][1:]
                row += length
        self.targets = targets

    def _fingerprint(self) -> dict[str, str]:
        """What a saved state must match (calibration's keys, and the variants) and what shard
        tallies must share to merge (`compat`)."""
        self.all_data, self.max_length, self.seed = self.data_set, self.opts.max_length, self.opts.seed
        self.trust_remote_code = self.opts.trust_remote_code
        base = fingerprint_of(self)
        variants = hashlib.sha256()
        for s in self.streams:
            variants.update(json.dumps([s.name, s.kind, s.keep], sort_keys=True).encode())
            if s.kind == "checkpoint":
                variants.update(weights_fingerprint(s.source.ckpt).encode())
        base["variants"] = variants.hexdigest()[:32]
        base["command"] = "eval"
        keep = ("model", "weights", "revision", "data", "data_spec", "max_length", "seed", "dtype", "variants")
        self.compat = hashlib.sha256(json.dumps({k: base[k] for k in keep}).encode()).hexdigest()[:32]
        return base

    def _budget(self) -> int:
        if self.opts.max_memory is None:
            return int(available_memory() * DEFAULT_RAM_FRACTION)
        from shardcut.rewrite.writer import parse_size

        return int(parse_size(self.opts.max_memory) or 0) // max(1, self.dist.local_world)

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> EvalReport:
        self._prepare()
        o = self.opts
        temp = self._private = None
        if o.work_dir is not None:
            work = o.work_dir
        elif o.out is not None:
            work = state_dir_for(o.out, STATE_SUFFIX)
        elif self.dist.world > 1:
            raise ShardcutError("under torchrun, give `out` or `work_dir`: the ranks share the work folder")
        else:  # nothing to resume from: a private folder, removed at the end
            temp = self._private = Path(tempfile.mkdtemp(prefix="shardcut-eval-"))
            work = temp / "state"
        check_work_dir(work, [*self.inputs, o.out])
        lock = None
        if o.out is not None and self.dist.rank == 0:
            lock = Lock(o.out.with_name(f".{o.out.name}.shardcut-lock"), o.out, command="eval")
        try:
            state = RunState(work, self.dist)
            state.open()
            try:
                return self._run(state)
            finally:
                state.close()
        finally:
            if lock is not None:
                lock.release()
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)

    def _run(self, state: RunState) -> EvalReport:
        o = self.opts
        start = state.begin(self._fingerprint(), o.resume, self._info)
        tally = state.load_partial(EvalTally.load) if start > 0 else None
        if tally is None:
            start, tally = 0, self._new_tally()
        self.tally = tally
        width = len(self.streams) * self.hidden_size
        nbytes = self.rows * width * torch.empty((), dtype=self.torch_dtype).element_size()
        first, resume_file = state.activations_file(nbytes) if start > 0 else (0, None)
        self.store = ActivationStore(
            self.rows, width, self.torch_dtype, self._budget(), state.rank_dir, resume_file=resume_file
        )
        every = self._checkpoint_policy(state, nbytes)
        ds = self.data_set
        self._info(
            f"data: {ds.tokens} tokens in {len(ds.samples)} samples ({'; '.join(ds.notes)}); "
            f"{len(self.streams) - 1} variants"
        )
        if self.shard_of or self.dist.world > 1:
            self._info(
                f"this {'shard' if self.shard_of else 'run'}: {self.shard_samples} samples"
                + (f", {self.dist.world} ranks" if self.dist.world > 1 else "")
            )
        self._info(
            f"{len(self.streams)} streams side by side; {self.store.describe()}; "
            f"device {self.torch_device}, {len(self.batches)} batches"
        )
        if start > 0:
            how = f" (recomputing {start - first} finished steps)" if first < start else ""
            self._info(f"resuming at step {start} of {self.steps}{how}")
        if first > 0:
            for c in {id(s.source): s.source for s in self.streams}.values():
                c.loader.buffers_to_device()  # rotary frequencies & co; the embedding is not needed any more
        passes = StreamPass(
            self.streams,
            self.keys,
            self.store,
            self.batches,
            self.local,
            self.sample_ids,
            self.targets,
            self.hidden_size,
            self.torch_device,
            tally,
            self.dist,
            self.steps,
            self._emit,
            ThreadPoolExecutor(1) if self._prefetch() else None,
        )
        try:
            self._steps(state, passes, first, start, every)
        finally:
            if passes.prefetch is not None:
                passes.prefetch.shutdown(wait=True, cancel_futures=True)
        self.store.close()
        self._gather()
        report = tally.report()
        state.finish(_Saved(None if o.out is None else tally if o.shard else report), o.out or state.directory)
        self._emit(CalibEvent("done", message=str(o.out or ""), step=self.steps, steps=self.steps))
        return report

    def _steps(self, state: RunState, passes: StreamPass, first: int, start: int, every: int | None) -> None:
        """Steps `first`.. (those before `start` replayed, not recorded), the state saved after each."""
        checkpoints = StepCheckpoints(self.store, state.rank_dir, every, state.activations)
        with torch.inference_mode():
            for step in range(first, self.steps):
                record = step >= start
                t0 = time.perf_counter()
                if step == 0:
                    passes.embeddings()
                elif step < self.steps - 1:
                    passes.layer(step - 1, record)
                else:
                    passes.heads()
                checkpoints.computed(time.perf_counter() - t0)
                if record and step + 1 < self.steps:
                    activations = checkpoints.after(step, True, self.dist.all_true)
                    state.save(step + 1, self.tally, activations, "", in_use=self.store.in_use())
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

    def _prefetch(self) -> bool:
        """As calibrate: read layer i + 1 while layer i runs (on the CPU too: README, bench)."""
        return bool(self.opts.prefetch)

    def _new_tally(self) -> EvalTally:
        warnings, overlap = check_overlap(self.opts.scores, self.data_set.samples)
        about = {
            "model": self.model,
            "data": self.data,
            "num_experts": self.E,
            "device": str(self.torch_device),
            "dtype": str(self.torch_dtype).removeprefix("torch."),
            "warnings": warnings,
            "overlap": overlap,
            "shard": f"{self.shard_of[0]}/{self.shard_of[1]}" if self.shard_of else None,
            "samples": self.shard_samples,
            "compat": self.compat,
        }
        for w in warnings:
            self._info(f"warning: {w}")
        infos = [StreamInfo(s.name, s.kind, s.ratio, s.kept) for s in self.streams]
        keys = [self.keys[i] for i in sorted(self.keys)]
        return EvalTally(infos, keys, self.src.skeleton.num_layers, about)

    def _checkpoint_policy(self, state: RunState, nbytes: int) -> int | None:
        """As calibrate: RAM activations are checkpointed at layer boundaries unless there is no
        room for two copies (a resume then recomputes the finished layers)."""
        every = self.opts.checkpoint_every
        if self._private is not None and every is None:
            return 0  # no `out` or `work_dir`: no resume can read them, so none are written
        return checkpoint_interval(every, self.store, state.rank_dir, nbytes, self._info)

    def _gather(self) -> None:
        """Under torchrun: every rank's per-token values on every rank (the sums are reduced per layer)."""
        if self.dist.world <= 1:
            return
        t = self.tally
        t.token_sample = self.dist.all_gather(np.concatenate(t.token_sample))
        t.loss_sample = self.dist.all_gather(np.concatenate(t.loss_sample))
        for s in range(len(t.streams)):
            t.loss[s] = self.dist.all_gather(np.concatenate(t.loss[s]))
            if s:
                t.kl[s] = self.dist.all_gather(np.concatenate(t.kl[s]))
                t.agree[s] = self.dist.all_gather(np.concatenate(t.agree[s]))


def evaluate(
    model: str | Path,
    data: str,
    options: EvalOptions | None = None,
    *,
    progress: Callable[[CalibEvent], None] | None = None,
    **fields,
) -> EvalReport:
    """Measure what pruning costs: each plan (or pruned checkpoint) against MODEL on held-out DATA.

    `options` (an `EvalOptions`) or its fields as keywords (`plans=`, `scores=`, `ratios=`, ...;
    keywords override `options`). One streamed pass over MODEL's layers carries the original
    hidden states and one stream per variant: every plan in `plans`, one plan per ratio in
    `ratios` made from `scores` (with `plan_options`, or `make_plan`'s keywords such as
    `criterion=` and `protect=` given here directly), and every checkpoint in
    `pruned` (a `shardcut prune` output, streamed next to MODEL). `scores` is also checked
    against DATA: a warning when DATA holds calibration samples. Returns loss/perplexity of each,
    KL(original || variant) per token (mean, p50, p99), top-1 agreement and per-layer relative
    errors (see `shardcut.ops.evaluation.metrics`); with `out`, also writes the report there
    (a `shard` run writes its tally instead, for `merge_tallies`), and `resume=True` continues an
    interrupted run with the same `out`. Under `torchrun` the samples are split across ranks.

    Example:
        >>> report = evaluate("Qwen3-30B-A3B", "heldout.jsonl:200", scores="s.safetensors", ratios=[0.25, 0.5])
        >>> report.plans[1].kl_mean, report.plans[1].first_layer_over(0.05)
    """
    own, plan = split_fields(fields)
    opts = replace(options, **own) if options is not None else EvalOptions(**own)
    if plan:
        opts = replace(opts, plan_options=replace(opts.plan_options, **plan))
    return Evaluator(model, data, opts, progress).run()
