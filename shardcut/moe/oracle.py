"""The correctness oracle of DESIGN.md: run the original model with its router forbidden from
choosing the experts a plan prunes. A pruned checkpoint is right when its logits equal these.

Masking: −inf on the pruned experts' router logits (softmax routers, logit biases) and −inf
on their selection bias (`e_score_correction_bias` and kin), so their selection score is −inf
whatever the bias. Router weights are recognised by identity inside `torch.nn.functional.linear`,
which every transformers MoE router calls, so no family needs its own patch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from shardcut.moe.architectures import ARCHITECTURES


def _alternatives(paths: set[str]) -> str:
    return "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))


def _table_patterns() -> tuple[re.Pattern, re.Pattern, re.Pattern]:
    """Layer numbers, router weights and selection biases, as every table entry spells them
    (the layer list's last segment, the paths inside the MoE block), so a new family needs no
    change here."""
    lists: set[str] = set()
    routers: set[str] = set()
    biases: set[str] = set()
    for arch in ARCHITECTURES:
        for stack in arch.stacks:
            lists.update(prefix.rpartition(".")[2] for prefix in stack.layer_prefixes)
            routers.update(stack.router_weights)
            biases.update(stack.selection_biases)
    return (
        re.compile(rf"(?:^|\.)(?:{_alternatives(lists)})\.(\d+)\."),
        re.compile(rf"(?:^|\.)(?:{_alternatives(routers)})$"),
        re.compile(rf"(?:^|\.)(?:{_alternatives(biases)})$"),
    )


_LAYER, _ROUTER, _BIAS = _table_patterns()


def _layer_key(name: str) -> str | None:
    m = _LAYER.search(name)
    return m.group(1) if m else None


@contextmanager
def forbid_pruned_experts(
    model,
    keep: dict[str, list[int]],
    num_experts: int | Mapping[str, int],
    layer_key: Callable[[str], str | None] | None = None,
    zero_experts: int = 0,
) -> Iterator[int]:
    """Inside the block, `model`'s routers cannot choose experts missing from `keep`.

    Yields the number of routers masked (a test should check it equals the MoE layer count).
    num_experts: one count, or one per plan key (Qwen3-Omni's talker has its own).
    layer_key: parameter name -> plan key (default: the number after `layers.`/`blocks.`),
    for models whose stacks share layer numbers (`talker.…layers.1.` is plan key `talker.1`).
    zero_experts: routers with this many extra trailing rows (LongCat's zero-computation
    experts) are masked on their first `num_experts` rows only.

    Example:
        >>> with forbid_pruned_experts(model, plan.keep, 8) as n:
        ...     logits = model(input_ids).logits
    """
    import torch
    import torch.nn.functional as F

    key_of = layer_key or _layer_key

    def pruned_mask(key: str, width: int):
        E = num_experts[key] if isinstance(num_experts, Mapping) else num_experts
        if width not in (E, E + zero_experts):
            return None
        pruned = torch.zeros(width, dtype=torch.bool)
        pruned[:E] = True
        pruned[keep[key]] = False
        return pruned

    masks: dict[int, torch.Tensor] = {}
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, param in model.named_parameters():
        key = key_of(name)
        if key not in keep or "experts." in name.replace("shared_experts.", ""):
            continue
        if param.ndim == 2 and _ROUTER.search(name) and (pruned := pruned_mask(key, param.shape[0])) is not None:
            masks[param.data_ptr()] = pruned
        elif _BIAS.search(name) and param.ndim <= 2 and (pruned := pruned_mask(key, param.shape[-1])) is not None:
            saved.append((param, param.detach().clone()))
            with torch.no_grad():
                param[..., pruned] = float("-inf")
    for name, buf in model.named_buffers():  # some families keep the selection bias as a buffer
        key = key_of(name)
        if (
            key in keep
            and _BIAS.search(name)
            and buf.ndim >= 1
            and (pruned := pruned_mask(key, buf.shape[-1])) is not None
        ):
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
