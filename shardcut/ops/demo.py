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
from typing import Any

from shardcut.format.errors import OutputError
from shardcut.ops.verification import verify
from shardcut.rewrite.writer import prune

DEMO_CONFIG: dict[str, Any] = dict(
    model_type="qwen3_moe",
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
    num_experts=16,
    num_experts_per_tok=4,
    norm_topk_prob=True,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
DEMO_TEXT = "demo.txt"
DEMO_HELDOUT = "demo-heldout.txt"  # evaluation text, not calibration text
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
# The file that says a folder is the demo's own: only then may a rerun replace what it made there.
MARKER = ".shardcut-demo"
MARKER_TEXT = "made by `shardcut demo`; a rerun replaces original/, pruned/ and scores.safetensors here\n"
DEMO_OUTPUTS = ("original", "pruned", "scores.safetensors", "scores.safetensors.calib")


def demo_text_path() -> Path:
    """The bundled calibration text (a few KB of English prose and code, blank-line-separated)."""
    return Path(str(resources.files("shardcut") / "data" / DEMO_TEXT))


# Qwen2's pre-tokenizer (its tokenizer.json, verbatim): llama.cpp implements it as `qwen2`, so a
# tokenizer that splits this way converts to GGUF with the same pre-tokenization HF applies.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def build_tokenizer(path: str | Path, texts: Iterable[str], vocab_size: int):
    """Train a small byte-level BPE tokenizer (with merges and a chat template) on `texts` and save
    it to `path`, in the layout of Qwen2's: NFC, Qwen2's regex split, byte-level, BPE.

    Ids stay below `vocab_size`. With room for all 256 bytes (`vocab_size` > 260) any text encodes;
    below that the alphabet is the one seen in `texts` and other bytes map to `<unk>`. Every sample
    starts with `<s>`. Saved as a plain `PreTrainedTokenizerFast`, a class transformers 4 and 5
    both load (llama.cpp's converter reads tokenizers through transformers' AutoTokenizer).

    Example:
        >>> build_tokenizer("model/", ["hello world", "def f(): pass"], vocab_size=512)
    """
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if vocab_size > 256 + len(SPECIAL_TOKENS) else []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(list(texts), trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(
            f"the texts' alphabet alone needs {tok.get_vocab_size()} ids, more than vocab_size {vocab_size}"
        )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    # transformers 5 names its own backend class here, which transformers 4 (and so llama.cpp's pinned
    # converter environment) cannot resolve; the generic fast class loads in both.
    config_path = Path(path) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
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
    from shardcut.ops.calibration.stream import quiet_transformers

    model = AutoModelForCausalLM.from_config(config).eval()
    with quiet_transformers():
        model.save_pretrained(path, max_shard_size="400KB")
    build_tokenizer(path, demo_text_path().read_text().split("\n\n"), DEMO_CONFIG["vocab_size"])
    return model


def claim_demo_dir(directory: str | Path) -> Path:
    """Make `directory` the demo's folder, or refuse it before anything is written.

    Accepted: a missing or empty folder (it gets the MARKER file), or a folder carrying the marker
    of an earlier demo, whose own outputs (DEMO_OUTPUTS) are then removed. Refused with an
    OutputError: an existing file, or a non-empty folder without the marker (the user's files,
    e.g. a real `original/` checkpoint, are never deleted or overwritten).
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputError("exists and is not a folder: give the demo a new or empty folder", directory)
    if directory.is_dir() and not (directory / MARKER).is_file():
        if any(directory.iterdir()):
            raise OutputError(
                f"is not empty and was not made by `shardcut demo` (no {MARKER} file): "
                "give the demo a new or empty folder",
                directory,
            )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MARKER).write_text(MARKER_TEXT)
        for name in DEMO_OUTPUTS:
            p = directory / name
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
    except OSError as exc:
        raise OutputError(f"cannot prepare the demo folder ({exc.strerror or exc})", directory) from None
    return directory


def run_demo(directory: str | Path, log: Callable[[str], None] = print) -> dict:
    """Build, calibrate on the bundled text, prune half the experts by REAP score, verify byte
    for byte, and compare logits with the original model whose router is forbidden from
    choosing the pruned experts.

    `directory` must be new, empty, or an earlier demo's (see `claim_demo_dir`); anything else is
    refused with an OutputError before any work.
    """
    directory = claim_demo_dir(directory)
    import torch
    from transformers import AutoModelForCausalLM

    from shardcut.moe.oracle import forbid_pruned_experts
    from shardcut.ops.calibration.runner import calibrate
    from shardcut.ops.calibration.stream import quiet_transformers
    from shardcut.ops.planning import make_plan

    source, pruned, scores_path = directory / "original", directory / "pruned", directory / "scores.safetensors"
    log(f"building a small Qwen3-MoE checkpoint in {source}")
    model = build_demo_model(source)
    E = DEMO_CONFIG["num_experts"]
    log(f"calibrating on the bundled text {demo_text_path().name}")
    scores = calibrate(
        source,
        str(demo_text_path()),
        scores_path,
        max_length=128,
        device="cpu",
        dtype="float32",
        overwrite=True,  # the demo's own file in its own folder
        progress=lambda e: log(e.message) if e.kind == "info" else None,
    )
    plan, _ = make_plan(source, scores_path, ratio=0.5)
    log(f"pruning {E} -> {plan.num_experts} experts per layer (lowest REAP scores) into {pruned}")
    report = prune(source, pruned, plan)
    check = verify(pruned, source=source)
    from shardcut.ops.evaluation.runner import evaluate

    log("evaluating the pruned checkpoint against the original on held-out text (shardcut eval)")
    quality = evaluate(
        source,
        str(demo_text_path().with_name(DEMO_HELDOUT)),
        pruned=[pruned],
        scores=scores_path,
        max_length=128,
        device="cpu",
        dtype="float32",
    ).plans[0]
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
        "source": source,
        "pruned": pruned,
        "scores": scores_path,
        "experts_before": E,
        "experts_after": report.experts_after,
        "bytes_before": report.input_bytes,
        "bytes_after": report.output_bytes,
        "calibration_tokens": int(scores.tokens[0]),
        "verify_ok": check.ok,
        "max_logit_diff": diff,
        "masking_effect": effect,
        "passed": check.ok and diff < 1e-4 and effect > 0,
        "eval": quality,
    }
