"""The one type-and-range check of the config.json fields shardcut reads (issue 15).

A config is untrusted input: a field of the wrong type or out of range would otherwise end in
a ZeroDivisionError, a MemoryError, or worse a silent success on a structure the tensors do
not have. Every field any architecture entry reads (expert counts, top-k, layer counts, the
MoE layer rules' fields, group sizes) is checked here, in the config and every sub-config,
before anything else looks at it; so are `hidden_size` and `vocab_size` against the embedding
the checkpoint holds. Consistency of counts with the tensors (expert ids present, layers
present) is `shardcut.moe.model.describe`'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from shardcut.format.errors import CheckpointError

# Generous bounds: far above any real model, far below what would exhaust memory or time.
MAX_EXPERTS = 1 << 16
MAX_COUNT = 1 << 31
_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
_EMBEDDING = "model.embed_tokens.weight"


def _spellings() -> tuple[set[str], set[str], set[str]]:
    from shardcut.moe.architectures import ARCHITECTURES

    experts: set[str] = set()
    top_k: set[str] = set()
    layers: set[str] = set()
    for arch in ARCHITECTURES:
        experts.update(arch.expert_keys)
        top_k.update(arch.top_k_keys)
        layers.update(arch.layer_count_keys)
    return experts, top_k, layers


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sub_configs(config: Mapping, where: str = "", depth: int = 0) -> Iterator[tuple[str, Mapping]]:
    yield where, config
    if depth < 4:
        for key, value in config.items():
            if isinstance(value, Mapping) and key != "quantization_config":
                yield from _sub_configs(value, f"{where}{key}.", depth + 1)


def check_config(config: Mapping, path: str | Path, tensors: Mapping | None = None) -> None:
    """Raise CheckpointError (one line naming the field, its value and the rule) for the first
    field of `config` (read from `path`) of the wrong type or range, or contradicting `tensors`
    (name -> (shard, TensorInfo)), when given."""
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise CheckpointError(f"model_type must be a string, got {_show(model_type)}", path)
    experts, top_k, layer_counts = _spellings()

    def fail(where: str, key: str, value: object, rule: str) -> None:
        raise CheckpointError(f"{where}{key}={_show(value)}: {rule}", path)

    for where, cfg in _sub_configs(config):
        for key, value in cfg.items():
            if value is None:
                continue
            if key in experts or key in top_k:
                high = MAX_EXPERTS
                items = value if isinstance(value, list) and value else [value]
                if not all(_is_int(v) and 1 <= v <= high for v in items):
                    fail(where, key, value, f"must be an integer (or a list of integers) in 1..{high}")
            elif key in layer_counts:
                if _is_int(value):
                    if not 1 <= value <= MAX_COUNT:
                        fail(where, key, value, "must be a positive integer")
                elif key == "num_hidden_layers" or not (isinstance(value, (list, str)) and value):
                    fail(where, key, value, "must be a positive integer")
            elif key in ("hidden_size", "vocab_size", "decoder_sparse_step"):
                if not _is_int(value) or not 1 <= value <= MAX_COUNT:
                    fail(where, key, value, "must be a positive integer")
            elif key in (
                "first_k_dense_replace",
                "num_nextn_predict_layers",
                "n_group",
                "topk_group",
                "num_expert_group",
            ):  # a group count of 0 means no groups (read as 1)
                if not _is_int(value) or not 0 <= value <= MAX_COUNT:
                    fail(where, key, value, "must be a non-negative integer")
            elif key == "mlp_only_layers":
                if not isinstance(value, list) or not all(_is_int(v) and 0 <= v < MAX_COUNT for v in value):
                    fail(where, key, value, "must be a list of layer indices (non-negative integers)")
            elif key == "moe_layer_freq":
                ok = (
                    _is_int(value)
                    and 1 <= value <= MAX_COUNT
                    or isinstance(value, list)
                    and all(_is_int(v) and v >= 0 for v in value)
                )
                if not ok:
                    fail(where, key, value, "must be a positive integer or a list of non-negative integers")
    if tensors:
        _check_embedding(config, path, tensors)


def _check_embedding(config: Mapping, path: str | Path, tensors: Mapping) -> None:
    """hidden_size and vocab_size of the top-level config against a float embedding of the
    standard name (quantized or oddly named embeddings are not second-guessed)."""
    found = tensors.get(_EMBEDDING)
    if found is None:
        return
    info = found[1]
    shape = tuple(info.shape)
    if info.dtype not in _FLOAT_DTYPES or len(shape) != 2:
        return
    hidden, vocab = config.get("hidden_size"), config.get("vocab_size")
    if _is_int(hidden) and hidden != shape[1]:
        raise CheckpointError(
            f"hidden_size={hidden} but {_EMBEDDING} has shape {list(shape)} (hidden size {shape[1]})", path
        )
    # An embedding may have more rows than the vocabulary (padding), never fewer.
    if _is_int(vocab) and vocab > shape[0]:
        raise CheckpointError(f"vocab_size={vocab} but {_EMBEDDING} has shape {list(shape)} ({shape[0]} rows)", path)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
