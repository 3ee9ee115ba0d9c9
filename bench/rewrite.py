"""Rewrite throughput and memory of `shardcut prune` against `cp`, measured side by side.

    .venv/bin/python bench/rewrite.py                               # 4 GB, warm page cache
    .venv/bin/python bench/rewrite.py --size-gb 1 --size-gb 4 --size-gb 8 --runs 3
    .venv/bin/python bench/rewrite.py --size-gb 4 --cold             # nothing cached before each run
    .venv/bin/python bench/rewrite.py --size-gb 1 --baseline /tmp/old --verify-source --stream

For each input size: generate a synthetic DeepSeek-V3-shaped bf16 checkpoint
(shardcut.ops.synthetic), then, interleaved in every run (A B A B ...), `cp -r` of the prune's
output followed by `sync` (cp of the bytes prune writes; prune fsyncs its shards, so cp must
reach the disk too), `shardcut prune` of 50% of the experts (verified, the default) and
`--no-verify`, each a fresh process. Reports medians of `--runs` runs, each prune's ratio to the
cp, and the peak RSS of the prune processes (from wait4).

Before every timed run the disk is synced; the inputs of that run (MODEL for prune, the folder
cp copies) are read into the page cache (warm, default) or dropped from it with
`posix_fadvise(DONTNEED)` (`--cold`, no root needed), so cp and prune start alike.
`--baseline DIR` also times a prune with the shardcut package found in DIR (e.g. an older
checkout: `git archive COMMIT shardcut | tar -x -C DIR`), `--verify-source` times
`shardcut verify OUT --source MODEL`, `--stream` times `prune --stream` from a local fake Hub
(tests/fixtures/hub_fixtures.py; each shard "downloaded" by a file copy), each with and without
the baseline when given. `--dir DIR` keeps the work folder, and an input already in it
(`DIR/src-<size>gb`) is reused, e.g. a 30 GB input for several runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import timed, timed_usage

from shardcut.ops.synthetic import SyntheticSpec, write_synthetic_checkpoint
from shardcut.plans.plan import Plan

ROOT = Path(__file__).resolve().parents[1]

STREAM = """
import shutil, sys
from pathlib import Path
sys.path.insert(0, sys.argv[5])
import pytest
from fixtures.hub_fixtures import REPO, SHA, FakeHubApi, use_cache
from shardcut.plans.plan import Plan
from shardcut.rewrite.from_hub import prune_model
src, out, plan, cache = Path(sys.argv[1]), Path(sys.argv[2]), Plan.load(sys.argv[3]), Path(sys.argv[4])
mp = pytest.MonkeyPatch()
use_cache(mp, cache, offline=False)
def download(filename, dest):
    shutil.copyfile(src / filename, dest / filename)
    return dest / filename
prune_model(REPO, out, plan, stream=True, api=FakeHubApi({REPO: (src, SHA)}), download=download)
"""


# Runs argv[2:] (`-m MODULE ARGS` or `-c CODE ARGS`) with the shardcut package of folder argv[1]
# instead of the installed one (an editable install's finder would otherwise win over sys.path).
BASELINE = """
import runpy, sys
base = sys.argv[1]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path.insert(0, base)
mode, what, rest = sys.argv[2], sys.argv[3], sys.argv[4:]
sys.argv = [what, *rest]
if mode == "-m":
    runpy.run_module(what, run_name="__main__", alter_sys=True)
else:
    exec(compile(what, "<baseline>", "exec"), {"__name__": "__main__"})
