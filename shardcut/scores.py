"""The score file (`shardcut-scores/1`): per-layer, per-expert calibration sums in safetensors.

Every statistic is a sum or a max over routed (token, expert) pairs, so two runs on different
data or machines merge exactly. Criteria are derived from the sums, never stored.
See DESIGN.md for the field table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shardcut.errors import ShardcutError

SCORES_FORMAT = "shardcut-scores/1"
SUM_FIELDS = ("count", "gate_sum", "norm_sum", "reap_sum")
MAX_FIELDS = ("act_max",)
FIELDS = SUM_FIELDS + MAX_FIELDS


@dataclass
class Scores:
    """Accumulators for `len(layers)` MoE layers of `num_experts` experts each.

    layers: plan keys of the scored layers ("3", or "mtp.0" for a separate stack).
    Arrays are float64 `[L, E]`; `tokens` is `[L]`.

    Example:
        >>> s = Scores.zeros(["1", "2"], num_experts=8, metadata={"model": "org/name"})
        >>> s.count[0, 3] += 1
        >>> s.save("scores.safetensors")
    """

    layers: list[str]
    count: np.ndarray
    gate_sum: np.ndarray
    norm_sum: np.ndarray
    reap_sum: np.ndarray
    act_max: np.ndarray
    tokens: np.ndarray
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return int(self.count.shape[1])

    @classmethod
    def zeros(cls, layers: list[str], num_experts: int, metadata: dict[str, str] | None = None) -> Scores:
        L = len(layers)
        z = lambda: np.zeros((L, num_experts), dtype=np.float64)  # noqa: E731
        return cls(list(layers), z(), z(), z(), z(), z(), np.zeros(L, dtype=np.float64), dict(metadata or {}))

    def row(self, layer: str) -> int:
        return self.layers.index(layer)

    def tensors(self) -> dict[str, np.ndarray]:
        numeric = [_layer_int(k) for k in self.layers]
        out = {name: np.ascontiguousarray(getattr(self, name), dtype=np.float64) for name in FIELDS}
        out["tokens"] = np.ascontiguousarray(self.tokens, dtype=np.float64)
        out["layers"] = np.array([n if n is not None else -1 for n in numeric], dtype=np.int64)
        return out

    def save(self, path: str | Path) -> None:
        """Write the file atomically (a crash never leaves a half-written score file)."""
        from safetensors.numpy import save_file

        self.validate(path)
        meta = {str(k): str(v) for k, v in self.metadata.items()}
        meta["format"] = SCORES_FORMAT
        meta["layer_keys"] = ",".join(self.layers)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(self.tensors(), str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        """Read and validate a score file (safetensors only: nothing is ever unpickled)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        from shardcut.container import read_header

        path = Path(path)
        header = read_header(path)  # exact validation with shardcut's own errors first
        meta = dict(header.metadata or {})
        if meta.get("format") != SCORES_FORMAT:
            raise ShardcutError(f"not a {SCORES_FORMAT} file (format={meta.get('format')!r})", path)
        for name in (*FIELDS, "tokens", "layers"):
            info = header.tensors.get(name)
            if info is None:
                raise ShardcutError(f"missing tensor {name!r}", path)
            want = "I64" if name == "layers" else "F64"
            if info.dtype != want:
                raise ShardcutError(f"tensor {name!r} has dtype {info.dtype}, expected {want}", path)
        try:
            arrays = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ShardcutError(f"cannot read tensors ({exc})", path) from None
        layer_ids = arrays["layers"].tolist()
        keys = meta.get("layer_keys")
        layers = keys.split(",") if keys else [str(i) for i in layer_ids]
        meta.pop("layer_keys", None)
        scores = cls(layers, *(arrays[n] for n in FIELDS), arrays["tokens"], meta)
        scores.validate(path)
        return scores

    def validate(self, source: str | Path = "scores") -> None:
        L = len(self.layers)
        if L == 0:
            raise ShardcutError("no layers", source)
        if len(set(self.layers)) != L:
            raise ShardcutError("duplicate layer keys", source)
        shape = self.count.shape
        if len(shape) != 2 or shape[0] != L or shape[1] < 1:
            raise ShardcutError(f"'count' has shape {list(shape)}, expected [{L}, E]", source)
        for name in FIELDS:
            a = getattr(self, name)
            if a.shape != shape:
                raise ShardcutError(f"{name!r} has shape {list(a.shape)}, expected {list(shape)}", source)
            if name in SUM_FIELDS and (not np.all(np.isfinite(a)) or np.any(a < 0)):
                raise ShardcutError(f"{name!r} holds NaN, infinite or negative values", source)
            if name in MAX_FIELDS and np.any(np.isnan(a)):
                raise ShardcutError(f"{name!r} holds NaN", source)
        if self.tokens.shape != (L,) or np.any(self.tokens < 0) or not np.all(np.isfinite(self.tokens)):
            raise ShardcutError(f"'tokens' must be [{L}] finite and non-negative", source)


def _layer_int(key: str) -> int | None:
    return int(key) if key.isdigit() else None
