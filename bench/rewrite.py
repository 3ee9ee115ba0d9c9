"""Rewrite throughput and memory of `shardcut prune` against `cp`, measured side by side.

    .venv/bin/python bench/rewrite.py                 # 4 GB DeepSeek-V3-shaped bf16 checkpoint
    .venv/bin/python bench/rewrite.py --size-gb 1 --size-gb 8 --runs 3

For each input size: generate a synthetic checkpoint (shardcut.ops.synthetic), prune 50% of the
experts with `shardcut prune` in a subprocess (with and without the write verification), and
in the same run `cp` the output's bytes and the whole input, each followed by `sync` (prune
fsyncs its shards, so cp must reach the disk too). Reports medians of `--runs` runs, the ratio
to `cp` of the bytes written, and the peak RSS of the prune process (from wait4).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import timed

from shardcut.ops.synthetic import SyntheticSpec, write_synthetic_checkpoint
from shardcut.plans.plan import Plan


def spec_for(size_gb: float) -> SyntheticSpec:
    # DeepSeek-V3 proportions scaled down: 64 experts, grouped routing, hidden 1024, bf16.
    per_layer = 64 * 3 * 1024 * 512 * 2  # experts' bytes per MoE layer
    layers = max(2, round(size_gb * 1e9 / per_layer))
    return SyntheticSpec(
        layers=layers,
        first_dense=1,
        experts=64,
        top_k=8,
        n_group=8,
        topk_group=4,
        hidden=1024,
        moe_inter=512,
        dense_inter=2048,
        vocab=8192,
        shards=max(4, layers // 2),
    )


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench(size_gb: float, runs: int, workdir: Path) -> dict:
    src = workdir / f"src-{size_gb}gb"
    spec = spec_for(size_gb)
    if not src.exists():
        write_synthetic_checkpoint(src, spec)
    E, G = spec.experts, spec.n_group
    keep = [e for e in range(E) if (e % (E // G)) < (E // G) // 2]  # half of every group
    plan = workdir / "plan.json"
    Plan({str(L): keep for L in range(spec.first_dense, spec.layers)}).save(plan)
    shardcut = [sys.executable, "-m", "shardcut_cli.main", "prune", str(src), "--plan", str(plan)]
    out, copy = workdir / "out", workdir / "copy"
    results: dict[str, list[float]] = {k: [] for k in ("prune", "prune_noverify", "cp_out", "cp_in")}
    rss: list[int] = []
    for _ in range(runs):
        for key, extra in (("prune", []), ("prune_noverify", ["--no-verify"])):
            shutil.rmtree(out, ignore_errors=True)
            wall, peak = timed([*shardcut, "-o", str(out), *extra])
            results[key].append(wall)
            rss.append(peak)
        for key, what in (("cp_out", out), ("cp_in", src)):
            shutil.rmtree(copy, ignore_errors=True)
            t0 = time.perf_counter()
            subprocess.run(["cp", "-r", str(what), str(copy)], check=True)
            os.sync()
            results[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in results.items()}
    written = du(out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(copy, ignore_errors=True)
    return {"input_bytes": du(src), "written_bytes": written, "peak_rss": max(rss), **med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, action="append", help="input size(s) in GB (default 4)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir, removed after)")
    args = ap.parse_args()
    sizes = args.size_gb or [4.0]
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="shardcut-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        "| input | written | prune | prune --no-verify | cp written+sync | cp input+sync | "
        "prune / cp written | peak RSS |\n|---|---|---|---|---|---|---|---|"
    )
    try:
        for size in sizes:
            r = bench(size, args.runs, workdir)
            print(
                f"| {r['input_bytes'] / 1e9:.2f} GB | {r['written_bytes'] / 1e9:.2f} GB | {r['prune']:.2f} s "
                f"| {r['prune_noverify']:.2f} s | {r['cp_out']:.2f} s | {r['cp_in']:.2f} s "
                f"| {r['prune_noverify'] / r['cp_out']:.2f}x ({r['prune'] / r['cp_out']:.2f}x verified) "
                f"| {r['peak_rss'] / 1e6:.0f} MB |",
                flush=True,
            )
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
