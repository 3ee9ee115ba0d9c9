"""The state a calibration run leaves next to its output, so `--resume` can continue it.

`SCORES.calib/` holds `state.json` (what run this is and the next step), `partial.safetensors`
(the accumulators of the finished layers) and, when activations spill to disk, the hidden
states of the last finished layer (`hidden.{0,1}.bin`, per rank under torchrun). After each
layer the activations are flushed first, then the partial scores, then `state.json`, each
written atomically, so a crash at any point resumes from a consistent finished layer. The
folder is removed when the score file is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from shardcut.calibration.distributed import Distributed
from shardcut.errors import ShardcutError
from shardcut.scores import Scores

STATE_FORMAT = "shardcut-calib-state/1"


def state_dir_for(out: Path) -> Path:
    """`scores.safetensors` -> `scores.safetensors.calib/`."""
    return out.with_name(out.name + ".calib")


def fingerprint_of(run) -> dict[str, str]:
    """What must be equal for a saved state to continue into identical results."""
    ckpt = run.ckpt
    weights = hashlib.sha256()
    for name in sorted(ckpt.tensors):
        _, t = ckpt.tensors[name]
        weights.update(f"{name}|{t.dtype}|{list(t.shape)};".encode())
    for shard in ckpt.shards:
        weights.update(f"{shard.path.name}:{shard.file_size};".encode())
    config = hashlib.sha256(json.dumps(ckpt.config, sort_keys=True).encode()).hexdigest()
    return {
        "model": f"{config[:16]}-{weights.hexdigest()[:16]}",
        "data": run.all_data.fingerprint()[:32],
        "data_spec": run.data,
        "max_length": str(run.max_length),
        "seed": str(run.seed),
        "dtype": str(run.torch_dtype).removeprefix("torch."),
        "shard": f"{run.shard_of[0]}/{run.shard_of[1]}" if run.shard_of else "all",
        "world_size": str(run.dist.world),
        "batch_tokens": str(run.budget_tokens),
    }


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


class RunState:
    """Reads and writes one run's state folder (only rank 0 writes shared files)."""

    def __init__(self, directory: Path, dist: Distributed):
        self.directory, self.dist = directory, dist
        self.rank_dir = directory / f"rank{dist.rank}" if dist.world > 1 else directory
        self.store_mode: str | None = None
        self.store_current = 0
        self.fingerprint: dict[str, str] = {}

    @property
    def state_path(self) -> Path:
        return self.directory / "state.json"

    @property
    def partial_path(self) -> Path:
        return self.directory / "partial.safetensors"

    def begin(self, fingerprint: dict[str, str], resume: bool, log: Callable[[str], None]) -> int:
        """The step to start at: the saved next step when resuming a matching run, else 0."""
        self.fingerprint = fingerprint
        if resume and self.state_path.exists():
            try:
                saved = json.loads(self.state_path.read_text())
            except (OSError, ValueError) as exc:
                raise ShardcutError(f"unreadable resume state ({exc})", self.state_path) from None
            if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
                raise ShardcutError(f"not a {STATE_FORMAT} file", self.state_path)
            old = saved.get("fingerprint") or {}
            for key, value in fingerprint.items():
                if old.get(key) != value:
                    raise ShardcutError(
                        f"resume state is from another run: {key} was {old.get(key)!r}, now {value!r} "
                        f"(delete {self.directory} or run without --resume)", self.state_path)
            self.store_mode = saved.get("store_mode")
            self.store_current = int(saved.get("store_current", 0))
            if self.store_mode == "disk" and not (self.rank_dir / f"hidden.{self.store_current}.bin").exists():
                raise ShardcutError("resume state names spilled activations that are gone", self.rank_dir)
            return int(saved.get("next_step", 0))
        if resume:
            log(f"no saved state in {self.directory}: starting from the beginning")
        elif self.directory.exists() and self.dist.rank == 0:
            log(f"discarding the unfinished run in {self.directory} (use --resume to continue one)")
            shutil.rmtree(self.directory)
        self.dist.barrier()
        return 0

    def load_scores(self) -> Scores | None:
        return Scores.load(self.partial_path) if self.partial_path.exists() else None

    def save(self, next_step: int, scores: Scores, store) -> None:
        """Persist the finished step (every rank calls it; the activations are committed already)."""
        self.dist.barrier()
        if self.dist.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            scores.save(self.partial_path)
            _write_json_atomic(self.state_path, {
                "format": STATE_FORMAT, "next_step": next_step, "fingerprint": self.fingerprint,
                "store_mode": store.mode, "store_current": store.current,
            })
        self.dist.barrier()

    def finish(self, scores: Scores, out: Path) -> None:
        """Write the score file and remove the state folder."""
        self.dist.barrier()
        if self.dist.rank == 0:
            scores.save(out)
            shutil.rmtree(self.directory, ignore_errors=True)
        self.dist.barrier()
