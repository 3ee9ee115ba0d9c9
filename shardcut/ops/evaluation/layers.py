"""What `evaluate` does with one loaded decoder layer and with the LM head: find the MoE block,
run the layer (capturing that block's output), check a masked router chose no pruned expert,
load the head and compute logits through the model's own forward."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from shardcut.format.errors import ShardcutError
from shardcut.moe.architectures import Calibration
from shardcut.ops.calibration.observe import find_experts
from shardcut.ops.calibration.stream import run_layer


def moe_block(layer: torch.nn.Module, calib: Calibration | None = None) -> torch.nn.Module | None:
    """The module whose child is the routed-experts module: the MoE block (router, experts, shared experts)."""
    experts = find_experts(layer, calib)
    if experts is None:
        return None
    return next((m for m in layer.modules() if any(child is experts for child in m.children())), None)


@contextmanager
def refuse_pruned(
    layer: torch.nn.Module, key: str, keep: list[int], num_experts: int, calib: Calibration | None = None
):
    """Check, at the experts call, that the masked router chose no pruned expert: the mask is
    recognised by weight identity (`forbid_pruned_experts`), and a router that copies its
    weight before the matmul would slip past it unnoticed otherwise. Ids past `num_experts`
    (LongCat's identity experts) are never pruned. A router scaling the expert input (Llama-4)
    is checked at its output: its scores of pruned experts must be zero."""
    pruned = torch.ones(num_experts, dtype=torch.bool)
    pruned[keep] = False

    def fail() -> None:
        raise ShardcutError(
            f"layer {key}: the router still chose a pruned expert under the mask; this family's "
            "router cannot be masked here (its weight is copied before use?)"
        )

    def check(module, args):
        index = args[1]
        if bool(pruned.to(index.device)[index[index < num_experts]].any()):
            fail()

    def check_scores(module, args, output):
        if bool((output[0][:, pruned.to(output[0].device)] != 0).any()):
            fail()

    if calib is not None and calib.input_scaling_router:
        hook = layer.get_submodule(calib.input_scaling_router).register_forward_hook(check_scores)
    elif (experts := find_experts(layer, calib)) is not None:
        hook = experts.register_forward_pre_hook(check)
    else:
        raise ShardcutError(f"layer {key}: no routed-experts module found in {type(layer).__name__}")
    try:
        yield
    finally:
        hook.remove()


def run_with_block(layer, block, hidden, call, real=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's output and (for MoE layers) its MoE block's output.

    `real` ([B, T] bool, the batch's real tokens): the MoE block then runs on those tokens
    only, as one row, and its output is scattered back with zeros at the padding. The block
    acts on each token alone (router, experts, shared experts), so the real tokens' values are
    those of the padded call, and the experts (most of a MoE layer's time) skip the padding a
    plain forward computes (14% of the positions of bench/eval.py's batches)."""
    if block is None:
        return run_layer(layer, hidden, call), None
    box: list[torch.Tensor] = []
    hook = block.register_forward_hook(lambda m, a, o: box.append(o[0] if isinstance(o, tuple) else o))
    own = block.__dict__.get("forward")  # a forward already set on the instance (a hook library's)
    if real is not None and not bool(real.all()):
        block.forward = _on_real_tokens(block.forward, real)
    try:
        out = run_layer(layer, hidden, call)
    finally:
        hook.remove()
        if own is None:
            block.__dict__.pop("forward", None)
        else:
            block.forward = own
    return out, box[-1]


def _on_real_tokens(forward, real: torch.Tensor):
    """`forward` of a per-token block, called on the real tokens of its [B, T, H] (or
    [B * T, H]) input only, its output scattered back to the layout it came in ([1, N, H] to
    [B, T, H]; [N, H], as Llama-4 returns it flattened, to [B * T, H]); any other call or
    output is passed through to the padded call unchanged."""
    flat = real.reshape(-1)
    n = int(flat.sum())

    def compact(x, *args, **kwargs):
        if args or kwargs or not isinstance(x, torch.Tensor):
            return forward(x, *args, **kwargs)
        if x.dim() == 3 and x.shape[:2] == real.shape:
            picked = x[real][None]
        elif x.dim() == 2 and x.shape[0] == flat.numel():
            picked = x[flat]
        else:
            return forward(x)
        out = forward(picked)
        first = out[0] if isinstance(out, tuple) else out
        if not isinstance(first, torch.Tensor):
            return forward(x)
        if first.dim() >= 2 and first.shape[:2] == (1, n):
            full = first.new_zeros((*real.shape, *first.shape[2:]))
            full[real] = first[0]
        elif first.dim() >= 1 and first.shape[0] == n:
            full = first.new_zeros((flat.numel(), *first.shape[1:]))
            full[flat] = first
        else:
            return forward(x)
        return (full, *out[1:]) if isinstance(out, tuple) else full

    return compact


def load_head(c, device: torch.device) -> None:
    """Final norm & co (everything outside the layers) and the LM head, on the device."""
    c.loader.load_outside()
    names = [n for n in c.ckpt.tensors if n.startswith("lm_head.")]
    if names:
        raw = c.loader.reader.read_many(names)
        c.loader._convert(c.loader._load(raw, "LM head"), "LM head")
    model = c.skeleton.model
    head = model.get_output_embeddings()
    if head is None:
        raise ShardcutError(f"{type(model).__name__} has no output embeddings (LM head)", c.model_dir)
    if head.weight.device.type == "meta":  # tied to the input embedding
        emb = model.get_input_embeddings()
        if emb is None or emb.weight.device.type == "meta":
            raise ShardcutError("the checkpoint has no lm_head weights and no embedding to tie them to", c.model_dir)
        head.weight = emb.weight
    head.to(device)


def logits_of(sk, hidden: torch.Tensor, attention) -> torch.Tensor:
    """The causal LM's logits for final hidden states: its own forward, the layers replaced (the
    last returns `hidden`), so its final norm, head and any logit scaling apply as in the model."""
    n = sk.num_layers

    def passthrough(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def last(*args, **kwargs):
        return hidden

    for i in range(n):
        sk.layers[i].forward = last if i == n - 1 else passthrough
    try:
        out = sk.model(inputs_embeds=hidden, attention_mask=attention, use_cache=False)
    finally:
        for i in range(n):
            sk.layers[i].__dict__.pop("forward", None)
    return out.logits
