"""Per-token values from next-token logits: the original's loss, and each variant's loss, KL and
top-1 agreement against it, in float64 on the device.

The original's log-partition (logsumexp) and top-1 are computed once per batch and shared by
every variant, and each variant takes a fixed number of passes over its [rows, vocabulary]
logits: KL(o || p) = sum_v p_o(v) * (lo(v) - lp(v)), with lo - lp = (x_o - x_p) - (lse_o - lse_p),
so identical logits give a KL of exactly 0. Rows go in chunks of at most `LOGIT_CHUNK` float64
elements, which bounds the buffers whatever the vocabulary and, small enough to stay in a CPU's
cache, keeps the several passes over a chunk from paying for fresh memory each time (with 128 MB
chunks the metrics took 3x as long on a CPU as with 2 MB ones: bench/eval.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

LOGIT_CHUNK = 1 << 18  # float64 elements (rows x vocabulary) at once: 2 MB


@dataclass
class OriginalTokens:
    """What every variant of one batch is compared with."""

    logits: torch.Tensor  # [rows, V] as the head returned them
    lse: torch.Tensor  # [rows] float64 logsumexp of the logits
    top1: torch.Tensor  # [rows] argmax
    targets: torch.Tensor  # [rows] next-token ids, -1 where the sample ends
    loss: np.ndarray  # per predicted token (targets >= 0), float64

    @property
    def chunk(self) -> int:
        return max(1, LOGIT_CHUNK // self.logits.shape[-1])


def _nll(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    has = targets >= 0
    picked = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1).double()
    return (lse - picked)[has].cpu().numpy()


def original_tokens(logits: torch.Tensor, targets: torch.Tensor) -> OriginalTokens:
    """The original's per-token loss, logsumexp and top-1 for `logits` [rows, V]."""
    rows = logits.shape[0]
    lse = torch.empty(rows, dtype=torch.float64, device=logits.device)
    chunk = max(1, LOGIT_CHUNK // logits.shape[-1])
    for a in range(0, rows, chunk):
        lse[a : a + chunk] = torch.logsumexp(logits[a : a + chunk].double(), dim=-1)
    return OriginalTokens(logits, lse, logits.argmax(-1), targets, _nll(logits, lse, targets))


def variant_tokens(o: OriginalTokens, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(KL(original || variant) per row, top-1 agreement per row, loss per predicted token)."""
    rows = logits.shape[0]
    kl = torch.empty(rows, dtype=torch.float64, device=logits.device)
    lse = torch.empty_like(kl)
    for a in range(0, rows, o.chunk):
        b = min(rows, a + o.chunk)
        xo, xp = o.logits[a:b].double(), logits[a:b].double()
        lse[a:b] = torch.logsumexp(xp, dim=-1)
        shift = (o.lse[a:b] - lse[a:b])[:, None]
        delta = xo.sub(xp).sub_(shift)  # log p_o - log p_p
        po = xo.sub_(o.lse[a:b, None]).exp_()  # in place: xo is not needed any more
        kl[a:b] = po.mul_(delta).sum(-1)
    agree = (logits.argmax(-1) == o.top1).cpu().numpy()
    return kl.cpu().numpy(), agree, _nll(logits, lse, o.targets)
