"""Layer names as published score files spell them, read as the model's plan keys: layer
indices (int or string), plan keys (`mtp.0`, also with a tail, `mtp.0.mlp`), and tensor-name
spellings of the model's own layer prefixes from the architecture table (`model.layers.3`,
`backbone.layers.3.mixer`, `transformer.blocks.3`, `mtp.layers.0`; also without their leading
parts, `layers.3`). No family is named here: every spelling comes from the table entry.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path

import numpy as np

from shardcut.format.errors import ScoresError
from shardcut.format.text import span
from shardcut.moe.model import ModelInfo


def layer_key(raw: object, info: ModelInfo, path: Path) -> str:
    """A plan key from a layer index (int), a plan key, or a name spelled with one of the model's
    layer prefixes from the architecture table (`model.layers.3`, `backbone.layers.3.mixer`,
    `transformer.blocks.3`; also without their leading parts, `layers.3`)."""
    if isinstance(raw, bool):
        raise ScoresError(f"layer key {raw!r} is not a layer", path)
    if isinstance(raw, (int, np.integer)):
        return str(int(raw))
    text = str(raw).strip()
    if text in info.layer_by_key or text.isdigit():
        return str(int(text)) if text.isdigit() else text
    dotted = f".{text}."
    for layer in info.layers:  # the model's own spelling of each layer, whole or as a tail
        if text.startswith(layer.prefix) or f".{layer.prefix}".endswith(dotted):
            return layer.key
        if layer.stack.plan_prefix and text.startswith(f"{layer.key}."):  # a plan key with a tail: mtp.0.mlp
            return layer.key
    for layer in info.layers:  # another spelling of the same layer index under a known stack prefix
        for prefix in layer.stack.layer_prefixes:
            tail = prefix.rsplit(".", 1)[-1]
            m = re.match(rf"^(?:[\w]+\.)*{re.escape(tail)}\.(\d+)(?:\..*)?$", text)
            if m:
                return f"{layer.stack.plan_prefix}{int(m.group(1))}"
    raise ScoresError(f'cannot read {text!r} as a layer (use the layer index, e.g. "3")', path)


def check_layers(keys: list[str], info: ModelInfo, path: str | Path, unreached: Collection[str] = ()) -> list[str]:
    """The keys in model order; refuses layers the model lacks, duplicates and missing main layers
    (MTP layers may lack scores: `mtp_policy` decides them; so may the `unreached` layers, which a
    text-only calibration never routes through). Imports and `make_plan` check so."""
    if len(set(keys)) != len(keys):
        raise ScoresError("a layer appears twice", path)
    model_keys = [layer.key for layer in info.layers]
    foreign = [k for k in keys if k not in info.layer_by_key]
    if foreign:
        shown = span(model_keys, limit=8)
        raise ScoresError(
            f"layers {foreign[:5]} are not MoE layers of the model (its MoE layers: {shown}; scores of another model?)",
            path,
        )
    missing = [
        layer.key for layer in info.layers if not layer.mtp and layer.key not in keys and layer.key not in unreached
    ]
    if missing:
        raise ScoresError(
            f"no scores for MoE layers {missing[:5]} ({len(keys)} layers in the file, "
            f"{len(model_keys)} in the model; scores of another model?)",
            path,
        )
    return [k for k in model_keys if k in keys]


def in_model_order(mapped: dict[str, object], info: ModelInfo, path: Path) -> dict[str, object]:
    keys = check_layers(list(mapped), info, path)
    return {k: mapped[k] for k in keys}


def as_int(key: object) -> int | None:
    if isinstance(key, bool):
        return None
    if isinstance(key, (int, np.integer)):
        return int(key)
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    return None
