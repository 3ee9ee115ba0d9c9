"""Header scale: every command on a checkpoint with Kimi-K2's real tensor population.

    .venv/bin/python bench/scale.py

61 layers (first dense), 384 experts, top-8, one MTP layer, INT4 compressed-tensors
companions (weight_packed, weight_scale, weight_shape) on every expert projection: about
210k tensors across 60 shards, with tiny shapes so it fits on a laptop disk. Times each
command as a user runs it (a fresh process), so import and per-tensor costs both show.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from measure import timed

from shardcut.format.checkpoint import INDEX_NAME
from shardcut.ops.synthetic import SyntheticSpec, write_synthetic_checkpoint
from shardcut.plans.plan import Plan

KIMI_K2 = SyntheticSpec(
    layers=61,
    first_dense=1,
    experts=384,
    top_k=8,
    hidden=64,
    moe_inter=32,
    dense_inter=64,
    vocab=256,
    mtp_layers=1,
    int4=True,
    group_size=32,
    shards=60,
    model_type="kimi_k2",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="shardcut-scale-"))
    src, out = work / "kimi-k2-shaped", work / "out"
    try:
        t0 = time.perf_counter()
        if not src.exists():
            write_synthetic_checkpoint(src, KIMI_K2)
        n_tensors = len(json.loads((src / INDEX_NAME).read_text())["weight_map"])
        print(f"generated {n_tensors} tensors in {KIMI_K2.shards} shards in {time.perf_counter() - t0:.1f} s")
        keep = list(range(0, 384, 2))
        plan = work / "plan.json"
        Plan({str(L): keep for L in range(1, 62)}).save(plan)
        cli = [sys.executable, "-m", "shardcut_cli.main"]
        steps = [
            ("inspect", [*cli, "inspect", str(src), "--json"]),
            ("prune --dry-run", [*cli, "prune", str(src), "-o", str(out), "--plan", str(plan), "--dry-run"]),
            ("prune", [*cli, "prune", str(src), "-o", str(out), "--plan", str(plan)]),
            ("verify", [*cli, "verify", str(out)]),
            ("verify --source", [*cli, "verify", str(out), "--source", str(src)]),
        ]
        print("| command | wall | peak RSS |\n|---|---|---|")
        for name, cmd in steps:
            wall, rss = timed(cmd)
            print(f"| {name} | {wall:.2f} s | {rss / 1e6:.0f} MB |", flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
