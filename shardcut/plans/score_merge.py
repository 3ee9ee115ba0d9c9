"""Merging score files (`scores merge`): weighted sums of every sum field, maxima of `act_max`,
the inputs' model, gate conventions and caveats checked and carried."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shardcut.format.errors import ScoresError
from shardcut.plans.scores import (
    SUM_FIELDS,
    Scores,
    check_replaceable_scores,
    file_caveats,
    gate_convention,
    model_mismatch,
)

_MERGE_IDENTITY = ("model", "revision", "architecture", "num_experts")  # metadata that must agree to merge


def parse_weighted(arg: str) -> tuple[Path, float]:
    """`PATH` or `PATH:WEIGHT` (as `scores merge` takes them) -> (path, weight).

    Example:
        >>> parse_weighted("code.safetensors:2")
        (PosixPath('code.safetensors'), 2.0)
    """
    path, sep, tail = arg.rpartition(":")
    if not sep or not path or Path(arg).exists():
        return Path(arg), 1.0
    try:
        weight = float(tail)
    except ValueError:
        return Path(arg), 1.0
    if not math.isfinite(weight) or weight <= 0:
        raise ScoresError(f"weight {tail!r} must be a positive number", path)
    return Path(path), weight


def merge_scores(
    items: Sequence[tuple[Scores, float]], names: Sequence[str] | None = None, *, force: bool = False
) -> Scores:
    """Merge score files: weighted sums of every sum field, element-wise maxima of `act_max`.

    All inputs must be of one model: same layer set, expert count, architecture, and the same
    model as far as the files can tell: their `model_fingerprint` (checkpoint layout, see
    `shardcut.format.checkpoint.layout_fingerprint`) and commit (`revision`, when both are commit
    hashes) must agree where recorded; only files recording neither fall back to comparing the
    model's name (a local folder and a Hub id of one name match). Inputs whose gates follow
    different conventions (`gate_convention`: the applied gates vs the REAP reference's softmax
    of the logits) are refused unless `force`, which records the mix as a caveat. Every input's
    caveats are kept. A weight w multiplies a file's sums (counts and tokens included), so
    `reap = reap_sum/count` becomes the w-weighted blend of the files' routed pairs.

    Example:
        >>> merged = merge_scores([(Scores.load("code.safetensors"), 2.0), (Scores.load("chat.safetensors"), 1.0)])
    """
    names = list(names or [f"input {i + 1}" for i in range(len(items))])
    _check_mergeable(items, names)
    gates, caveats = _gates_and_caveats(items, names, force)
    first, _ = items[0]
    merged = Scores.zeros(first.layers, first.experts_per_row)
    for s, w in items:
        rows = [s.row(k) for k in first.layers]
        for f in SUM_FIELDS:
            getattr(merged, f)[:] += w * getattr(s, f)[rows]
        merged.act_max[:] = np.maximum(merged.act_max, s.act_max[rows])
        merged.tokens += w * s.tokens[rows]
    merged.metadata = _merged_metadata(items, names, gates, caveats)
    merged.validate("merged scores")
    return merged


def _check_mergeable(items: Sequence[tuple[Scores, float]], names: list[str]) -> None:
    """Every input has sums, a positive weight and the first input's layers, counts and model."""
    if len(items) < 2:
        raise ScoresError("merge needs at least two score files")
    first, _ = items[0]
    for (s, w), name in zip(items, names, strict=True):
        if not s.has_sums:
            crit = ", ".join(s.values) or "?"
            raise ScoresError(f"holds only imported {crit!r} values and no sums: merging is impossible", name)
        if not (math.isfinite(w) and w > 0):
            raise ScoresError(f"weight {w} must be a positive number", name)
        if s.num_experts != first.num_experts:
            raise ScoresError(f"has {s.num_experts} experts per layer, {names[0]} has {first.num_experts}", name)
        if set(s.layers) != set(first.layers):
            only_a = sorted(set(first.layers) - set(s.layers))[:5]
            only_b = sorted(set(s.layers) - set(first.layers))[:5]
            raise ScoresError(
                f"layer sets differ from {names[0]} (missing {only_a or 'none'}, extra {only_b or 'none'})", name
            )
        other = next((k for k in first.layers if s.experts_of(k) != first.experts_of(k)), None)
        if other is not None:
            raise ScoresError(
                f"layer {other} has {s.experts_of(other)} experts, in {names[0]} {first.experts_of(other)}", name
            )
        problem = model_mismatch(first.metadata, s.metadata)
        if problem:
            raise ScoresError(f"scores of another model: {problem} (in {names[0]}: the first value)", name)


