"""Reading a published score file's bytes into plain Python and numpy, never running its code:
torch pickles with `torch.load(weights_only=True)` only (torch is imported only for them), JSON
as UTF-8. What the shapes mean is `score_import`'s business."""

from __future__ import annotations

import json
import re
from pathlib import Path

from shardcut.format.errors import ScoresError

# The REAP reference observer (.pt)


class _Tracker:
    """Stands in for the REAP reference's `reap.metrics.OnlineStatsTracker` while unpickling with
    weights_only=True: it receives the tracker's saved fields (tensors, ints, a dtype, a device)
    and runs no code of the file's."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def torch_load(path: Path):
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals([(_Tracker, "reap.metrics.OnlineStatsTracker")]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        m = re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)", text)
        if m:
            raise ScoresError(
                f"refused: the file needs arbitrary unpickling (it references {m.group(1)}, which "
                "torch.load(weights_only=True) does not allow); shardcut never runs code from a "
                "data file",
                path,
            ) from None
        detail = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("Unsupported")), "corrupt")
        raise ScoresError(f"not a readable torch file (weights-only unpickling failed: {detail[:120]})", path) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, zipfile errors... for non-torch files
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise ScoresError(f"not a readable torch file ({type(exc).__name__}: {first})", path) from None


def plain(obj: object, path: Path, depth: int = 0) -> object:
    """Tensors as float64 numpy arrays (NaN refused later, per statistic), trackers as their
    saved running mean, containers recursively; dict keys kept as they are."""
    import torch

    if depth > 8:
        raise ScoresError("nested too deeply to be a score file", path)
    if torch.is_tensor(obj):
        arr = obj.detach().to(torch.float64).cpu().numpy()
        return arr.item() if arr.ndim == 0 else arr
    if isinstance(obj, _Tracker):
        mean = getattr(obj, "mean", None)
        return plain(mean, path, depth + 1) if mean is not None else None
    if isinstance(obj, dict):
        return {k: plain(v, path, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, path, depth + 1) for v in obj]
    return obj


def read_json(path: Path) -> object:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ScoresError(f"not valid JSON ({type(exc).__name__})", path) from None
