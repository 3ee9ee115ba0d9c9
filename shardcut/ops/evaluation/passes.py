"""The steps of an evaluation over every batch: the embeddings, one decoder layer for every
stream, the LM heads. Every stream's hidden states live in its columns of one activation store
([tokens, streams x hidden]); each layer is loaded once per checkpoint and run once per stream
(a plan's stream under its router mask), and what the steps measure goes into the `EvalTally`."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from shardcut.ops.calibration.device import current_memory
from shardcut.ops.calibration.distributed import Distributed
from shardcut.ops.calibration.runner import Batch, CalibEvent
from shardcut.ops.calibration.store import ActivationStore
from shardcut.ops.calibration.stream import release_free_memory
from shardcut.ops.evaluation.layers import moe_block, refuse_pruned, run_with_block
from shardcut.ops.evaluation.streams import Source, Stream
from shardcut.ops.evaluation.tally import EvalTally
from shardcut.ops.evaluation.tokens import original_tokens, variant_tokens


@dataclass
class StreamPass:
    """What the steps work on (set up by `runner.Evaluator`); `local[j]` is the token ids of
    sample `sample_ids[j]` of the data, `targets` the next-token ids in store row order."""

    streams: list[Stream]
    keys: dict[int, str]  # decoder layer -> plan key of its MoE block
    store: ActivationStore
    batches: list[Batch]
    local: list[np.ndarray]
    sample_ids: list[int]
    targets: np.ndarray
    hidden_size: int
    torch_device: torch.device
    tally: EvalTally
    dist: Distributed
    steps: int
    _emit: Callable[[CalibEvent], None]
    prefetch: ThreadPoolExecutor | None = None  # as calibrate's: reads the next layer's tensors
    pending: dict[int, Future] = field(default_factory=dict)
    diverges: list[int] = field(init=False)  # per stream: the first decoder layer whose output may differ

    def __post_init__(self) -> None:
        self.diverges = [self._first_change(s) for s in self.streams]

    @property
    def num_layers(self) -> int:
        return self.streams[0].source.skeleton.num_layers

    def _first_change(self, s: Stream) -> int:
        """The first decoder layer where stream `s` can differ from the original: for a plan,
        the first whose MoE block loses an expert (before it, its hidden states are the
        original's, so running it again would only repeat the original's work); 0 for the original
        itself (never skipped) and for a pruned checkpoint (its own weights)."""
        if s.kind != "plan" or s.keep is None or s.source is not self.streams[0].source:
            return 0
        info = s.source.info
        for i in range(self.num_layers):
            key = self.keys.get(i)
            if key is None:
                continue
            keep = s.keep.get(key)
            if keep is None or len(set(keep)) < (info.layer_by_key[key].num_experts or info.num_experts):
                return i
        return self.num_layers

    def _batch_inputs(self, batch):
        dev = self.torch_device
        lengths = torch.tensor(batch.lengths, device=dev)
        mask = torch.arange(batch.width, device=dev)[None, :] < lengths[:, None]  # right padding
        return mask, (None if bool(mask.all()) else mask.long())

    def _sources(self) -> list[Source]:
        out: list[Source] = []
        for s in self.streams:
            if all(s.source is not c for c in out):
                out.append(s.source)
        return out

    def _hidden(self, s_idx: int, batch, mask) -> torch.Tensor:
        """Stream `s_idx`'s hidden states of `batch`, padded to [B, T, H] on the device."""
        H = self.hidden_size
        flat = self.store.read(batch.start, batch.start + batch.rows)[:, s_idx * H : (s_idx + 1) * H]
        hidden = torch.zeros((*mask.shape, H), dtype=flat.dtype, device=self.torch_device)
        hidden[mask] = flat.to(self.torch_device)
        return hidden

    def _write(self, batch, outs: list[torch.Tensor]) -> None:
        """Every stream's new hidden states of `batch` ([rows, H] each) into its columns of the store."""
        self.store.write(batch.start, batch.start + batch.rows, torch.cat([o.to("cpu") for o in outs], dim=1))

    def _start(self, step: int, layer: int, key: str | None = None, message: str = "") -> None:
        self._emit(
            CalibEvent(
                "layer_start",
                step=step,
                steps=self.steps,
                layer=layer,
                key=key,
                layer_tokens=self.store.rows,
                batches=len(self.batches),
                message=message,
            )
        )

    def embeddings(self) -> None:
        self._start(0, -1)
        from shardcut.ops.calibration.stream import capture_call

        for c in self._sources():
            c.loader.load_outside()
        for batch in self.batches:
            mask, attention = self._batch_inputs(batch)
            ids = torch.zeros(mask.shape, dtype=torch.long, device=self.torch_device)
            ids[mask] = torch.from_numpy(np.concatenate([self.local[j] for j in batch.samples])).to(self.torch_device)
            emb = {
                id(c): capture_call(c.skeleton, 0, input_ids=ids, attention_mask=attention).hidden[mask]
                for c in self._sources()
            }
            self._write(batch, [emb[id(s.source)] for s in self.streams])
        for c in self._sources():
            c.loader.free_outside_params()
        self.store.commit()

    def layer(self, i: int, record: bool) -> None:
        from shardcut.moe.oracle import forbid_pruned_experts
        from shardcut.ops.calibration.stream import capture_call

        key = self.keys.get(i)
        self._start(i + 1, i, key)
        t0 = time.perf_counter()
        loaded = {}
        for c in self._sources():
            pending = self.pending.pop(id(c), None)
            raw = pending.result() if pending is not None else c.loader.read_layer(i)
            if self.prefetch is not None and i + 1 < c.skeleton.num_layers:  # read layer i + 1 while i runs
                self.pending[id(c)] = self.prefetch.submit(c.loader.read_layer, i + 1)
            layer = c.loader.load_layer(i, raw)
            calib_c = c.info.arch.calibration_of(c.info.config.get("model_type"))
            loaded[id(c)] = (layer, moe_block(layer, calib_c) if key is not None else None)
        info = self.streams[0].source.info
        E = info.num_experts
        E_key = (info.layer_by_key[key].num_experts or E) if key is not None else E
        calib = info.arch.calibration_of(info.config.get("model_type"))
        zero = info.layer_by_key[key].zero_experts if key is not None else 0  # LongCat's identity experts
        sums = np.zeros((len(self.streams), 2, 2))  # stream, (residual, MoE), (diff², ref²)
        done = 0
        for b_idx, batch in enumerate(self.batches):
            mask, attention = self._batch_inputs(batch)
            B, T = mask.shape
            calls = {}
            outs: list[tuple] = []
            for s_idx, s in enumerate(self.streams):
                if i < self.diverges[s_idx]:  # still the original's hidden states: the same output
                    outs.append(outs[0])
                    continue
                c = s.source
                hidden = self._hidden(s_idx, batch, mask)
                if id(c) not in calls:
                    calls[id(c)] = capture_call(c.skeleton, i, inputs_embeds=hidden, attention_mask=attention)
                layer, block = loaded[id(c)]
                if s.keep is not None and key is not None:
                    with (
                        forbid_pruned_experts(layer, {key: s.keep[key]}, E_key, lambda _name: key, zero),
                        refuse_pruned(layer, key, s.keep[key], E_key, calib),
                    ):
                        out, moe = run_with_block(layer, block, hidden, calls[id(c)], mask)
                else:
                    out, moe = run_with_block(layer, block, hidden, calls[id(c)], mask)
                flat = mask.reshape(-1)
                outs.append((out[mask], None if moe is None else moe.reshape(B * T, -1)[flat]))
            if record and len(self.streams) > 1:
                _add_errors(sums, outs)
            self._write(batch, [o for o, _ in outs])
            done += batch.rows
            self._emit(
                CalibEvent(
                    "batch",
                    step=i + 1,
                    steps=self.steps,
                    layer=i,
                    key=key,
                    batch=b_idx + 1,
                    batches=len(self.batches),
                    tokens=done,
                    layer_tokens=self.store.rows,
                    tokens_per_s=done / max(time.perf_counter() - t0, 1e-9),
                    memory=current_memory(self.torch_device),
                )
            )
        for c in self._sources():
            c.loader.free(loaded[id(c)][0])
        release_free_memory()
        if record:
            sums = self.dist.all_reduce_sum(sums)
            self.tally.residual[:, i] += sums[:, 0]
            if key is not None:
                self.tally.moe[:, self.tally.moe_keys.index(key)] += sums[:, 1]
        self.store.commit()

    def heads(self) -> None:
        from shardcut.ops.evaluation.layers import load_head

        self._start(self.steps - 1, self.streams[0].source.skeleton.num_layers, message="LM head")
        for c in self._sources():
            load_head(c, self.torch_device)
        for batch in self.batches:
            targets = torch.from_numpy(self.targets[batch.start : batch.start + batch.rows]).to(self.torch_device)
            original = original_tokens(self._logits(0, batch), targets)
            per_stream: list[tuple] = [(None, None, original.loss)]
            for s_idx in range(1, len(self.streams)):  # one variant's logits at a time: 2 x a batch's logits at most
                if self.diverges[s_idx] >= self.num_layers:  # the original's logits: what variant_tokens gives
                    rows = original.top1.shape[0]
                    per_stream.append((np.zeros(rows), np.ones(rows, dtype=bool), original.loss.copy()))
                    continue
                per_stream.append(variant_tokens(original, self._logits(s_idx, batch)))
            del original
            ids = np.array([self.sample_ids[j] for j in batch.samples], dtype=np.int64)
            lengths = np.array(batch.lengths)
            self.tally.add_tokens(np.repeat(ids, lengths), np.repeat(ids, lengths - 1), per_stream)

    def _logits(self, s_idx: int, batch) -> torch.Tensor:
        from shardcut.ops.evaluation.layers import logits_of

        # Final norm, head and logit scaling act on each token alone, so they run on the batch's
        # real tokens as one row ([1, rows, H]), not on the padded [B, T, H]: no logits of padding.
        H = self.hidden_size
        flat = self.store.read(batch.start, batch.start + batch.rows)[:, s_idx * H : (s_idx + 1) * H]
        return logits_of(self.streams[s_idx].source.skeleton, flat.to(self.torch_device)[None], None)[0]


def _add_errors(sums: np.ndarray, outs: list[tuple]) -> None:
    """Add one batch's squared differences of every variant's layer and MoE outputs from the
    original's (in the activations' dtype, exactly 0 when equal; summed in float64)."""
    ref, ref_moe = outs[0]
    ref_sq = _sq(ref)
    ref_moe_sq = _sq(ref_moe) if ref_moe is not None else 0.0
    for s_idx, (out, moe) in enumerate(outs[1:], start=1):
        sums[s_idx, 0] += (_sq(out - ref), ref_sq)
        if moe is not None and ref_moe is not None:
            sums[s_idx, 1] += (_sq(moe - ref_moe), ref_moe_sq)


def _sq(x: torch.Tensor) -> float:
    """The sum of squares of `x`, accumulated in float64."""
    return float(torch.sum(x * x, dtype=torch.float64))
