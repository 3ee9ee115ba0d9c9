"""Keep-lists: per layer the expert ids a published pruned model kept (or pruned), or a plan's
`keep`, read as the criterion `keep` (1 for a kept expert, 0 for a pruned one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shardcut.format.errors import ScoresError

KEEP_KEYS = (
    "keep",
    "kept",
    "kept_experts",
    "retained_experts",
    "experts_kept_per_layer",
    "retained_experts_by_layer",
    "kept_experts_per_layer",
)
PRUNED_KEYS = (
    "pruned",
    "pruned_experts",
    "removed_experts",
    "dropped_experts",
    "pruned_experts_per_layer",
    "experts_pruned_per_layer",
)


def looks_like_keep_list(data: object, num_experts: int) -> bool:
    """A plan, a dict under a keep/pruned key, or a dict of id lists shorter than the expert count."""
    if not isinstance(data, dict):
        return False
    if data.get("format") == "shardcut-plan/1" or any(k in data for k in (*KEEP_KEYS, *PRUNED_KEYS)):
        return True
    lists = [v for v in data.values() if isinstance(v, list)]
    return (
        bool(lists)
        and len(lists) == len(data)
        and all(all(type(i) is int for i in v) and len(v) < num_experts for v in lists)
    )


def unwrap_keep_list(data: object) -> tuple[object, bool]:
    """The per-layer lists inside their wrapper, and whether they list pruned experts."""
    pruned_mode = False
    if isinstance(data, dict):
        inner = next((data[k] for k in KEEP_KEYS if k in data), None)
        if inner is None and (key := next((k for k in PRUNED_KEYS if k in data), None)):
            inner, pruned_mode = data[key], True
        data = inner if inner is not None else data
    if isinstance(data, dict) and data.get("format") == "shardcut-plan/1":
        data = data.get("keep")
    return data, pruned_mode


def keep_values(per_layer: dict[str, object], E: int, pruned_mode: bool, path: Path) -> tuple[np.ndarray, list[str]]:
    """`[layers, E]` keep values (1 kept, 0 pruned) of checked id lists, and the notes to report."""
    values = np.zeros((len(per_layer), E))
    sizes = set()
    for r, (key, ids) in enumerate(per_layer.items()):
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise ScoresError(f"layer {key}: expected a list of expert ids", path)
        bad = [i for i in ids if not 0 <= i < E]
        if bad:
            raise ScoresError(
                f"layer {key}: expert ids {bad[:5]} out of range 0..{E - 1} (model has {E} experts)", path
            )
        if len(set(ids)) != len(ids):
            raise ScoresError(f"layer {key}: duplicate expert ids", path)
        values[r, ids] = 1.0
        if pruned_mode:
            values[r] = 1.0 - values[r]
        sizes.add(int(values[r].sum()))
    notes = [
        "criterion 'keep' is 1 for a kept expert and 0 for a pruned one; "
        "plan with criterion keep (no sums: merging is impossible)"
    ]
    if len(sizes) == 1:
        notes.append(f"{sizes.pop()} experts kept per layer in the list")
    else:
        notes.append(f"layers keep different counts {sorted(sizes)}; a plan keeps one count everywhere")
    return values, notes
