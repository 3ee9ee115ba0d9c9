"""`shardcut demo`: the whole pipeline offline on a small MoE model built on the spot.

Build a random Qwen3-MoE checkpoint with a tokenizer trained on the bundled text, calibrate it on
that text, plan half the experts away from the REAP scores, prune, verify byte for byte, and
compare the pruned model's logits with the original's whose router may not choose the pruned
experts (the DESIGN.md oracle).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path

from shardcut.rewrite import prune
from shardcut.verification import verify

DEMO_CONFIG = dict(
    model_type="qwen3_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512, num_experts=16,
    num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False,
)
DEMO_TEXT = "demo.txt"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def demo_text_path() -> Path:
    """The bundled calibration text (a few KB of English prose and code, blank-line-separated)."""
    return Path(str(resources.files("shardcut") / "data" / DEMO_TEXT))


def build_tokenizer(path: str | Path, texts: Iterable[str], vocab_size: int):
    """Train a small word-level tokenizer on `texts` and save it (with a chat template) to `path`.

    Ids stay below `vocab_size`; unknown words map to `<unk>` and every sample starts with `<s>`.

    Example:
        >>> build_tokenizer("model/", ["hello world", "def f(): pass"], vocab_size=512)
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                        show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def build_demo_model(path: Path, seed: int = 0):
    """Save a random float32 Qwen3-MoE model (16 experts, 4 layers) in the Hub layout, with
    shards small enough that layers straddle them, and a tokenizer trained on the bundled text.
    Returns the in-memory model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = dict(DEMO_CONFIG)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    from shardcut.calibration.stream import quiet_transformers

    model = AutoModelForCausalLM.from_config(config).eval()
    with quiet_transformers():
        model.save_pretrained(path, max_shard_size="400KB")
    build_tokenizer(path, demo_text_path().read_text().split("\n\n"), DEMO_CONFIG["vocab_size"])
    return model


def run_demo(directory: str | Path, log: Callable[[str], None] = print) -> dict:
    """Build, calibrate on the bundled text, prune half the experts by REAP score, verify byte
    for byte, and compare logits with the original model whose router is forbidden from
    choosing the pruned experts."""
    import torch
    from transformers import AutoModelForCausalLM

    from shardcut.calibration.runner import calibrate
    from shardcut.calibration.stream import quiet_transformers
    from shardcut.oracle import forbid_pruned_experts
    from shardcut.select import make_plan

    directory = Path(directory)
    source, pruned, scores_path = directory / "original", directory / "pruned", directory / "scores.safetensors"
    for p in (source, pruned):
        if p.exists():
            shutil.rmtree(p)
    directory.mkdir(parents=True, exist_ok=True)
    log(f"building a small Qwen3-MoE checkpoint in {source}")
    model = build_demo_model(source)
    E = DEMO_CONFIG["num_experts"]
    log(f"calibrating on the bundled text {demo_text_path().name}")
    scores = calibrate(source, str(demo_text_path()), scores_path, max_length=128, device="cpu", dtype="float32",
                       overwrite=True,  # the demo's own file in its own folder
                       progress=lambda e: log(e.message) if e.kind == "info" else None)
    plan, _ = make_plan(source, scores_path, ratio=0.5)
    log(f"pruning {E} -> {plan.num_experts} experts per layer (lowest REAP scores) into {pruned}")
    report = prune(source, pruned, plan)
    check = verify(pruned, source=source)
    ids = torch.randint(0, DEMO_CONFIG["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))
    with quiet_transformers():
        small = AutoModelForCausalLM.from_pretrained(pruned).eval()
    with torch.no_grad():
        base = model(ids).logits
        with forbid_pruned_experts(model, plan.keep, E):
            masked = model(ids).logits
        got = small(ids).logits
    diff = (got - masked).abs().max().item()
    effect = (base - masked).abs().max().item()
    return {
        "source": source, "pruned": pruned, "scores": scores_path, "experts_before": E,
        "experts_after": report.experts_after, "bytes_before": report.input_bytes, "bytes_after": report.output_bytes,
        "calibration_tokens": int(scores.tokens[0]), "verify_ok": check.ok, "max_logit_diff": diff,
        "masking_effect": effect, "passed": check.ok and diff < 1e-4 and effect > 0,
    }
