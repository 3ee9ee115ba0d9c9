"""The MoE layers of a checkpoint and the roles its tensors play in a rewrite: a closed set of
types (`Copied`, `ExpertTensor`, `ExpertAxisSlice`), made only by `ModelInfo.classify` and
`ModelInfo.expert_of` (`model.py`), the one reader of tensor names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from shardcut.moe.schema import Stack


@dataclass(frozen=True)
class MoELayer:
    """One MoE block: its plan key, the tensor-name prefix of its layer, and whether it is MTP.

    num_experts / top_k come from the layer's own (sub-)config, `config_path`, so stacks with
    their own counts (Qwen3-Omni's talker) differ from the main stack. zero_experts: trailing
    router rows that are not experts (LongCat's zero-computation experts).
    """

    key: str
    index: int
    prefix: str  # e.g. "model.layers.3."
    stack: Stack
    mtp: bool
    num_experts: int = 0
    top_k: int = 0
    zero_experts: int = 0
    config_path: tuple[str, ...] = ()


@dataclass(frozen=True)
class Copied:
    """A tensor outside the routed experts: copied unchanged."""


@dataclass(frozen=True)
class ExpertTensor:
    """A tensor of one routed expert, `{layer.prefix}{experts}.{expert}.{suffix}`: dropped with
    its expert or renamed to the expert's new id. `expert` is the id within `layer`'s stack (the
    vision half of ERNIE-VL's shared ModuleList counts from 0 too)."""

    layer: MoELayer
    expert: int
    suffix: str


@dataclass(frozen=True)
class ExpertAxisSlice:
    """A tensor holding `blocks` equal blocks along `axis`, one per expert (then any
    zero-computation rows), sliced to the kept experts' blocks (`ModelInfo.kept_blocks`).

    is_router: router weights, selection biases, per-expert scales (computed for every token);
        otherwise fused expert weights (`[E, …]`, DBRX's `[E·F, H]`).
    rows: for `[stacks, E]` tensors shared by stacks (ERNIE-VL's statics), the layer owning each
        row (row r is sliced with that layer's kept experts); `()` otherwise.
    """

    layer: MoELayer
    axis: int
    blocks: int
    is_router: bool
    rows: tuple[MoELayer, ...] = ()

    @property
    def owners(self) -> tuple[MoELayer, ...]:
        """The MoE layers whose experts lie along the axis."""
        return self.rows or (self.layer,)


# What the rewrite does with one tensor: a closed set, produced only by `ModelInfo.classify`.
Role: TypeAlias = Copied | ExpertTensor | ExpertAxisSlice
COPIED = Copied()