def _gates_and_caveats(
    items: Sequence[tuple[Scores, float]], names: list[str], force: bool
) -> tuple[dict[str, str], list[str]]:
    """Each input's gate convention, and the caveats the merged file carries (mixed conventions
    are refused unless `force`, which records them)."""
    gates = {name: gate_convention(s.metadata) for (s, _), name in zip(items, names, strict=True)}
    caveats: list[str] = []
    for s, _ in items:
        caveats += [c for c in file_caveats(s.metadata) if c not in caveats]
    if len(set(gates.values())) > 1:
        listed = "; ".join(f"{n}: {g}" for n, g in gates.items())
        if not force:
            raise ScoresError(
                f"the files weight their gate sums differently ({listed}); their reap and "
                "weighted_frequency values do not add up to one meaning. Merge anyway with "
                "force (the mix is recorded as a caveat)",
                params=("force",),
            )
        caveats.append(f"merged across gate conventions ({listed}); gate_sum and reap_sum mix them")
    return gates, caveats


def _merged_metadata(
    items: Sequence[tuple[Scores, float]], names: list[str], gates: dict[str, str], caveats: list[str]
) -> dict[str, str]:
    """The merged file's metadata: the model's identity, the totals every input records, the
    gate convention, the caveats, the union of the data sketches and what was merged from."""
    first, _ = items[0]
    kept = (*_MERGE_IDENTITY, "top_k", "model_fingerprint")
    meta = {k: v for k, v in first.metadata.items() if k in kept}
    for s, _ in items:
        for key in kept:
            if key in s.metadata:
                meta.setdefault(key, s.metadata[key])
    for key in ("samples", "tokens"):  # calibration totals, when every input records them
        counts = [s.metadata.get(key, "") for s, _ in items]
        if all(c.isdigit() for c in counts):
            meta[key] = str(sum(int(c) for c in counts))
    seqs = {s.metadata.get("sequences", "") for s, _ in items}
    if len(seqs) == 1 and "" not in seqs:
        meta["sequences"] = seqs.pop()
    meta["gate_convention"] = next(iter(gates.values())) if len(set(gates.values())) == 1 else "mixed"
    if caveats:
        meta["caveats"] = json.dumps(caveats)
    sketches = [s.metadata.get("data_sketch") or "" for s, _ in items]
    if all(sketches):  # the calibration samples of all inputs, for `shardcut eval`'s held-out check
        from shardcut.format.fingerprint import merge_sketches

        if (merged_sketch := merge_sketches(sketches)) is not None:
            meta["data_sketch"] = merged_sketch
    meta["merged_from"] = json.dumps(
        [
            {
                "file": name,
                "weight": w,
                **{
                    k: s.metadata[k]
                    for k in ("data", "samples", "tokens", "data_fingerprint", "sequences", "imported_from")
                    if k in s.metadata
                },
            }
            for (s, w), name in zip(items, names, strict=True)
        ]
    )
    return meta


def merge_score_files(
    inputs: Sequence[str | Path | tuple[str | Path, float]],
    out: str | Path,
    *,
    overwrite: bool = False,
    force: bool = False,
) -> Scores:
    """`scores merge`: load the files (each `PATH`, `PATH:WEIGHT` or `(path, weight)`), merge them
    (see `merge_scores`; `force` merges different gate conventions) and write the result to `out`.

    Before anything is read, `out` is refused when it is one of the inputs or lies inside an
    input folder, and when it exists unless `overwrite`.

    Example:
        >>> merge_score_files(["code.safetensors:2", "chat.safetensors"], "merged.safetensors")
    """
    from shardcut.format.durable import check_output

    parsed = [parse_weighted(str(a)) if not isinstance(a, tuple) else (Path(a[0]), float(a[1])) for a in inputs]
    check_output(out, [p for p, _ in parsed], overwrite=overwrite, what="merged score file")
    check_replaceable_scores(out)
    merged = merge_scores([(Scores.load(p), w) for p, w in parsed], [str(p) for p, _ in parsed], force=force)
    merged.save(out)
    return merged
