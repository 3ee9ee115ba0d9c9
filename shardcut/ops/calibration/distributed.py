"""Data parallelism under `torchrun`: each rank runs its share of the samples through the same
layers; after every layer the per-expert sums are all-reduced (sums add, maxima take the max),
so every rank holds the full statistics and rank 0 alone writes files."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from shardcut.plans.scores import SUM_FIELDS, Scores


@dataclass
class Distributed:
    """This process's place in a `torchrun` job (rank 0 of 1 outside one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device | None = None

    @classmethod
    def from_env(cls, device: torch.device) -> Distributed:
        """Join the process group that `torchrun` describes in the environment (NCCL on CUDA, gloo on CPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=device)
        import torch.distributed as dist

        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank, world, local, local_world, device)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def reduce_row(self, scores: Scores, key: str) -> None:
        """Sum every rank's sums of layer `key` and take the maximum of `act_max`, in place."""
        if self.world <= 1:
            return
        import torch.distributed as dist

        r = scores.row(key)
        sums = np.concatenate([getattr(scores, f)[r] for f in SUM_FIELDS] + [scores.tokens[r : r + 1]])
        t = torch.tensor(sums, dtype=torch.float64, device=self.device)
        peaks = torch.tensor(scores.act_max[r], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        values = t.cpu().numpy()
        E = scores.num_experts
        for i, f in enumerate(SUM_FIELDS):
            getattr(scores, f)[r] = values[i * E : (i + 1) * E]
        scores.tokens[r] = values[-1]
        scores.act_max[r] = peaks.cpu().numpy()

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (so that all ranks take the same branch)."""
        if self.world <= 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """The element-wise sum over ranks of a float64 array (the array itself outside torchrun)."""
        if self.world <= 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().numpy().reshape(values.shape)

    def all_gather(self, values: np.ndarray) -> list[np.ndarray]:
        """Every rank's 1-D array (float64 or int64), in rank order, on every rank."""
        if self.world <= 1:
            return [values]
        import torch.distributed as dist

        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([len(values)], dtype=torch.int64, device=self.device))
        n = [int(s.item()) for s in sizes]
        mine = torch.zeros(max(n), dtype=torch.from_numpy(values[:0]).dtype, device=self.device)
        mine[: len(values)] = torch.from_numpy(np.ascontiguousarray(values)).to(self.device)
        got = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(got, mine)
        return [g[:k].cpu().numpy() for g, k in zip(got, n, strict=True)]
