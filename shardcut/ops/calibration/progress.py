"""What a streamed run reports while it runs: `CalibEvent`s, with `LayerTimes` per layer.

Times are wall seconds of the host, taken after the device finished the work timed (the timer
waits for queued kernels, `device.synchronize`), so they add up on CUDA as on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class LayerTimes:
    """Where one step's wall time went.

    read_s: reading the layer's tensors from the shards (on the prefetch thread when prefetching,
        while the previous layer ran); wait_s: how long the compute waited for that read (with
        prefetch, the part of read_s that did not overlap; without, read_s itself).
    load_s: dequantising on the device and placing the tensors into the model.
    forward_s: running the layer on every batch (activation store reads and writes included),
        statistics excluded; stats_s: recording the REAP statistics of the routed pairs.
    peak_memory: peak bytes during the step (allocated device memory on CUDA, reset per step;
        the process's peak RSS so far on the CPU).
    """

    read_s: float = 0.0
    wait_s: float = 0.0
    load_s: float = 0.0
    forward_s: float = 0.0
    stats_s: float = 0.0
    peak_memory: int = 0

    @property
    def wall_s(self) -> float:
        """The step's own wall time: what it waited for, loaded and computed."""
        return self.wait_s + self.load_s + self.forward_s + self.stats_s

    def add(self, other: LayerTimes) -> None:
        for f in fields(self):
            if f.name == "peak_memory":
                self.peak_memory = max(self.peak_memory, other.peak_memory)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def describe(self) -> str:
        return (
            f"read {self.read_s:.2f} s (waited {self.wait_s:.2f} s), dequantize/place {self.load_s:.2f} s, "
            f"forward {self.forward_s:.2f} s, statistics {self.stats_s:.2f} s"
        )


@dataclass
class CalibEvent:
    """What `progress` callbacks receive.

    kind: "info" (a log line in `message`), "layer_start", "batch", "layer_done" (state saved:
    interrupting here loses nothing; `times` says where the step's time went) or "done" (`times`
    holds the run's totals). Steps count the embedding pass as step 0 and decoder layer i as step
    i + 1; `key` is the plan key of a MoE layer (None for dense layers).
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
    times: LayerTimes | None = field(default=None)
