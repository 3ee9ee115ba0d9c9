"""Which samples a data set holds, compactly: a bottom-k sketch of per-sample token hashes.

Calibration records the sketch of its samples in the score file's metadata (`data_sketch`), so an
evaluation can tell whether its held-out text was in fact calibration text. A sample is identified
by its first `PREFIX_TOKENS` token ids (so the same text truncated at another `--max-length`
still matches); the sketch keeps the `SKETCH_SIZE` smallest distinct 48-bit hashes. Below the
sketch's largest hash, membership is exact: an evaluation sample hashing below it is a
calibration sample iff its hash is in the sketch, which estimates the overlap without storing
every hash (a sketch of fewer than SKETCH_SIZE samples is the exact set). No numpy or torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the module imports no numpy
    import numpy as np

SKETCH_FORMAT = "bottomk-sha256-48/1"
SKETCH_SIZE = 1024
PREFIX_TOKENS = 32


def sample_hash(ids: Sequence[int] | np.ndarray) -> int:
    """48 bits of sha256 over the sample's first PREFIX_TOKENS token ids (little-endian int64)."""
    head = b"".join(int(i).to_bytes(8, "little", signed=True) for i in list(ids[:PREFIX_TOKENS]))
    return int.from_bytes(hashlib.sha256(head).digest()[:6], "big")


def data_sketch(samples: Iterable[Sequence[int] | np.ndarray], size: int = SKETCH_SIZE) -> str:
    """`FORMAT;k;hex,hex,...`: the `size` smallest distinct sample hashes, ascending."""
    hashes = sorted({sample_hash(s) for s in samples})[:size]
    return f"{SKETCH_FORMAT};{size};" + ",".join(f"{h:012x}" for h in hashes)


@dataclass(frozen=True)
class Overlap:
    """How many held-out samples the sketch can judge (`compared`) and how many of those are
    calibration samples (`matched`); `fraction` estimates the share of all held-out samples."""

    compared: int
    matched: int
    samples: int

    @property
    def fraction(self) -> float:
        return self.matched / self.compared if self.compared else 0.0


def overlap(sketch: str, samples: Sequence[Sequence[int] | np.ndarray]) -> Overlap | None:
    """Compare held-out `samples` with a recorded sketch; None when the sketch is not one."""
    fmt, _, rest = sketch.partition(";")
    size_text, _, body = rest.partition(";")
    if fmt != SKETCH_FORMAT or not size_text.isdigit():
        return None
    try:
        recorded = {int(h, 16) for h in body.split(",") if h}
    except ValueError:
        return None
    full = len(recorded) >= int(size_text)
    limit = max(recorded) if full and recorded else float("inf")
    judged = [h for h in (sample_hash(s) for s in samples) if h <= limit]
    return Overlap(len(judged), sum(h in recorded for h in judged), len(samples))


def merge_sketches(sketches: Sequence[str]) -> str | None:
    """The sketch of the union of the sketched sets (the bottom-k of a union lies in the union of
    the bottom-k's), at the smallest size among them; None when one is not a sketch."""
    sizes, hashes = [], set()
    for sketch in sketches:
        fmt, _, rest = sketch.partition(";")
        size_text, _, body = rest.partition(";")
        if fmt != SKETCH_FORMAT or not size_text.isdigit():
            return None
        sizes.append(int(size_text))
        try:
            hashes |= {int(h, 16) for h in body.split(",") if h}
        except ValueError:
            return None
    size = min(sizes)
    return f"{SKETCH_FORMAT};{size};" + ",".join(f"{h:012x}" for h in sorted(hashes)[:size])
