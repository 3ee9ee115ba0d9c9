"""`shardcut demo`: the whole pipeline offline on a small MoE model built on the spot."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from shardcut.plan import Plan
from shardcut.rewrite import prune
from shardcut.verify import verify

DEMO_CONFIG = dict(
    model_type="qwen3_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512, num_experts=16,
    num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False,
)


def build_demo_model(path: Path, seed: int = 0):
    """Save a random float32 Qwen3-MoE model (16 experts, 4 layers) in the Hub layout, with
    shards small enough that layers straddle them. Returns the in-memory model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = dict(DEMO_CONFIG)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path, max_shard_size="400KB")
    return model


def run_demo(directory: str | Path, log: Callable[[str], None] = print) -> dict:
    """Build, prune half the experts, verify byte for byte, and compare logits with the
    original model whose router is forbidden from choosing the pruned experts."""
    import torch
    from transformers import AutoModelForCausalLM

    from shardcut.oracle import forbid_pruned_experts

    directory = Path(directory)
    source, pruned = directory / "original", directory / "pruned"
    for p in (source, pruned):
        if p.exists():
            shutil.rmtree(p)
    directory.mkdir(parents=True, exist_ok=True)
    log(f"building a small Qwen3-MoE checkpoint in {source}")
    model = build_demo_model(source)
    E = DEMO_CONFIG["num_experts"]
    plan = Plan({str(i): list(range(i % 2, E, 2)) for i in range(DEMO_CONFIG["num_hidden_layers"])},
                {"criterion": "alternate", "source": {"model": str(source), "num_experts": E}})
    log(f"pruning {E} -> {E // 2} experts per layer into {pruned}")
    report = prune(source, pruned, plan)
    check = verify(pruned, source=source)
    ids = torch.randint(0, DEMO_CONFIG["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))
    small = AutoModelForCausalLM.from_pretrained(pruned).eval()
    with torch.no_grad():
        base = model(ids).logits
        with forbid_pruned_experts(model, plan.keep, E):
            masked = model(ids).logits
        got = small(ids).logits
    diff = (got - masked).abs().max().item()
    effect = (base - masked).abs().max().item()
    return {
        "source": source, "pruned": pruned, "experts_before": E, "experts_after": report.experts_after,
        "bytes_before": report.input_bytes, "bytes_after": report.output_bytes,
        "verify_ok": check.ok, "max_logit_diff": diff, "masking_effect": effect,
        "passed": check.ok and diff < 1e-4 and effect > 0,
    }
