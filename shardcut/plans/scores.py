"""The score file (`shardcut-scores/1`): per-layer, per-expert calibration sums in safetensors.

Every statistic is a sum or a max over routed (token, expert) pairs, so two runs on different
data or machines merge exactly. Criteria are derived from the sums, never stored (see
`shardcut.plans.select`). See DESIGN.md for the field table.

One exception: a file imported from a published report that holds only a criterion's values
(no sums) keeps them as `criterion.<name>` tensors with `sums = "absent"` in its metadata.
Such a file can rank experts by that criterion but cannot be merged or re-derived.

Provenance in the metadata: `gate_convention` (GATE_CONVENTIONS: the applied gates, or the REAP
reference's softmax of the logits), `criteria` (what the file can rank by), `model_fingerprint`
(the checkpoint's layout, `shardcut.format.checkpoint.layout_fingerprint`) and `revision` (its commit)
name the model, `data_fingerprint` and `sequences` (truncate or pack) the token streams, and
`caveats` (a JSON list) what a reader must know (an imported file's signed act_max, a forced
merge across gate conventions). Merge compares these, not the model's id string.

Stacks with their own expert count (Qwen3-Omni: thinker 8, talker 6) share one file: every
array is `[L, E]` with E the largest count, a layer with fewer experts has zeros in its
columns past its own count (zero is what "no token routed there" sums to, so every name keeps
its meaning), and `layer_experts` in the metadata lists each layer's count in `layer_keys`
order. Single-count files carry no `layer_experts` and read exactly as before.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shardcut.format.durable import atomic_write_bytes
from shardcut.format.errors import ScoresError, ShardcutError
from shardcut.plans.keys import PLAN_KEY_RULE, is_plan_key

SCORES_FORMAT = "shardcut-scores/1"
SUM_FIELDS = ("count", "gate_sum", "norm_sum", "reap_sum")
MAX_FIELDS = ("act_max",)
FIELDS = SUM_FIELDS + MAX_FIELDS
VALUE_PREFIX = "criterion."  # tensor name prefix of imported criterion values
_COMMIT = re.compile(r"[0-9a-f]{40}")
# How `gate_sum` / `reap_sum` were weighted (metadata `gate_convention`):
GATE_APPLIED = "applied"  # the gate the layer really applies (shardcut's calibration)
GATE_SOFTMAX = "softmax-logits"  # softmax of the router logits, top-k renormalised (the REAP reference)
GATE_UNKNOWN = "unknown"  # imported from a report that does not say
GATE_CONVENTIONS = {
    GATE_APPLIED: "the gates the layer applies (selection bias, group limits, renormalisation, scaling included)",
    GATE_SOFTMAX: "softmax of the raw router logits, top-k renormalised (the REAP reference's w_j(x))",
    GATE_UNKNOWN: "not recorded by the file it was imported from",
}


@dataclass
class Scores:
    """Accumulators for `len(layers)` MoE layers of `num_experts` experts each.

    layers: plan keys of the scored layers ("3", or "mtp.0" for a separate stack).
    Arrays are float64 `[L, E]`; `tokens` is `[L]`.
    layer_experts: each layer's own expert count where stacks differ (`None`: every layer has
        E); a row's columns past its count are padding and stay zero.
    values: imported criterion values `{name: [L, E]}` (higher = more important to keep).
    has_sums: False for a file holding only imported criterion values; its sum arrays are
        zeros in memory and are not written.

    Example:
        >>> s = Scores.zeros(["1", "2"], num_experts=8, metadata={"model": "org/name"})
        >>> s.accumulate("1", experts=[3, 5], gates=[0.6, 0.4], norms=[2.0, 1.0], peaks=[0.9, 0.3], tokens=1)
        >>> s.save("scores.safetensors")
        >>> Scores.zeros(["0", "talker.0"], num_experts=[8, 6]).experts_of("talker.0")
        6
    """

    layers: list[str]
    count: np.ndarray
    gate_sum: np.ndarray
    norm_sum: np.ndarray
    reap_sum: np.ndarray
    act_max: np.ndarray
    tokens: np.ndarray
    metadata: dict[str, str] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    has_sums: bool = True
    layer_experts: list[int] | None = None

    @property
    def num_experts(self) -> int:
        """The width of the arrays: the expert count, or the largest one where stacks differ."""
        return int(self.count.shape[1])

    @property
    def experts_per_row(self) -> list[int]:
        """Each scored layer's own expert count, in `layers` order."""
        return list(self.layer_experts) if self.layer_experts is not None else [self.num_experts] * len(self.layers)

    def experts_of(self, layer: str) -> int:
        """The expert count of scored layer `layer` (its row's columns past it are padding)."""
        return self.experts_per_row[self.row(layer)]

    def valid_mask(self) -> np.ndarray:
        """`[L, E]` booleans: True where the column is a real expert of the row's layer."""
        return np.arange(self.num_experts)[None, :] < np.array(self.experts_per_row)[:, None]

    @classmethod
    def zeros(
        cls, layers: list[str], num_experts: int | Sequence[int], metadata: dict[str, str] | None = None
    ) -> Scores:
        """Empty accumulators; `num_experts` is one count, or one per layer (stacks with their own)."""
        L = len(layers)
        per_layer = None
        if not isinstance(num_experts, int):
            per_layer = [int(n) for n in num_experts]
            if len(per_layer) != L:
                raise ScoresError(f"{len(per_layer)} expert counts for {L} layers")
            num_experts = max(per_layer, default=0)
            if all(n == num_experts for n in per_layer):
                per_layer = None  # one count: a plain single-count file
        z = lambda: np.zeros((L, num_experts), dtype=np.float64)  # noqa: E731
        return cls(
            list(layers),
            z(),
            z(),
            z(),
            z(),
            z(),
            np.zeros(L, dtype=np.float64),
            dict(metadata or {}),
            layer_experts=per_layer,
        )

    @classmethod
    def from_values(
        cls,
        layers: list[str],
        values: dict[str, np.ndarray],
        metadata: dict[str, str] | None = None,
        layer_experts: Sequence[int] | None = None,
    ) -> Scores:
        """A file of imported criterion values only (no sums, so no merge and no other criteria).

        `layer_experts`: each layer's expert count where stacks differ (the arrays are padded
        with zeros to the largest).

        Example:
            >>> Scores.from_values(["1", "2"], {"reap": np.array([[0.1, 0.3], [0.2, 0.0]])})
        """
        arrays = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
        if not arrays:
            raise ScoresError("no criterion values given")
        for name, a in arrays.items():
            if a.ndim != 2 or a.shape[0] != len(layers):
                raise ScoresError(f"criterion {name!r} has shape {list(a.shape)}, expected [{len(layers)}, E]")
        num_experts = next(iter(arrays.values())).shape[-1]
        scores = cls.zeros(layers, num_experts if layer_experts is None else layer_experts, metadata)
        if scores.num_experts != num_experts:
            raise ScoresError(
                f"criterion values hold {num_experts} experts per layer, the layers' largest "
                f"count is {scores.num_experts}"
            )
        scores.values, scores.has_sums = arrays, False
        return scores

    def row(self, layer: str) -> int:
        return self.layers.index(layer)

    def accumulate(self, layer: str, experts, gates, norms, peaks, tokens: int = 0) -> None:
        """Add routed (token, expert) pairs of one layer: expert ids, the applied gates g_j(x),
        ‖f_j(x)‖₂ and max_i |f_j(x)_i|, all 1-D of one length (any array-like); `tokens` is how
        many tokens the layer saw (each token contributes top_k pairs).

        Example:
            >>> s.accumulate("3", experts=ids.ravel(), gates=w.ravel(), norms=n.ravel(), peaks=p.ravel(), tokens=T)
        """
        r, E = self.row(layer), self.experts_of(layer)
        ids = np.asarray(experts, dtype=np.int64).ravel()
        g = np.asarray(gates, dtype=np.float64).ravel()
        n = np.asarray(norms, dtype=np.float64).ravel()
        p = np.abs(np.asarray(peaks, dtype=np.float64).ravel())
        if not (len(ids) == len(g) == len(n) == len(p)):
            raise ValueError("experts, gates, norms and peaks must have one length")
        if len(ids) and (ids.min() < 0 or ids.max() >= E):
            raise ValueError(f"expert ids must lie in 0..{E - 1}")
        self.count[r] += np.bincount(ids, minlength=E)
        self.gate_sum[r] += np.bincount(ids, weights=g, minlength=E)
        self.norm_sum[r] += np.bincount(ids, weights=n, minlength=E)
        self.reap_sum[r] += np.bincount(ids, weights=g * n, minlength=E)
        np.maximum.at(self.act_max[r], ids, p)
        self.tokens[r] += tokens

    def tensors(self) -> dict[str, np.ndarray]:
        """The arrays as stored in the file (copies: editing them leaves this object unchanged)."""
        numeric = [_layer_int(k) for k in self.layers]
        out = {}
        if self.has_sums:
            out = {name: np.array(getattr(self, name), dtype=np.float64) for name in FIELDS}  # copies
            out["tokens"] = np.array(self.tokens, dtype=np.float64)
        for name, arr in self.values.items():
            out[VALUE_PREFIX + name] = np.array(arr, dtype=np.float64)
        out["layers"] = np.array([n if n is not None else -1 for n in numeric], dtype=np.int64)
        return out

    def file_metadata(self) -> dict[str, str]:
        meta = {str(k): str(v) for k, v in self.metadata.items()}
        meta["format"] = SCORES_FORMAT
        meta["layer_keys"] = ",".join(self.layers)
        meta["num_experts"] = str(self.num_experts)
        if self.layer_experts is not None and any(n != self.num_experts for n in self.layer_experts):
            meta["layer_experts"] = ",".join(str(n) for n in self.layer_experts)
        else:
            meta.pop("layer_experts", None)
        if not self.has_sums:
            meta["sums"] = "absent"
        else:
            meta.pop("sums", None)
        meta["criteria"] = ",".join((["all (sums)"] if self.has_sums else []) + sorted(self.values))
        meta.setdefault("gate_convention", gate_convention(self.metadata))
        return meta

    def to_bytes(self) -> bytes:
        """The exact bytes `save` writes: a safetensors file with tensors in name order and sorted
        metadata, so equal contents give equal bytes (and one sha256)."""
        from shardcut.format.container import OutTensor, Piece, encode_header

        arrays = sorted(self.tensors().items())
        le = [np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")) for _, a in arrays]
        described = [
            OutTensor(name, "I64" if a.dtype.kind == "i" else "F64", a.shape, [Piece(Path(), 0, a.nbytes)])
            for (name, _), a in zip(arrays, le, strict=True)
        ]
        return encode_header(described, dict(sorted(self.file_metadata().items()))) + b"".join(a.tobytes() for a in le)

    def sha256(self) -> str:
        """sha256 of the file this object saves to (equal to the file's own hash after `save`)."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def save(self, path: str | Path) -> None:
        """Write the file atomically and durably (temp file, fsync, rename, fsync of the folder):
        a crash or power loss leaves the old file or the new one, never a torn or lost one."""
        self.validate(path)
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        """Read and validate a score file (safetensors only: nothing is ever unpickled)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        from shardcut.format.checkpoint import require_regular
        from shardcut.format.container import read_header

        path = Path(path)
        try:
            require_regular(path)  # by stat: a FIFO is never opened
        except FileNotFoundError:
            raise ScoresError("file not found", path) from None
        header = read_header(path)  # exact validation with shardcut's own errors first
        meta = dict(header.metadata or {})
        if meta.get("format") != SCORES_FORMAT:
            raise ScoresError(f"not a {SCORES_FORMAT} file (format={meta.get('format')!r})", path)
        has_sums = meta.pop("sums", "present") != "absent"
        value_names = [n for n in header.tensors if n.startswith(VALUE_PREFIX)]
        required = ["layers", *((*FIELDS, "tokens") if has_sums else ())]
        if not has_sums and not value_names:
            raise ScoresError("file says it has no sums but holds no criterion values either", path)
        for name in required + value_names:
            info = header.tensors.get(name)
            if info is None:
                raise ScoresError(f"missing tensor {name!r}", path)
            want = "I64" if name == "layers" else "F64"
            if info.dtype != want:
                raise ScoresError(f"tensor {name!r} has dtype {info.dtype}, expected {want}", path)
        try:
            arrays = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ScoresError(f"cannot read tensors ({exc})", path) from None
        layer_ids = arrays["layers"].tolist()
        keys = meta.pop("layer_keys", None)
        layers = keys.split(",") if keys else [str(i) for i in layer_ids]
        if len(layers) != len(layer_ids):
            raise ScoresError(f"metadata names {len(layers)} layers but 'layers' holds {len(layer_ids)}", path)
        per_layer = _parse_layer_experts(meta.pop("layer_experts", None), len(layers), path)
        values = {n[len(VALUE_PREFIX) :]: arrays[n] for n in value_names}
        if has_sums:
            a = arrays
            scores = cls(
                layers,
                a["count"],
                a["gate_sum"],
                a["norm_sum"],
                a["reap_sum"],
                a["act_max"],
                a["tokens"],
                meta,
                values,
                layer_experts=per_layer,
            )
        else:
            try:
                scores = cls.from_values(layers, values, meta, per_layer)
            except ShardcutError as exc:
                raise ScoresError(str(exc), path) from None
        scores.validate(path)
        return scores

    def validate(self, source: str | Path = "scores") -> None:
        L = len(self.layers)
        if L == 0:
            raise ScoresError("no layers", source)
        if len(set(self.layers)) != L:
            raise ScoresError("duplicate layer keys", source)
        odd = next((k for k in self.layers if not is_plan_key(k)), None)
        if odd is not None:
            raise ScoresError(f"layer key {odd!r} {PLAN_KEY_RULE}", source)
        shape = self.count.shape
        if len(shape) != 2 or shape[0] != L or shape[1] < 1:
            raise ScoresError(f"'count' has shape {list(shape)}, expected [{L}, E]", source)
        for name in FIELDS:
            a = getattr(self, name)
            if a.shape != shape:
                raise ScoresError(f"{name!r} has shape {list(a.shape)}, expected {list(shape)}", source)
            if not np.all(np.isfinite(a)) or np.any(a < 0):
                raise ScoresError(f"{name!r} holds NaN, infinite or negative values", source)
        if self.tokens.shape != (L,) or np.any(self.tokens < 0) or not np.all(np.isfinite(self.tokens)):
            raise ScoresError(f"'tokens' must be [{L}] finite and non-negative", source)
        for name, a in self.values.items():
            if not name or not all(c.isalnum() or c in "_-" for c in name):
                raise ScoresError(f"criterion name {name!r} must be letters, digits, '_' or '-'", source)
            if a.shape != shape:
                raise ScoresError(f"criterion {name!r} has shape {list(a.shape)}, expected {list(shape)}", source)
            if not np.all(np.isfinite(a)) or np.any(a < 0):
                raise ScoresError(f"criterion {name!r} holds NaN, infinite or negative values", source)
        declared = self.metadata.get("num_experts")
        if declared is not None and str(declared) != str(shape[1]):
            raise ScoresError(f"metadata num_experts={declared} but the arrays hold {shape[1]} experts", source)
        self._validate_padding(source)
        if self.has_sums:
            self._validate_sums(source)

    def _validate_sums(self, source: str | Path) -> None:
        """Counts and sums that cannot come from any run: an expert routed more often than the
        layer saw tokens (each token picks an expert at most once), or an expert with sums over
        routed tokens but no routed token."""
        seen = self.tokens > 0
        over = seen[:, None] & (self.count > self.tokens[:, None] * (1 + 1e-9))
        if over.any():
            r, j = (int(x) for x in np.argwhere(over)[0])
            raise ScoresError(
                f"layer {self.layers[r]}: 'count' of expert {j} is {self.count[r, j]:.6g}, more than "
                f"the layer's {self.tokens[r]:.6g} tokens",
                source,
            )
        # act_max is left out: the REAP reference's observer takes maxima over every token, routed or not.
        for name in ("gate_sum", "norm_sum", "reap_sum"):
            bad = (self.count == 0) & (getattr(self, name) != 0)
            if bad.any():
                r, j = (int(x) for x in np.argwhere(bad)[0])
                raise ScoresError(
                    f"layer {self.layers[r]}: expert {j} has {name} {getattr(self, name)[r, j]:.6g} "
                    "but 'count' 0 (sums without routed tokens)",
                    source,
                )

    def require_routed(self, source: str | Path = "scores") -> None:
        """Refuse to rank from a layer that saw no routed token: its scores are all zero, so any
        order would be a silent guess. Imported values-only files carry no counts and pass."""
        if not self.has_sums:
            return
        empty = [k for k, t, c in zip(self.layers, self.tokens, self.count, strict=True) if t == 0 and not c.any()]
        if empty:
            raise ScoresError(
                f"layers {', '.join(empty[:5])} saw no tokens (all-zero scores): nothing to rank experts by", source
            )

    def _validate_padding(self, source: str | Path) -> None:
        """Per-layer counts: one per layer, the largest fills the arrays, padding holds zeros."""
        if self.layer_experts is None:
            return
        per, L, E = self.layer_experts, len(self.layers), self.num_experts
        if len(per) != L or not all(isinstance(n, int) and 1 <= n <= E for n in per):
            raise ScoresError(f"layer_experts must be {L} counts in 1..{E}, got {per[:8]}", source)
        if max(per) != E:
            raise ScoresError(f"layer_experts {max(per)} at most, but the arrays hold {E} experts", source)
        padding = ~self.valid_mask()
        arrays = {
            **({n: getattr(self, n) for n in FIELDS} if self.has_sums else {}),
            **{f"criterion {n!r}": a for n, a in self.values.items()},
        }
        for name, a in arrays.items():
            bad = np.argwhere(padding & (a != 0))
            if len(bad):
                r, j = (int(x) for x in bad[0])
                raise ScoresError(
                    f"{name} holds a value for expert {j} of layer {self.layers[r]}, which has "
                    f"{per[r]} experts (layer_experts)",
                    source,
                )


def _parse_layer_experts(text: str | None, n_layers: int, path: Path) -> list[int] | None:
    if text is None:
        return None
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise ScoresError(
            f"metadata layer_experts {text[:60]!r} is not a comma-separated list of counts", path
        ) from None
    if len(counts) != n_layers:
        raise ScoresError(f"metadata layer_experts names {len(counts)} counts for {n_layers} layers", path)
    return counts


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gate_convention(meta: dict[str, str]) -> str:
    """How a file's gate sums were weighted (see GATE_CONVENTIONS); files written before the key
    existed are read by origin: shardcut's own calibration applied, a REAP observer import softmax."""
    if meta.get("gate_convention"):
        return meta["gate_convention"]
    origin = meta.get("imported_from", "")
    if origin.startswith("reap-observer"):
        return GATE_SOFTMAX
    return GATE_UNKNOWN if origin else GATE_APPLIED


def file_caveats(meta: dict[str, str]) -> list[str]:
    """The caveats a file carries (`caveats`, a JSON list of sentences)."""
    try:
        found = json.loads(meta.get("caveats", "[]"))
    except ValueError:
        found = [meta["caveats"]]
    return [str(c) for c in found] if isinstance(found, list) else [str(found)]


def model_mismatch(a: dict[str, str], b: dict[str, str]) -> str | None:
    """Why two metadata dicts are of different models, or None: by layout fingerprint and commit
    where both record them, by name only where neither can be compared."""
    fa, fb, ra, rb = a.get("model_fingerprint"), b.get("model_fingerprint"), a.get("revision"), b.get("revision")
    if fa and fb and fa != fb:
        return f"model_fingerprint is {fb!r}, not {fa!r}"
    commits = bool(ra and rb and _COMMIT.fullmatch(ra) and _COMMIT.fullmatch(rb))
    if ra and rb and ra != rb and (commits or not (fa and fb)):  # a branch name and a commit of one layout pass
        return f"revision is {rb!r}, not {ra!r}"
    for key in ("architecture", "num_experts"):
        if a.get(key) and b.get(key) and a[key] != b[key]:
            return f"{key} is {b[key]!r}, not {a[key]!r}"
    if (
        not (fa and fb)
        and not commits
        and a.get("model")
        and b.get("model")
        and _model_name(a["model"]) != _model_name(b["model"])
    ):
        return f"model is {b['model']!r}, not {a['model']!r} (neither fingerprint nor commit recorded in both)"
    return None


def provenance(ckpt, gate: str) -> dict[str, str]:
    """Metadata naming what produced a file's statistics: the gate convention and the model's
    layout fingerprint (its commit is recorded as `revision` where known)."""
    from shardcut.format.checkpoint import layout_fingerprint

    return {"gate_convention": gate, "model_fingerprint": layout_fingerprint(ckpt)}


def check_replaceable_scores(out: str | Path) -> None:
    """An existing output is replaced (with overwrite) only when it is a score file itself: a
    merge or an import knows no MODEL to protect, so `-o MODEL/model-00002-of-00009.safetensors
    --overwrite` must not replace a shard."""
    from shardcut.format.container import read_header
    from shardcut.format.errors import OutputError

    out = Path(out)
    if not out.exists():
        return
    try:
        ok = out.is_file() and (read_header(out).metadata or {}).get("format") == SCORES_FORMAT
    except (ShardcutError, OSError):
        ok = False
    if not ok:
        raise OutputError(f"exists and is not a {SCORES_FORMAT} file: refusing to replace it, even with overwrite", out)


def _model_name(model: str | None) -> str | None:
    """The model's name without folder or org: a local copy and its Hub id compare equal
    (`/data/Qwen3-30B-A3B` and `Qwen/Qwen3-30B-A3B`); revisions are compared separately."""
    return None if model is None else model.rstrip("/").rsplit("/", 1)[-1].split("@")[0]


def _layer_int(key: str) -> int | None:
    return int(key) if key.isdigit() else None
