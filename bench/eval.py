"""`shardcut eval` with P plans against a plain forward of the same tokens with the LM head.

    .venv/bin/python bench/eval.py                    # 8 layers, 64 experts, hidden 512, CPU; P = 1 and 3
    .venv/bin/python bench/eval.py --device cuda --dtype bfloat16 --layers 16 --hidden 2048 --experts 128

Builds the random Qwen3-MoE checkpoint of bench/calibrate.py, writes pre-tokenised samples and P
random half-pruning plans, then runs, each in its own process and interleaved (A B A B ...): (1)
bench/calibrate.py's plain forward (`from_pretrained`, then every batch eval uses) with logits at
every position, i.e. the layers plus one LM head, the model already in memory; (2) a streamed
layer-by-layer forward: `evaluate` with one plan that keeps every expert (that stream equals the
original, so it runs no layer and no head of its own: one stream read layer by layer from the
shards, one LM head, the original's loss); (3) `shardcut.ops.evaluation.evaluate` with P plans,
end to end (reading every layer from disk, 1 + P streams through each layer, 1 + P LM heads, the
metrics). Target (issue 16): eval with P plans <= (1 + P) x a plain layer-by-layer forward with
the LM head; the ratio is given against both baselines, (1) the stricter (it loads outside its
clock). Reports the median over `--runs` rounds of each round's ratio (the sides of a ratio run
back to back, so a load change on a shared machine moves them alike), and the best times.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrate import _BUILD, _FORWARD, run  # noqa: E402  (the same model, forward loop and child-process runner)

_EVAL = r"""
import json, sys, time
import transformers.models.qwen3_moe.modeling_qwen3_moe  # imports are outside the timings of both runs
from shardcut.ops.evaluation.runner import evaluate
model_dir, data, batch_tokens, device, dtype, *plans = sys.argv[1:]
t0 = time.perf_counter()
r = evaluate(
    model_dir, data, plans=plans, max_length=1 << 20, batch_tokens=int(batch_tokens), device=device, dtype=dtype
)
print(json.dumps({"eval": time.perf_counter() - t0, "kl": [p.kl_mean for p in r.plans]}))
"""

_CPU_CLOCK = "import time; time.perf_counter = time.process_time  # --clock cpu\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--moe-inter", type=int, default=256)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--plans", type=int, nargs="+", default=[1, 3], help="values of P")
    p.add_argument("--runs", type=int, default=3, help="interleaved rounds (median of the ratios)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: time both sides by the CPU time of their process, single-threaded (OMP_NUM_THREADS=1), "
        "which other jobs on a shared machine disturb far less than wall time",
    )
    p.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    a = p.parse_args()

    import numpy as np

    work = a.dir or Path(tempfile.mkdtemp(prefix="shardcut-bench-eval-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data = work / "model", work / "ids.jsonl"
    if not (model_dir / "config.json").exists():
        sizes, _ = run(["-c", _BUILD, str(model_dir), json.dumps(vars(a), default=str)])
    rng = np.random.default_rng(0)
    lengths = rng.integers(a.length // 2, a.length + 1, a.samples)
    data.write_text("".join(json.dumps({"input_ids": rng.integers(0, a.vocab, n).tolist()}) + "\n" for n in lengths))
    tokens = int(lengths.sum())
    pick = random.Random(0)
    plans = []
    for i in range(max(a.plans)):
        keep = {str(layer): sorted(pick.sample(range(a.experts), a.experts // 2)) for layer in range(a.layers)}
        plans.append(work / f"plan{i}.json")
        plans[-1].write_text(json.dumps({"format": "shardcut-plan/1", "keep": keep}))
    everything = work / "keep-all.json"  # the streamed baseline's plan: prunes nothing
    everything.write_text(
        json.dumps({"format": "shardcut-plan/1", "keep": {str(n): list(range(a.experts)) for n in range(a.layers)}})
    )
    common = [str(model_dir), str(data), str(a.batch_tokens), a.device, a.dtype]
    if a.clock == "cpu":  # the children's own timings then read their CPU time
        os.environ["OMP_NUM_THREADS"] = "1"
    clock = _CPU_CLOCK if a.clock == "cpu" else ""
    fwd, loads, streamed = [], [], []
    evals: dict[int, list[float]] = {P: [] for P in a.plans}
    for i in range(a.runs):  # interleaved: timings on a shared machine are noisy
        # no simulated disk (0 MB/s, 0 bytes); logits_to_keep=0: every position
        got = run(["-c", clock + _FORWARD, *common, "0", "0", "0"])[0]
        fwd.append(got["forward"])
        loads.append(got["load"])
        print(f"run {i + 1}: plain forward {fwd[-1]:.2f} s (+ {loads[-1]:.2f} s from_pretrained)", flush=True)
        streamed.append(run(["-c", clock + _EVAL, *common, str(everything)])[0]["eval"])
        print(f"run {i + 1}: streamed forward {streamed[-1]:.2f} s", flush=True)
        for P in a.plans:
            evals[P].append(run(["-c", clock + _EVAL, *common, *map(str, plans[:P])])[0]["eval"])
            print(
                f"run {i + 1}: eval P = {P} {evals[P][-1]:.2f} s = {evals[P][-1] / fwd[-1]:.2f}x the plain, "
                f"{evals[P][-1] / streamed[-1]:.2f}x the streamed forward",
                flush=True,
            )
    base, load = float(np.median(fwd)), float(np.median(loads))
    print(
        f"qwen3_moe {a.layers} layers x {a.experts} experts (top {a.top_k}), hidden {a.hidden}, vocab {a.vocab}, "
        f"{a.dtype}; {tokens:,} tokens in {a.samples} samples, batches of <= {a.batch_tokens}, device {a.device}, "
        f"{a.runs} interleaved rounds, {a.clock} clock"
    )
    print(
        f"plain forward with LM head: median {base:.2f} s, best {min(fwd):.2f} s ({tokens / base:,.0f} tok/s); "
        f"from_pretrained {load:.2f} s"
    )
    print(
        f"streamed layer-by-layer forward with LM head: median {float(np.median(streamed)):.2f} s, "
        f"best {min(streamed):.2f} s"
    )
    for P in a.plans:
        ratio = float(np.median([e / f for e, f in zip(evals[P], fwd, strict=True)]))
        with_load = float(np.median([e / (f + lo) for e, f, lo in zip(evals[P], fwd, loads, strict=True)]))
        to_streamed = float(np.median([e / s for e, s in zip(evals[P], streamed, strict=True)]))
        print(
            f"eval, P = {P}: median {float(np.median(evals[P])):.2f} s, best {min(evals[P]):.2f} s; median ratio "
            f"{ratio:.2f}x the plain forward (target <= {1 + P}x), best/best {min(evals[P]) / min(fwd):.2f}x, "
            f"{with_load:.2f}x load + forward, {to_streamed:.2f}x the streamed forward"
        )
    if len(a.plans) > 1:
        lo, hi = min(a.plans), max(a.plans)
        step = float(np.median([(x - y) / (hi - lo) / f for x, y, f in zip(evals[hi], evals[lo], fwd, strict=True)]))
        print(f"each plan beyond {lo} adds {step:.2f}x the plain forward (median)")
    if a.dir is None:
        print(f"(work folder {work} left in place; pass --dir to reuse the model)")


if __name__ == "__main__":
    main()
