"""Importers: score files other tools publish, turned into `shardcut-scores/1`.

- the REAP reference observer file (`observations_*.pt`: a torch pickle of
  `{layer_index: {stat: tensor}}`), read with `torch.load(weights_only=True)` only;
- plain JSON saliency reports: per layer a list of per-expert values of one criterion, or per
  layer an object of per-expert sums (ours or the reference's names);
- keep-lists: per layer the expert ids a published pruned model kept (or pruned).

Every importer checks the layer keys and expert count against the model it is for. torch is
imported only by the observer importer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shardcut.errors import ShardcutError
from shardcut.model import ModelInfo
from shardcut.scores import FIELDS, Scores, check_replaceable_scores

FORMATS = ("auto", "reap-observer", "saliency-json", "keep-list")
# REAP reference observer statistics -> shardcut-scores/1 fields.
OBSERVER_FIELDS = {
    "count": "expert_frequency",
    "gate_sum": "weighted_expert_frequency_sum",
    "norm_sum": "ean_sum",
    "reap_sum": "weighted_ean_sum",
    "act_max": "max_activations",
}
OBSERVER_TOKENS = "total_tokens"
KEEP_KEYS = ("keep", "kept", "kept_experts", "retained_experts")
PRUNED_KEYS = ("pruned", "pruned_experts", "removed_experts", "dropped_experts")
_SUM_NAMES = {**{f: f for f in FIELDS}, **{v: k for k, v in OBSERVER_FIELDS.items()}}
_LAYER_KEY = re.compile(r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers?[._](\d+)(?:\..*)?$")
_MTP_KEY = re.compile(r"^mtp\.(?:layers\.)?(\d+)(?:\..*)?$")


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


def import_scores(path: str | Path, model: str | Path, *, fmt: str = "auto",
                  criterion: str | None = None, out: str | Path | None = None,
                  overwrite: bool = False) -> tuple[Scores, ImportReport]:
    """Read a published score file for `model` (folder or Hub id; headers only) as `Scores`.

    fmt: `auto` (by suffix and content), `reap-observer`, `saliency-json` or `keep-list`.
    criterion: the criterion a saliency JSON's values are, when the file does not say.
    out: where to write the imported scores (`scores import -o`). Refused before anything is
    read when it is the file itself or lies inside the model folder, and when it exists unless
    `overwrite`.

    Example:
        >>> scores, report = import_scores("observations_1024_cosine-seed_42.pt", "Qwen/Qwen3-30B-A3B")
        >>> scores.save("scores.safetensors")
    """
    from shardcut.durable import check_output
    from shardcut.hub import is_local, open_model
    from shardcut.model import describe

    path = Path(path)
    if out is not None:
        check_output(out, [path, model if is_local(model) else None], overwrite=overwrite, what="score file")
        check_replaceable_scores(out)
    if not path.is_file():
        raise ShardcutError("file not found", path)
    ckpt = open_model(model)  # headers only: no shard data
    if out is not None:  # a Hub id resolves to a cache snapshot: never write inside it either
        check_output(out, [ckpt.root], overwrite=overwrite, what="score file")
    info = describe(ckpt)
    if fmt not in FORMATS:
        raise ShardcutError(f"unknown import format {fmt!r} (known: {', '.join(FORMATS)})")
    data = None
    if fmt == "auto":
        if path.suffix.lower() in (".pt", ".pth", ".bin", ".pkl"):
            fmt = "reap-observer"
        else:
            data = _read_json(path)
            fmt = "keep-list" if _looks_like_keep_list(data, info.num_experts) else "saliency-json"
    if fmt == "reap-observer":
        scores, report = _from_observer(path, info)
    else:
        data = _read_json(path) if data is None else data
        if fmt == "keep-list":
            scores, report = _from_keep_list(data, path, info)
        else:
            scores, report = _from_saliency(data, path, info, criterion)
    scores.metadata.setdefault("model", str(model))
    scores.metadata.setdefault("architecture", info.arch.name)
    scores.metadata["num_experts"] = str(info.num_experts)
    scores.metadata["top_k"] = str(info.top_k)
    scores.metadata["imported_from"] = f"{report.format}:{path.name}"
    scores.validate(path)
    if out is not None:
        scores.save(out)
    return scores, report


# ---------------------------------------------------------------------------------------------
# REAP reference observer (.pt)


def _torch_load(path: Path):
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        m = re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)", text)
        if m:
            raise ShardcutError(f"refused: the file needs arbitrary unpickling (it references {m.group(1)}, which "
                                "torch.load(weights_only=True) does not allow); shardcut never runs code from a "
                                "data file", path) from None
        detail = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("Unsupported")), "corrupt")
        raise ShardcutError(f"not a readable torch file (weights-only unpickling failed: {detail[:120]})",
                            path) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, zipfile errors... for non-torch files
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise ShardcutError(f"not a readable torch file ({type(exc).__name__}: {first})", path) from None


def _from_observer(path: Path, info: ModelInfo) -> tuple[Scores, ImportReport]:
    import torch

    state = _torch_load(path)
    if not isinstance(state, dict) or not state:
        raise ShardcutError("expected a dict {layer_index: {statistic: tensor}} (a REAP observer file)", path)
    layers: dict[str, dict] = {}
    for raw_key, stats in state.items():
        key = _layer_key(raw_key, info, path)
        if not isinstance(stats, dict):
            raise ShardcutError(f"layer {raw_key}: expected a dict of statistics, got {type(stats).__name__}", path)
        layers[key] = stats
    keys = _check_layers(list(layers), info, path)
    scores = Scores.zeros(keys, info.num_experts)
    for r, key in enumerate(keys):
        stats = layers[key]
        missing = [name for name in (*OBSERVER_FIELDS.values(), OBSERVER_TOKENS) if name not in stats]
        if missing:
            raise ShardcutError(f"layer {key}: missing statistics {missing}", path)
        for ours, theirs in OBSERVER_FIELDS.items():
            value = stats[theirs]
            arr = value.detach().to(torch.float64).cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
            arr = np.asarray(arr, dtype=np.float64).reshape(-1)
            if arr.shape != (info.num_experts,):
                raise ShardcutError(f"layer {key}: {theirs} has {arr.size} experts, the model has "
                                    f"{info.num_experts} (scores of another model?)", path)
            if np.isnan(arr).any():
                raise ShardcutError(f"layer {key}: {theirs} holds NaN", path)
            if ours == "act_max":
                arr = np.maximum(arr, 0.0)  # signed max in the reference; see the metadata note
            getattr(scores, ours)[r] = arr
        tokens = stats[OBSERVER_TOKENS]
        scores.tokens[r] = float(tokens.item() if torch.is_tensor(tokens) else tokens)
    scores.metadata.update({
        "gate": "softmax(router logits), top-k renormalised when the reference run set renormalize_router_weights "
                "(the REAP reference's w_j(x), not necessarily the gate the layer applies)",
        "act_max": "REAP reference max_activations: the signed max element of f_j(x), clipped at 0 "
                   "(shardcut's own files hold max |f_j(x)_i|)",
    })
    notes = ["act_max holds the reference's signed max element, clipped at 0, not max |f_j(x)_i|",
             "gate sums use the reference's softmax weights, not the router's applied gates for sigmoid routers"]
    return scores, ImportReport(path, "reap-observer", keys, info.num_experts, True, notes=notes)


# ---------------------------------------------------------------------------------------------
# JSON: saliency reports and keep-lists


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ShardcutError(f"not valid JSON ({type(exc).__name__})", path) from None


def _layer_map(data: object, info: ModelInfo, path: Path, what: str) -> dict[str, object]:
    """`{layer: X}` from a mapping (any layer-key spelling) or a list in MoE-layer order."""
    if isinstance(data, dict):
        return {_layer_key(k, info, path): v for k, v in data.items()}
    if isinstance(data, list):
        main = [layer.key for layer in info.layers if not layer.mtp]
        every = [layer.key for layer in info.layers]
        for keys in (main, every):
            if len(data) == len(keys):
                return dict(zip(keys, data))
        raise ShardcutError(f"{what} is a list of {len(data)} layers but the model has {len(main)} MoE layers"
                            + (f" ({len(every)} with MTP)" if len(every) != len(main) else ""), path)
    raise ShardcutError(f"{what} must be an object mapping layers to values, or a list in MoE-layer order", path)


def _looks_like_keep_list(data: object, num_experts: int) -> bool:
    if not isinstance(data, dict):
        return False
    if data.get("format") == "shardcut-plan/1" or any(k in data for k in (*KEEP_KEYS, *PRUNED_KEYS)):
        return True
    lists = [v for v in data.values() if isinstance(v, list)]
    return bool(lists) and len(lists) == len(data) and all(
        all(type(i) is int for i in v) and len(v) < num_experts for v in lists)


def _from_keep_list(data: object, path: Path, info: ModelInfo) -> tuple[Scores, ImportReport]:
    E = info.num_experts
    pruned_mode = False
    if isinstance(data, dict):
        inner = next((data[k] for k in KEEP_KEYS if k in data), None)
        if inner is None and (key := next((k for k in PRUNED_KEYS if k in data), None)):
            inner, pruned_mode = data[key], True
        data = inner if inner is not None else data
    per_layer = _layer_map(data, info, path, "the keep-list")
    keys = _check_layers(list(per_layer), info, path)
    values = np.zeros((len(keys), E))
    sizes = set()
    for r, key in enumerate(keys):
        ids = per_layer[key]
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise ShardcutError(f"layer {key}: expected a list of expert ids", path)
        bad = [i for i in ids if not 0 <= i < E]
        if bad:
            raise ShardcutError(f"layer {key}: expert ids {bad[:5]} out of range 0..{E - 1} (model has {E} experts)",
                                path)
        if len(set(ids)) != len(ids):
            raise ShardcutError(f"layer {key}: duplicate expert ids", path)
        values[r, ids] = 1.0
        if pruned_mode:
            values[r] = 1.0 - values[r]
        sizes.add(int(values[r].sum()))
    notes = ["criterion 'keep' is 1 for a kept expert and 0 for a pruned one; "
             "plan with --criterion keep (no sums: merging is impossible)"]
    if len(sizes) == 1:
        notes.append(f"{sizes.pop()} experts kept per layer in the list")
    else:
        notes.append(f"layers keep different counts {sorted(sizes)}; a plan keeps one count everywhere")
    scores = Scores.from_values(keys, {"keep": values}, {"criterion": "keep"})
    return scores, ImportReport(path, "keep-list", keys, E, False, "keep", notes)


def _from_saliency(data: object, path: Path, info: ModelInfo, criterion: str | None) -> tuple[Scores, ImportReport]:
    from shardcut.select import ALIASES, CRITERIA

    E = info.num_experts
    named = None
    if isinstance(data, dict) and "layers" in data:
        named = data.get("criterion") or data.get("metric")
        data = data["layers"]
    per_layer = _layer_map(data, info, path, "the saliency report")
    keys = _check_layers(list(per_layer), info, path)
    sample = per_layer[keys[0]]
    if isinstance(sample, dict):  # per-expert sums: a full score file
        scores = Scores.zeros(keys, E)
        for r, key in enumerate(keys):
            entry = per_layer[key]
            if not isinstance(entry, dict):
                raise ShardcutError(f"layer {key}: expected an object of per-expert sums like layer {keys[0]}", path)
            got = {_SUM_NAMES[k]: v for k, v in entry.items() if k in _SUM_NAMES}
            missing = [f for f in FIELDS if f not in got]
            if missing:
                raise ShardcutError(f"layer {key}: missing sums {missing} (names: {', '.join(FIELDS)} or the "
                                    "REAP reference's)", path)
            for f in FIELDS:
                getattr(scores, f)[r] = _vector(got[f], E, f"layer {key}: {f}", path)
            tok = entry.get("tokens", entry.get(OBSERVER_TOKENS, 0))
            scores.tokens[r] = float(tok) if isinstance(tok, (int, float)) else 0.0
        return scores, ImportReport(path, "saliency-json", keys, E, True, notes=["per-expert sums: mergeable"])
    name = criterion or named
    if not name:
        raise ShardcutError("the report does not name its criterion; give it (e.g. --criterion reap)", path)
    name = ALIASES.get(str(name), str(name))
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ShardcutError(f"criterion name {name!r} must be letters, digits, '_' or '-'", path)
    if name == "random":
        raise ShardcutError("'random' is computed, not imported", path)
    values = np.stack([_vector(per_layer[k], E, f"layer {k}", path) for k in keys])
    notes = [f"only {name!r} values, no sums: plan with --criterion {name}; merging is impossible"]
    if name not in CRITERIA:
        notes.append(f"{name!r} is not one of shardcut's criteria; it is kept under its own name")
    scores = Scores.from_values(keys, {name: values}, {"criterion": name})
    return scores, ImportReport(path, "saliency-json", keys, E, False, name, notes)


def _vector(value: object, E: int, what: str, path: Path) -> np.ndarray:
    if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise ShardcutError(f"{what}: expected a list of {E} numbers", path)
    if len(value) != E:
        raise ShardcutError(f"{what}: {len(value)} experts, the model has {E} (scores of another model?)", path)
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ShardcutError(f"{what}: holds NaN, infinite or negative values", path)
    return arr


# ---------------------------------------------------------------------------------------------
# Layer keys


def _layer_key(raw: object, info: ModelInfo, path: Path) -> str:
    """A plan key from a layer index (int), a plan key, or a tensor-name-like spelling."""
    if isinstance(raw, bool):
        raise ShardcutError(f"layer key {raw!r} is not a layer", path)
    if isinstance(raw, int):
        return str(raw)
    if hasattr(raw, "item"):  # a 0-d tensor or numpy scalar
        return str(int(raw.item()))
    text = str(raw).strip()
    if text in info.layer_by_key or text.isdigit():
        return str(int(text)) if text.isdigit() else text
    m = _MTP_KEY.match(text)
    if m and f"mtp.{m.group(1)}" in info.layer_by_key:
        return f"mtp.{m.group(1)}"
    m = _LAYER_KEY.match(text)
    if m:
        return str(int(m.group(1)))
    raise ShardcutError(f"cannot read {text!r} as a layer (use the layer index, e.g. \"3\")", path)


def _check_layers(keys: list[str], info: ModelInfo, path: Path) -> list[str]:
    """The keys in model order; refuses layers the model lacks, duplicates and missing main layers."""
    if len(set(keys)) != len(keys):
        raise ShardcutError("a layer appears twice", path)
    model_keys = [layer.key for layer in info.layers]
    foreign = [k for k in keys if k not in info.layer_by_key]
    if foreign:
        shown = ", ".join(model_keys) if len(model_keys) <= 8 else f"{model_keys[0]}..{model_keys[-1]}"
        raise ShardcutError(f"layers {foreign[:5]} are not MoE layers of the model (its MoE layers: {shown}; "
                            "scores of another model?)", path)
    missing = [layer.key for layer in info.layers if not layer.mtp and layer.key not in keys]
    if missing:
        raise ShardcutError(f"no scores for MoE layers {missing[:5]} ({len(keys)} layers in the file, "
                            f"{len(model_keys)} in the model; scores of another model?)", path)
    return [k for k in model_keys if k in keys]
