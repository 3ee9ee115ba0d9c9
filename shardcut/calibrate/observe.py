"""Per-family calibration adapters and the observer that records routed expert statistics.

Every MoE block that transformers 5 builds for the supported families computes its router
(softmax or sigmoid, selection bias, group limits, renormalisation, scaling: whatever the family
does) and then calls its experts module as `experts(hidden, top_k_index, top_k_weights)`, where
`top_k_weights` are exactly the gates the layer applies to each chosen expert's output. The
observer replaces that call: it runs the experts module's own forward (its own activation,
biases, clamping, interleaving: gpt-oss included) on one (token, expert) pair per row with gate
1, which yields f_j(x) for the routed pairs only, records the statistics, and returns
Σ g_j(x)·f_j(x): the layer's output, so hidden states flow on. No expert runs on a token that
did not choose it, and nothing of size experts x tokens x hidden is ever formed.
"""

from __future__ import annotations

import inspect

import torch

from shardcut.errors import ShardcutError
from shardcut.model import ModelInfo
from shardcut.scores import Scores

# Families whose MoE block calls `experts(hidden, top_k_index, top_k_weights)` with the applied
# gates (transformers 5.23). Tested end to end: qwen3_moe, deepseek_v3, mixtral, gpt_oss (and
# the others the calibration tests list).
EXPERTS_CALL = frozenset({
    "qwen3_moe", "qwen2_moe", "olmoe", "qwen3_next", "mixtral", "phimoe", "minimax_m2", "deepseek_v2",
    "deepseek_v3", "deepseek_v32", "kimi_k2", "glm4_moe", "dots1", "ernie4_5_moe", "gpt_oss",
    "granitemoe", "granitemoeshared",
})
UNSUPPORTED = {
    "llama4": "its router scales the expert input by the routing score, so f_j(x) is not the plain expert output",
    "llama4_text": "its router scales the expert input by the routing score, so f_j(x) is not the plain expert output",
    "kimi_k25": "the multimodal wrapper is not streamed yet",
    "granitemoehybrid": "its Mamba layers are not streamed yet",
}
DEFAULT_PAIR_CHUNK = 16384


def check_supported(info: ModelInfo, source) -> None:
    """Raise a one-line error for a family without a calibration adapter."""
    model_type = info.config.get("model_type")
    if model_type in EXPERTS_CALL:
        return
    why = UNSUPPORTED.get(model_type, "no calibration adapter is written for it")
    raise ShardcutError(f"cannot calibrate model_type={model_type!r}: {why}; calibration supports "
                        f"{', '.join(sorted(EXPERTS_CALL))}", source)


def find_experts(layer: torch.nn.Module) -> torch.nn.Module | None:
    """The routed-experts module of a decoder layer (transformers' `@use_experts_implementation`
    classes, which all take `(hidden, top_k_index, top_k_weights)`), or None for a dense layer."""
    found = [m for m in layer.modules() if hasattr(m, "has_gate") and hasattr(m, "is_concatenated")
             and hasattr(m, "num_experts")]
    if len(found) > 1:
        raise ShardcutError(f"{type(layer).__name__} holds {len(found)} expert modules; calibration expects one")
    return found[0] if found else None


class ExpertObserver:
    """Wraps one experts module while its layer runs; accumulates into `scores` row `key`.

    valid: per-token bool mask (padding False) of the batch about to run, set by the caller.
    record: False replays the layer (same numerics) without touching the statistics.

    Example:
        >>> obs = ExpertObserver(find_experts(layer), scores, "3", top_k=8)
        >>> with obs: out = layer(hidden, **call)
    """

    def __init__(self, experts: torch.nn.Module, scores: Scores, key: str, top_k: int,
                 pair_chunk: int = DEFAULT_PAIR_CHUNK):
        self.experts, self.scores, self.key, self.top_k = experts, scores, key, top_k
        self.pair_chunk = max(pair_chunk, top_k)
        self.valid: torch.Tensor | None = None
        self.record = True
        self.calls = 0
        self._original = type(experts).forward
        self._signature = inspect.signature(self._original)
        if experts.num_experts != scores.num_experts:
            raise ShardcutError(f"layer {key}: the model has {experts.num_experts} experts, the config says "
                                f"{scores.num_experts}")

    def __enter__(self) -> ExpertObserver:
        self.experts.forward = self.forward
        return self

    def __exit__(self, *exc) -> None:
        self.experts.__dict__.pop("forward", None)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        bound = self._signature.bind(self.experts, *args, **kwargs)
        hidden, index, weights = list(bound.arguments.values())[1:4]
        T, k = index.shape
        if k != self.top_k:
            raise ShardcutError(f"layer {self.key}: the router chose {k} experts per token, the config says {self.top_k}")
        valid = self.valid if self.valid is not None else torch.ones(T, dtype=torch.bool, device=hidden.device)
        if valid.numel() != T:
            raise RuntimeError(f"layer {self.key}: experts saw {T} tokens, the batch has {valid.numel()}")
        self.calls += 1
        out = torch.empty_like(hidden)
        step = max(1, self.pair_chunk // k)
        for s in range(0, T, step):
            e = min(T, s + step)
            out[s:e] = self._chunk(hidden[s:e], index[s:e], weights[s:e], valid[s:e])
        return out

    def _chunk(self, hidden, index, weights, valid) -> torch.Tensor:
        n, k = index.shape
        pairs = hidden.repeat_interleave(k, dim=0)  # row t*k + slot = token t for its slot-th expert
        ones = torch.ones(n * k, 1, dtype=weights.dtype, device=weights.device)
        f = self._original(self.experts, pairs, index.reshape(n * k, 1), ones)  # f_j(x) per routed pair
        f32 = f.float()
        gates = weights.float()
        out = (f32.view(n, k, -1) * gates.unsqueeze(-1)).sum(dim=1).to(hidden.dtype)
        if self.record:
            keep = valid.repeat_interleave(k)
            ids = index.reshape(-1)[keep]
            kept = f32[keep]
            norms = torch.linalg.vector_norm(kept, dim=-1)
            peaks = kept.abs().amax(dim=-1) if kept.numel() else norms
            self.scores.accumulate(
                self.key, experts=ids.cpu().numpy(), gates=gates.reshape(-1)[keep].double().cpu().numpy(),
                norms=norms.double().cpu().numpy(), peaks=peaks.double().cpu().numpy(), tokens=int(valid.sum()),
            )
        return out
