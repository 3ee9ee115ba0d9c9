"""Importers: score files other tools publish, turned into `shardcut-scores/1`.

Read with `torch.load(weights_only=True)` only (torch pickles) or as JSON, in any of these shapes:

- `{layer: {stat: tensor}}`: the REAP reference observer file (`observations_*.pt`), its
  layer-wise accumulator checkpoints (`block_NNN_metrics.pt`, one layer each; give their folder),
  or per-layer sums under shardcut's or the reference's names (mergeable), or per-layer values of
  named criteria (`reap`, `saliency`, `frequency`, ...: values only);
- `{layer: tensor}` or `{layer: [values]}`: one criterion's values per layer (named by the file,
  by `criterion`, or by a criterion word in the file name);
- a stacked `[L, E]` tensor or list of lists, rows in MoE-layer order;
- any of these wrapped as `{"scores": ...}`, `{"layers": ...}`, `{"state": ...}` (siblings such
  as `criterion` or `metric` name the values);
- llm-compressor's REAP saliency report (`{"saliency": [[...], ...], "count": [[...], ...]}`,
  layers in order): `reap` and `frequency` values;
- keep-lists: per layer the expert ids a published pruned model kept or pruned
  (`retained_experts`, `experts_kept_per_layer`, ... or a plan).

Layer keys may be layer indices (int or string), plan keys, or tensor-name spellings of the
model's own layer prefixes (`model.layers.3`, `backbone.layers.3.mixer`, `transformer.blocks.3`,
as the architecture table spells them). Keys 0..n-1 that are not the model's MoE layers but
count them (n of them) are read as positions in its MoE layer list, and the report says so;
`layer_offset` adds a fixed offset instead. A file whose shape fits several readings is refused
with the readings named (layer names: `shardcut.plans.layer_names`). torch is imported only for torch files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from shardcut.format.errors import ScoresError
from shardcut.format.text import span
from shardcut.moe.model import ModelInfo
from shardcut.plans.import_files import plain, read_json, torch_load
from shardcut.plans.keep_lists import keep_values, looks_like_keep_list, unwrap_keep_list
from shardcut.plans.layer_names import as_int, in_model_order, layer_key
from shardcut.plans.scores import FIELDS, GATE_APPLIED, GATE_SOFTMAX, GATE_UNKNOWN, Scores, check_replaceable_scores

FORMATS = ("auto", "reap-observer", "torch", "saliency-json", "keep-list", "llm-compressor")
LAYOUTS = ("layers-experts", "experts-layers")
# REAP reference observer statistics -> shardcut-scores/1 fields.
OBSERVER_FIELDS = {
    "count": "expert_frequency",
    "gate_sum": "weighted_expert_frequency_sum",
    "norm_sum": "ean_sum",
    "reap_sum": "weighted_ean_sum",
    "act_max": "max_activations",
}
OBSERVER_TOKENS = "total_tokens"
WRAPPER_KEYS = ("scores", "layers", "state", "observations", "results", "data", "saliency_scores")
NAME_KEYS = ("criterion", "metric", "score_name")
# Criterion names published files use -> shardcut's (higher = keep in every one of them).
VALUE_NAMES = {
    "reap": "reap",
    "saliency": "reap",
    "reap_score": "reap",
    "reap_scores": "reap",
    "ean_mean": "ean_mean",
    "ean_sum": "ean",
    "ean": "ean",
    "frequency": "frequency",
    "expert_frequency": "frequency",
    "count": "frequency",
    "weighted_frequency": "weighted_frequency",
    "weighted_expert_frequency_sum": "weighted_frequency",
}
IGNORED_STATS = (
    "pairwise_expert_frequency",
    "ttm_similarity_matrix",
    "routed_characteristic_activation",
    "characteristic_activation",
    "router_logit_similiarity",
    "topk_weights",
    "topk_ids",
    "mean_saliency",
)
_SUM_NAMES = {**{f: f for f in FIELDS}, **{v: k for k, v in OBSERVER_FIELDS.items()}, "expert_frequency": "count"}
_BLOCK_FILE = re.compile(r"block_(\d+)_metrics\.pt$")


@dataclass
class ImportReport:
    """What an import read and how it mapped onto the model."""

    source: Path
    format: str
    layers: list[str]
    num_experts: int
    has_sums: bool
    criterion: str | None = None  # for value-only imports
    notes: list[str] = field(default_factory=list)


def import_scores(
    path: str | Path,
    model: str | Path,
    *,
    fmt: str = "auto",
    criterion: str | None = None,
    layer_offset: int | None = None,
    layout: str | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> tuple[Scores, ImportReport]:
    """Read a published score file for `model` (folder or Hub id; headers only) as `Scores`.

    fmt: `auto` (by suffix and content), `torch` (= `reap-observer`: any torch shape above),
    `saliency-json`, `llm-compressor` or `keep-list`. A folder holds REAP accumulator
    checkpoints (`block_NNN_metrics.pt`).
    criterion: the criterion a file's bare values are, when the file does not say.
    layer_offset: added to integer layer keys (keys counted from 0 at the first MoE layer of a
    model whose first MoE layer is 3: offset 3). layout: `layers-experts` or `experts-layers`
    for a stacked square tensor.
    out: where to write the imported scores (`scores import -o`). Refused before anything is
    read when it is the file itself or lies inside the model folder, and when it exists unless
    `overwrite`.

    Example:
        >>> scores, report = import_scores("observations_1024_cosine-seed_42.pt", "Qwen/Qwen3-30B-A3B")
        >>> scores.save("scores.safetensors")
    """
    from shardcut.format.hub import open_model
    from shardcut.moe.model import describe

    path = Path(path)
    _check_request(path, model, fmt, layout, out, overwrite)
    ckpt = open_model(model)  # headers only: no shard data
    if out is not None:  # a Hub id resolves to a cache snapshot: never write inside it either
        from shardcut.format.durable import check_output

        check_output(out, [ckpt.root], overwrite=overwrite, what="score file")
    info = describe(ckpt)
    ctx = _Context(info, path, criterion, layer_offset, layout)
    scores, report = _read(path, fmt, ctx)
    report.notes = ctx.notes + report.notes
    _record_origin(scores, report, path, model, ckpt, info)
    scores.validate(path)
    if out is not None:
        scores.save(out)
    return scores, report


def _check_request(
    path: Path, model: str | Path, fmt: str, layout: str | None, out: str | Path | None, overwrite: bool
) -> None:
    """Before anything is read: the output is allowed, the file exists, the options are known."""
    from shardcut.format.durable import check_output
    from shardcut.format.hub import is_local

    if out is not None:
        check_output(out, [path, model if is_local(model) else None], overwrite=overwrite, what="score file")
        check_replaceable_scores(out)
    if not path.exists():
        raise ScoresError("file not found", path)
    if fmt not in FORMATS:
        raise ScoresError(f"unknown import format {fmt!r} (known: {', '.join(FORMATS)})")
    if layout is not None and layout not in LAYOUTS:
        raise ScoresError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")


def _read(path: Path, fmt: str, ctx: _Context) -> tuple[Scores, ImportReport]:
    """The file read by its format: a folder of accumulator checkpoints, a torch file, JSON."""
    if path.is_dir():
        return _from_accumulator_dir(ctx)
    if fmt in ("reap-observer", "torch") or (
        fmt == "auto" and path.suffix.lower() in (".pt", ".pth", ".bin", ".pkl", ".ckpt")
    ):
        return _from_object(plain(torch_load(path), path), ctx, "torch")
    data = read_json(path)
    if fmt == "keep-list" or (fmt == "auto" and looks_like_keep_list(data, ctx.info.num_experts)):
        return _from_keep_list(data, path, ctx.info, ctx)
    return _from_object(data, ctx, "llm-compressor" if fmt == "llm-compressor" else "json")


def _record_origin(scores: Scores, report: ImportReport, path: Path, model: str | Path, ckpt, info: ModelInfo) -> None:
    """The metadata naming the model, the imported file and the caveats the import noted."""
    from shardcut.format.checkpoint import layout_fingerprint

    scores.metadata.setdefault("model", str(model))
    scores.metadata.setdefault("architecture", info.arch.name)
    scores.metadata["num_experts"] = str(info.num_experts)
    scores.metadata["top_k"] = str(info.top_k)
    scores.metadata["imported_from"] = f"{report.format}:{path.name}"
    scores.metadata.setdefault("model_fingerprint", layout_fingerprint(ckpt))
    scores.metadata.setdefault("gate_convention", GATE_UNKNOWN)
    caveats = [n for n in report.notes if n.startswith(("gate", "act_max", "layer keys"))]
    if caveats:
        scores.metadata["caveats"] = json.dumps(caveats)


@dataclass
class _Context:
    info: ModelInfo
    path: Path
    criterion: str | None
    offset: int | None
    layout: str | None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# One reader for every shape


def _matrix(value: object) -> np.ndarray | None:
    """A 2-D float array from an array or a rectangular list of number lists, else None."""
    if isinstance(value, np.ndarray):
        return value if value.ndim == 2 else None
    if isinstance(value, list) and value and all(isinstance(r, (list, np.ndarray)) for r in value):
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            return None
        return arr if arr.ndim == 2 else None
    return None


def _is_stat_name(key: object) -> bool:
    return isinstance(key, str) and (
        key in _SUM_NAMES or key in VALUE_NAMES or key in IGNORED_STATS or key in (OBSERVER_TOKENS, "tokens")
    )


def _from_object(data: object, ctx: _Context, kind: str) -> tuple[Scores, ImportReport]:
    named = None
    fmt = "reap-observer" if kind == "torch" else "saliency-json"
    while isinstance(data, dict):  # {"scores": ..., "criterion": "reap"} and the like
        wrapper = next((k for k in WRAPPER_KEYS if k in data and isinstance(data[k], (dict, list, np.ndarray))), None)
        others = [k for k in data if k != wrapper and k not in NAME_KEYS]
        if wrapper is None or any(_is_stat_name(k) for k in others):
            break
        named = next((data[k] for k in NAME_KEYS if isinstance(data.get(k), str)), named)
        data = data[wrapper]
    if isinstance(data, dict) and data and all(_is_stat_name(k) for k in data):
        stacked = {k: m for k, v in data.items() if k not in IGNORED_STATS and (m := _matrix(v)) is not None}
        if not stacked:
            raise ScoresError(
                f"holds statistics {sorted(map(str, data))} but no per-layer, per-expert values", ctx.path
            )
        rows = {k: _rows(v, ctx, f"{k!r}") for k, v in stacked.items()}
        keys = next(iter(rows.values()))[0]
        if any(r[0] != keys for r in rows.values()):
            raise ScoresError("its statistics cover different layer counts", ctx.path)
        per_layer: dict[str, object] = {key: {stat: r[1][i] for stat, r in rows.items()} for i, key in enumerate(keys)}
        if kind == "llm-compressor" or ("saliency" in stacked and not (set(stacked) & set(OBSERVER_FIELDS.values()))):
            fmt = "llm-compressor"
            ctx.notes.append(
                "llm-compressor saliency report: 'saliency' is its REAP score (mean over routed tokens of "
                "the applied top-k gate times ||f_j(x)||), 'count' its routed tokens"
            )
    else:
        matrix = _matrix(data)
        if matrix is not None:
            keys, layer_rows = _rows(matrix, ctx, "the stacked tensor")
            per_layer = dict(zip(keys, layer_rows, strict=True))
        else:
            per_layer = _layer_entries(data, ctx, "the file")
    keys = list(per_layer)
    sample = per_layer[keys[0]]
    if isinstance(sample, dict):
        if kind == "torch" and set(OBSERVER_FIELDS.values()) & set(sample):
            return _observer_sums(cast("dict[str, dict]", per_layer), ctx)  # a dict per layer, as the first
        sums = {_SUM_NAMES[k] for k in sample if k in _SUM_NAMES}
        if set(FIELDS) <= sums:
            return _generic_sums(cast("dict[str, dict]", per_layer), ctx, fmt)
        return _values(per_layer, ctx, fmt, None)
    return _values(per_layer, ctx, fmt, named)


def _rows(matrix: np.ndarray, ctx: _Context, what: str) -> tuple[list[str], list[np.ndarray]]:
    """Plan keys and per-layer rows of a stacked `[L, E]` (or `[E, L]`) array, rows in MoE-layer order."""
    E = ctx.info.num_experts
    main = [layer.key for layer in ctx.info.layers if not layer.mtp]
    every = [layer.key for layer in ctx.info.layers]
    a, b = matrix.shape
    readings = []
    for keys in ({len(main): main, len(every): every}).values():
        if a == len(keys) and b == E:
            readings.append(("layers-experts", keys, matrix))
        if a == E and b == len(keys):
            readings.append(("experts-layers", keys, matrix.T))
    if ctx.layout:
        readings = [r for r in readings if r[0] == ctx.layout]
    if not readings:
        raise ScoresError(
            f"{what} has shape {[a, b]}; the model has {len(main)} MoE layers"
            + (f" ({len(every)} with MTP)" if len(every) != len(main) else "")
            + f" of {E} experts (scores of another model?)",
            ctx.path,
        )
    if len({r[0] for r in readings}) > 1:
        raise ScoresError(
            f"{what} has shape {[a, b]}, which reads both as [layers, experts] and as [experts, "
            "layers]; say which with layout layers-experts or layout experts-layers",
            ctx.path,
            params=("layout",),
        )
    name, keys, rows = readings[0]
    if name == "experts-layers":
        ctx.notes.append(f"{what} read as [experts, layers] (shape {[a, b]})")
    return list(keys), [np.asarray(r, dtype=np.float64) for r in rows]


def _layer_entries(data: object, ctx: _Context, what: str) -> dict[str, object]:
    """`{plan key: entry}` in model order from a layer mapping or a list in MoE-layer order."""
    info, path = ctx.info, ctx.path
    if isinstance(data, list):
        main = [layer.key for layer in info.layers if not layer.mtp]
        every = [layer.key for layer in info.layers]
        for keys in (main, every):
            if len(data) == len(keys):
                return dict(zip(keys, data, strict=True))
        raise ScoresError(
            f"{what} is a list of {len(data)} layers but the model has {len(main)} MoE layers"
            + (f" ({len(every)} with MTP)" if len(every) != len(main) else ""),
            path,
        )
    if not isinstance(data, dict) or not data:
        raise ScoresError(
            f"{what} must map layers to values (or list them in MoE-layer order); got {type(data).__name__}", path
        )
    raw = list(data)
    if ctx.offset is not None:
        ints = [i for i in map(as_int, raw) if i is not None]
        if len(ints) < len(raw):
            raise ScoresError("layer_offset needs integer layer keys", path, params=("layer_offset",))
        mapped = {str(i + ctx.offset): data[k] for i, k in zip(ints, raw, strict=True)}
        ctx.notes.append(f"layer keys: +{ctx.offset} added to every key ({raw[0]} -> {int(ints[0]) + ctx.offset})")
        return in_model_order(mapped, info, path)
    mapped = {}
    for k in raw:
        key = layer_key(k, info, path)
        if key in mapped:
            raise ScoresError("a layer appears twice", path)
        mapped[key] = data[k]
    ints = sorted(i for i in (as_int(k) for k in raw) if i is not None)
    main = [layer.key for layer in info.layers if not layer.mtp]
    every = [layer.key for layer in info.layers]
    foreign = [k for k in mapped if k not in info.layer_by_key]
    if foreign and len(ints) == len(raw) and ints == list(range(len(raw))) and len(raw) in (len(main), len(every)):
        keys = main if len(raw) == len(main) else every
        by_pos = {keys[i]: data[k] for k in raw if (i := as_int(k)) is not None}  # all are here
        ctx.notes.append(
            f"layer keys 0..{len(raw) - 1} are not the model's MoE layers ({span(keys)}); read as "
            f"positions in its MoE layer list: 0 -> {keys[0]}, {len(raw) - 1} -> {keys[len(raw) - 1]}"
        )
        return in_model_order(by_pos, info, path)
    return in_model_order(mapped, info, path)


# ---------------------------------------------------------------------------------------------
# Entries -> Scores


def _vec(value: object, E: int, what: str, path: Path) -> np.ndarray:
    if isinstance(value, np.ndarray):
        arr = value.astype(np.float64).reshape(-1)
        if arr.shape != (E,):
            raise ScoresError(f"{what}: {arr.size} experts, the model has {E} (scores of another model?)", path)
        if np.isnan(arr).any():
            raise ScoresError(f"{what} holds NaN", path)
        return arr
    return _vector(value, E, what, path)


def _observer_sums(per_layer: dict[str, dict], ctx: _Context) -> tuple[Scores, ImportReport]:
    E, path = ctx.info.num_experts, ctx.path
    keys = list(per_layer)
    scores = Scores.zeros(keys, E)
    for r, key in enumerate(keys):
        stats = per_layer[key]
        if not isinstance(stats, dict):
            raise ScoresError(f"layer {key}: expected a dict of statistics, got {type(stats).__name__}", path)
        missing = [name for name in (*OBSERVER_FIELDS.values(), OBSERVER_TOKENS) if name not in stats]
        if missing:
            raise ScoresError(f"layer {key}: missing statistics {missing}", path)
        for ours, theirs in OBSERVER_FIELDS.items():
            arr = _vec(np.asarray(stats[theirs], dtype=np.float64), E, f"layer {key}: {theirs}", path)
            if ours == "act_max":
                arr = np.maximum(arr, 0.0)  # signed max in the reference; see the metadata note
            getattr(scores, ours)[r] = arr
        scores.tokens[r] = float(np.asarray(stats[OBSERVER_TOKENS]).reshape(-1)[0])
    scores.metadata.update(
        {
            "gate": "softmax(router logits), top-k renormalised when the reference run set renormalize_router_weights "
            "(the REAP reference's w_j(x), not necessarily the gate the layer applies)",
            "act_max": "REAP reference max_activations: the signed max element of f_j(x), clipped at 0 "
            "(shardcut's own files hold max |f_j(x)_i|)",
            "gate_convention": GATE_SOFTMAX,
        }
    )
    notes = [
        "act_max holds the reference's signed max element, clipped at 0, not max |f_j(x)_i|",
        "gate sums use the reference's softmax weights, not the router's applied gates for sigmoid routers",
    ]
    return scores, ImportReport(path, "reap-observer", keys, E, True, notes=notes)


def _generic_sums(per_layer: dict[str, dict], ctx: _Context, fmt: str) -> tuple[Scores, ImportReport]:
    E, path = ctx.info.num_experts, ctx.path
    keys = list(per_layer)
    scores = Scores.zeros(keys, E)
    for r, key in enumerate(keys):
        entry = per_layer[key]
        if not isinstance(entry, dict):
            raise ScoresError(f"layer {key}: expected an object of per-expert sums like layer {keys[0]}", path)
        got = {_SUM_NAMES[k]: v for k, v in entry.items() if k in _SUM_NAMES}
        missing = [f for f in FIELDS if f not in got]
        if missing:
            raise ScoresError(
                f"layer {key}: missing sums {missing} (names: {', '.join(FIELDS)} or the REAP reference's)", path
            )
        for f in FIELDS:
            getattr(scores, f)[r] = _vec(got[f], E, f"layer {key}: {f}", path)
        tok = entry.get("tokens", entry.get(OBSERVER_TOKENS, 0))
        scores.tokens[r] = float(tok) if isinstance(tok, (int, float)) else 0.0
    notes = [
        "per-expert sums: mergeable",
        "gate convention not recorded by the file: merging it with files of a known convention needs --force",
    ]
    return scores, ImportReport(path, fmt, keys, E, True, notes=notes)


def _values(per_layer: dict[str, object], ctx: _Context, fmt: str, named: str | None) -> tuple[Scores, ImportReport]:
    from shardcut.plans.select import ALIASES, CRITERIA

    E, path = ctx.info.num_experts, ctx.path
    keys = list(per_layer)
    sample = per_layer[keys[0]]
    if isinstance(sample, dict):  # per layer, several named criteria
        names: dict[str, str] = {}
        for k in sample:  # the first spelling of each criterion wins
            if k in VALUE_NAMES and VALUE_NAMES[k] not in names.values():
                names[k] = VALUE_NAMES[k]
        if not names:
            raise ScoresError(
                f"layer {keys[0]}: holds {sorted(map(str, sample))}, neither the sums "
                f"({', '.join(FIELDS)}) nor a known criterion ({', '.join(sorted(VALUE_NAMES))})",
                path,
            )
        values = {
            ours: np.stack(
                [
                    _vec(
                        v.get(theirs) if isinstance(v := per_layer[k], dict) else None,
                        E,
                        f"layer {k}: {theirs}",
                        path,
                    )
                    for k in keys
                ]
            )
            for theirs, ours in names.items()
        }
    else:
        name = ctx.criterion or named or _name_from_file(path)
        if not name:
            raise ScoresError(
                "the file does not name its criterion; give it (e.g. criterion reap)", path, params=("criterion",)
            )
        if not (ctx.criterion or named):
            ctx.notes.append(f"criterion {name!r} taken from the file name")
        name = ALIASES.get(str(name), VALUE_NAMES.get(str(name), str(name)))
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ScoresError(f"criterion name {name!r} must be letters, digits, '_' or '-'", path)
        if name == "random":
            raise ScoresError("'random' is computed, not imported", path)
        values = {name: np.stack([_vec(per_layer[k], E, f"layer {k}", path) for k in keys])}
    for name, arr in values.items():
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ScoresError(f"{name} values hold NaN, infinite or negative values", path)
    criteria = list(values)
    notes = [
        f"only {', '.join(map(repr, criteria))} values, no sums: plan with criterion {criteria[0]}; "
        "merging is impossible"
    ]
    notes += [
        f"{n!r} is not one of shardcut's criteria; it is kept under its own name" for n in criteria if n not in CRITERIA
    ]
    meta = {"criterion": criteria[0]}
    if fmt == "llm-compressor":
        meta["gate_convention"] = GATE_APPLIED
    scores = Scores.from_values(keys, values, meta)
    return scores, ImportReport(path, fmt, keys, E, False, criteria[0], notes)


def _name_from_file(path: Path) -> str | None:
    words = re.split(r"[^a-z0-9]+", path.stem.lower())
    found = [VALUE_NAMES[w] for w in words if w in VALUE_NAMES]
    return found[0] if len(set(found)) == 1 else None


def _from_accumulator_dir(ctx: _Context) -> tuple[Scores, ImportReport]:
    """A folder of the REAP reference's layer-wise checkpoints (`block_NNN_metrics.pt`, one layer's
    `{stat: tensor or running-mean tracker}` each; NNN the decoder layer index)."""
    files = sorted(p for p in ctx.path.iterdir() if _BLOCK_FILE.search(p.name))
    if not files:
        raise ScoresError("folder holds no REAP accumulator checkpoints (block_NNN_metrics.pt)", ctx.path)
    state = {}
    for f in files:
        entry = plain(torch_load(f), f)
        if isinstance(entry, dict) and entry and (m := _BLOCK_FILE.search(f.name)):  # no MoE layer: {}
            state[int(m.group(1))] = entry
    scores, report = _from_object(state, ctx, "torch")
    report.format = "reap-accumulators"
    report.notes.append(f"{len(files)} block files read, {len(state)} with MoE statistics")
    return scores, report


# ---------------------------------------------------------------------------------------------
# Keep-lists


def _from_keep_list(data: object, path: Path, info: ModelInfo, ctx: _Context) -> tuple[Scores, ImportReport]:
    data, pruned_mode = unwrap_keep_list(data)
    per_layer = _layer_entries(data, ctx, "the keep-list")
    keys = list(per_layer)
    values, notes = keep_values(per_layer, info.num_experts, pruned_mode, path)
    scores = Scores.from_values(keys, {"keep": values}, {"criterion": "keep"})
    return scores, ImportReport(path, "keep-list", keys, info.num_experts, False, "keep", notes)


def _vector(value: object, E: int, what: str, path: Path) -> np.ndarray:
    if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise ScoresError(f"{what}: expected a list of {E} numbers", path)
    if len(value) != E:
        raise ScoresError(f"{what}: {len(value)} experts, the model has {E} (scores of another model?)", path)
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ScoresError(f"{what}: holds NaN, infinite or negative values", path)
    return arr
