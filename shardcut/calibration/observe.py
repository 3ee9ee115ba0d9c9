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
# gates (transformers 5.23), each checked against the hook reference of tests/test_calibrate.py
# (hidden states after every layer and statistics) on a tiny model.
EXPERTS_CALL = frozenset({
    "qwen3_moe", "qwen2_moe", "olmoe", "qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text", "mixtral", "phimoe",
    "minimax", "minimax_m2", "deepseek_v2", "deepseek_v3", "kimi_k2", "glm4_moe", "dots1", "ernie4_5_moe",
    "gpt_oss", "granitemoe", "kimi_linear", "bailing_moe", "bailing_moe_v2", "bailing_hybrid", "afmoe", "lfm2_moe",
    "nemotron_h", "hunyuan_v1_moe", "jamba",
})
_ROUTER_SCALES_INPUT = "its router scales the expert input by the routing score, so f_j(x) is not the plain expert output"
_WRAPPER = "its multimodal wrapper has no text-only causal LM in transformers to stream"
UNSUPPORTED = {
    "llama4": _ROUTER_SCALES_INPUT, "llama4_text": _ROUTER_SCALES_INPUT,
    "kimi_k25": _WRAPPER, "qwen3_vl_moe": _WRAPPER, "glm4v_moe": _WRAPPER, "ernie4_5_vl_moe": _WRAPPER,
    "qwen3_omni_moe": _WRAPPER, "step3_vl": _WRAPPER,
    "longcat_flash": "its zero-computation (identity) experts are not modelled by the observer yet",
    "deepseek_v4": "its hash-routed layers are not streamed yet",
    "gemma4": "its per-layer token inputs are not streamed yet", "gemma4_text": "its per-layer token inputs are not streamed yet",
    "dbrx": "its transformer.blocks layout is not streamed yet",
}
DEFAULT_PAIR_CHUNK = 16384  # (token, expert) pairs per experts call: bounds the f_j(x) buffer


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
        f32 = f.float()  # gates are applied and statistics taken in float32, whatever the compute dtype
        gates = weights.float()
        out = torch.bmm(gates.unsqueeze(1), f32.view(n, k, -1)).squeeze(1).to(hidden.dtype)  # sum_slot g * f
        if self.record:
            # reduce per pair first, select the non-padding pairs after: no second copy of f
            norms = torch.linalg.vector_norm(f32, dim=-1)
            low, high = torch.aminmax(f32, dim=-1)
            peaks = torch.maximum(high, -low)
            keep = valid.repeat_interleave(k)
            self.scores.accumulate(
                self.key, experts=index.reshape(-1)[keep].cpu().numpy(),
                gates=gates.reshape(-1)[keep].double().cpu().numpy(), norms=norms[keep].double().cpu().numpy(),
                peaks=peaks[keep].double().cpu().numpy(), tokens=int(valid.sum()),
            )
        return out
