"""The correctness oracle of DESIGN.md: run the original model with its router forbidden from
choosing the experts a plan prunes. A pruned checkpoint is right when its logits equal these.

Masking: −inf on the pruned experts' router logits (softmax routers, logit biases) and −inf
on their selection bias (`e_score_correction_bias` and kin), so their selection score is −inf
whatever the bias. Router weights are recognised by identity inside `torch.nn.functional.linear`,
which every transformers MoE router calls, so no family needs its own patch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

_LAYER = re.compile(r"layers\.(\d+)\.")
_BIAS_WORDS = ("e_score_correction_bias", "expert_bias", "router_bias", "moe_statics", "router.bias", "gate.bias")


def _layer_key(name: str) -> str | None:
    m = _LAYER.search(name)
    return m.group(1) if m else None


@contextmanager
def forbid_pruned_experts(model, keep: dict[str, list[int]], num_experts: int) -> Iterator[int]:
    """Inside the block, `model`'s routers cannot choose experts missing from `keep`.

    Yields the number of routers masked (a test should check it equals the MoE layer count).

    Example:
        >>> with forbid_pruned_experts(model, plan.keep, 8) as n:
        ...     logits = model(input_ids).logits
    """
    import torch
    import torch.nn.functional as F

    masks: dict[int, torch.Tensor] = {}
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, param in model.named_parameters():
        key = _layer_key(name)
        if key not in keep or "experts." in name.replace("shared_experts.", ""):
            continue
        pruned = torch.ones(num_experts, dtype=torch.bool)
        pruned[keep[key]] = False
        if param.ndim == 2 and param.shape[0] == num_experts and any(w in name for w in ("gate", "router")):
            masks[param.data_ptr()] = pruned
        elif any(w in name for w in _BIAS_WORDS) and param.shape[-1] == num_experts and param.ndim <= 2:
            saved.append((param, param.detach().clone()))
            with torch.no_grad():
                param[..., pruned] = float("-inf")
    for name, buf in model.named_buffers():  # some families keep the selection bias as a buffer
        key = _layer_key(name)
        if key in keep and any(w in name for w in _BIAS_WORDS) and buf.shape[-1] == num_experts:
            pruned = torch.ones(num_experts, dtype=torch.bool)
            pruned[keep[key]] = False
            saved.append((buf, buf.clone()))
            buf[..., pruned] = float("-inf")

    original = F.linear

    def masked_linear(input, weight, bias=None):
        out = original(input, weight, bias)
        mask = masks.get(weight.data_ptr())
        if mask is not None and out.shape[-1] == mask.numel():
            out = out.masked_fill(mask.to(out.device), float("-inf"))
        return out

    F.linear = masked_linear
    try:
        yield len(masks)
    finally:
        F.linear = original
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)
