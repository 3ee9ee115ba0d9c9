"""How samples are grouped into batches, and where each lands in the activation store."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Batch:
    """Samples run together: store rows `[start, start + rows)`, samples back to back."""

    start: int
    samples: list[int]
    lengths: list[int]

    @property
    def rows(self) -> int:
        return sum(self.lengths)

    @property
    def width(self) -> int:
        return max(self.lengths)


def make_batches(lengths: list[int], batch_tokens: int) -> list[Batch]:
    """Longest samples first, greedily packed so that samples x longest length <= batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[Batch] = []
    row = 0
    for i in order:
        b = batches[-1] if batches else None
        if b is None or (len(b.samples) + 1) * b.width > batch_tokens:
            b = Batch(row, [], [])
            batches.append(b)
        b.samples.append(i)
        b.lengths.append(lengths[i])
        row += lengths[i]
    return batches


def sample_rows(batches: list[Batch]) -> dict[int, tuple[int, int]]:
    """Sample index -> (first store row, length)."""
    out: dict[int, tuple[int, int]] = {}
    for b in batches:
        row = b.start
        for j, n in zip(b.samples, b.lengths, strict=True):
            out[j] = (row, n)
            row += n
    return out