"""


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


def files(*folders: Path) -> list[Path]:
    return [p for f in folders for p in f.rglob("*") if p.is_file()]


def output_bytes(prune: list[str]) -> int:
    """The bytes `prune` would write (its --dry-run --json)."""
    done = subprocess.run([*prune, "-o", os.devnull + ".out", "--dry-run", "--json"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return int(json.loads(done.stdout)["output_bytes"])


def same_bytes_of(src: Path, n: int) -> list[Path]:
    """Whole shards of `src`, largest first, adding up to about `n` bytes."""
    shards = sorted(src.glob("*.safetensors"), key=lambda p: p.stat().st_size, reverse=True)
    out: list[Path] = []
    for p in shards:
        if sum(q.stat().st_size for q in out) + p.stat().st_size / 2 > n:
            break
        out.append(p)
    return out


def prepare(inputs: list[Path], cold: bool) -> None:
    """Sync, then put `inputs` in the page cache (warm) or drop them from it (cold)."""
    os.sync()
    buf = bytearray(16 << 20)
    for path in inputs:
        fd = os.open(path, os.O_RDONLY)
        try:
            if cold:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.readv(fd, [buf]):
                    pass
        finally:
            os.close(fd)


def bench(size_gb: float, args: argparse.Namespace, workdir: Path) -> dict:
    src = workdir / f"src-{size_gb}gb"
    spec = spec_for(size_gb)
    if not src.exists():
        write_synthetic_checkpoint(src, spec)
    input_bytes = du(src)
    E, G = spec.experts, spec.n_group
    keep = [e for e in range(E) if (e % (E // G)) < (E // G) // 2]  # half of every group
    plan = workdir / "plan.json"
    Plan({str(L): keep for L in range(spec.first_dense, spec.layers)}).save(plan)
    cli = [sys.executable, "-m", "shardcut_cli.main"]
    prune = [*cli, "prune", str(src), "--plan", str(plan)]
    ref, out, copy = workdir / "ref", workdir / "out", workdir / "copy"
    shutil.rmtree(ref, ignore_errors=True)
    if args.remove_input:
        # Bounded disk (a 30 GB input on ~57 GB free): no reference output; cp copies whole input
        # shards adding up to what prune writes (input + one output at a time on the disk).
        target = output_bytes(prune)
        cp_files = same_bytes_of(src, target)
        print(
            f"  cp copies {len(cp_files)} input shards, {sum(p.stat().st_size for p in cp_files) / 1e9:.2f} GB; "
            f"prune writes {target / 1e9:.2f} GB",
            flush=True,
        )
    else:
        timed([*prune, "-o", str(ref), "--no-verify"])  # what cp copies: the bytes prune writes
        cp_files = [ref]

    base = workdir / "baseline"
    if args.baseline:  # the old library with today's CLI
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir()
        (base / "shardcut").symlink_to(args.baseline.resolve() / "shardcut")
        (base / "shardcut_cli").symlink_to(ROOT / "cli")

    def cmd(argv: list[str], baseline: bool) -> list[str]:
        """argv is [python, -m|-c, module|code, args...]"""
        return [sys.executable, "-c", BASELINE, str(base), *argv[1:]] if baseline else argv

    def run_prune(extra: list[str], baseline: bool = False) -> tuple[float, int, float]:
        shutil.rmtree(out, ignore_errors=True)
        prepare(files(src), args.cold)
        try:
            return timed_usage(cmd([*prune, "-o", str(out), *extra], baseline))
        finally:
            shutil.rmtree(out, ignore_errors=True)  # the disk holds one output at a time

    def run_cp() -> tuple[float, int, float]:
        shutil.rmtree(copy, ignore_errors=True)
        copy.mkdir()
        prepare(files(*cp_files) if not args.remove_input else cp_files, args.cold)
        t0 = time.perf_counter()
        _, rss, cpu = timed_usage(["cp", "-r", *map(str, cp_files), str(copy)])
        os.sync()
        wall = time.perf_counter() - t0
        shutil.rmtree(copy, ignore_errors=True)  # before the prune runs: the disk holds one copy
        return wall, rss, cpu

    def run_verify(baseline: bool = False) -> tuple[float, int, float]:
        prepare(files(ref, src), args.cold)
        return timed_usage(cmd([*cli, "verify", str(ref), "--source", str(src)], baseline))

    def run_stream(baseline: bool = False) -> tuple[float, int, float]:
        shutil.rmtree(out, ignore_errors=True)
        cache = workdir / "hf-cache"
        shutil.rmtree(cache, ignore_errors=True)
        prepare(files(src), args.cold)
        script = [sys.executable, "-c", STREAM, str(src), str(out), str(plan), str(cache), str(ROOT / "tests")]
        try:
            return timed_usage(cmd(script, baseline))
        finally:
            shutil.rmtree(out, ignore_errors=True)

    steps = {"cp": run_cp, "prune": lambda: run_prune([]), "prune_noverify": lambda: run_prune(["--no-verify"])}
    if args.baseline:
        steps["prune_baseline"] = lambda: run_prune([], baseline=True)
        steps["noverify_baseline"] = lambda: run_prune(["--no-verify"], baseline=True)
    if args.verify_source and not args.remove_input:  # verify --source needs the reference output
        steps["verify_source"] = run_verify
        if args.baseline:
            steps["verify_source_baseline"] = lambda: run_verify(baseline=True)
    if args.stream:
        steps["stream"] = run_stream
        if args.baseline:
            steps["stream_baseline"] = lambda: run_stream(baseline=True)
    results: dict[str, list[float]] = {k: [] for k in steps}
    rss: dict[str, list[int]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    try:
        for _ in range(args.runs):
            for key, step in steps.items():  # interleaved: every quantity once per run
                wall, peak, used = step()
                results[key].append(wall)
                rss[key].append(peak)
                cpu[key].append(used)
        written = target if args.remove_input else du(ref)
    finally:
        for p in (out, copy, ref, workdir / "hf-cache", base):
            shutil.rmtree(p, ignore_errors=True)
        if args.remove_input:
            shutil.rmtree(src, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    runs = {k: [round(x, 2) for x in v] for k, v in results.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    return {"input_bytes": input_bytes, "written_bytes": written, "rss": rss, "runs": runs, "cpu": cpu_med, **med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, action="append", help="input size(s) in GB (default 4)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop every input from the page cache before each run")
    ap.add_argument("--baseline", type=Path, default=None, help="also time the shardcut package in this folder")
    ap.add_argument("--verify-source", action="store_true", help="also time verify OUT --source MODEL")
    ap.add_argument("--stream", action="store_true", help="also time prune --stream from a local fake Hub")
    ap.add_argument("--remove-input", action="store_true", help="delete each generated input after its size")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir, removed after)")
    args = ap.parse_args()
    sizes = args.size_gb or [4.0]
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="shardcut-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cache = "cold" if args.cold else "warm"
    print(
        f"page cache: {cache}; medians of {args.runs} interleaved runs (CPU: user + system of the process)\n"
        "| input | written | cp + sync | prune (verified) | / cp | prune --no-verify | / cp | CPU cp / prune "
        "/ --no-verify | peak RSS |\n|---|---|---|---|---|---|---|---|---|"
    )
    try:
        for size in sizes:
            r = bench(size, args, workdir)
            print(
                f"| {r['input_bytes'] / 1e9:.2f} GB | {r['written_bytes'] / 1e9:.2f} GB | {r['cp']:.2f} s "
                f"| {r['prune']:.2f} s | {r['prune'] / r['cp']:.2f}x | {r['prune_noverify']:.2f} s "
                f"| {r['prune_noverify'] / r['cp']:.2f}x "
                f"| {r['cpu']['cp']:.2f} / {r['cpu']['prune']:.2f} / {r['cpu']['prune_noverify']:.2f} s "
                f"| {max(r['rss']['prune'] + r['rss']['prune_noverify']) / 1e6:.0f} MB |",
                flush=True,
            )
            extra = {k: r[k] for k in r["runs"] if k not in ("cp", "prune", "prune_noverify")}
            if extra:
                print(
                    "  also: " + ", ".join(f"{k} {v:.2f} s (CPU {r['cpu'][k]:.2f} s)" for k, v in extra.items()),
                    flush=True,
                )
            print(f"  every run: {r['runs']}", flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
