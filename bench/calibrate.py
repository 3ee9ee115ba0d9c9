"""Streaming calibration against a plain full-model forward on the same tokens.

    .venv/bin/python bench/calibrate.py                       # 8 layers, 64 experts, hidden 512, CPU
    .venv/bin/python bench/calibrate.py --device cuda --dtype bfloat16 --layers 16 --hidden 2048 \\
        --experts 128 --samples 256 --length 1024              # on a GPU machine

Builds a random Qwen3-MoE checkpoint (saved in the Hub layout, float32 or bf16), writes
pre-tokenised samples, then runs, each in its own process: (1) the imports alone (baseline
RSS), (2) `from_pretrained` + a plain forward of every batch (the same batches calibration
uses; logits of the last position only; no KV cache, as calibration keeps none), (3)
`shardcut.ops.calibration.calibrate`. `--threads N` gives both the same torch threads; both report
process CPU time besides wall time (steadier on a shared machine). Reports tokens/s
(forward alone, and load + forward, against calibrate end to end) and peak RSS (from wait4)
against the model's size and against one layer + the activations: the stored hidden states
plus one batch's working memory, measured as the plain forward's peak above its loaded model.
Targets: calibrate <= 1.3x the plain forward (issue 12); peak RSS <= one layer + activations
(above the import baseline, issue 4). Each run is repeated `--runs` times, interleaved; medians count.

Calibration runs with the next layer's read overlapping the current layer's compute (prefetch,
the default) and, with `--prefetch both`, without. It prints where its time went (read, waited
for the read, dequantize/place, forward, statistics; from the `LayerTimes` of its progress events).
`--read-mbps N` simulates a slow disk of N MB/s for both sides alike: every tensor read of the
calibrator, and the plain forward's `from_pretrained`, take at least bytes / N (a virtual disk
serving one read at a time), so the plain side costs read + compute, and overlap should bring
calibration to about max(read, compute).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_FORWARD = r"""
import json, sys, time, torch
import transformers.models.qwen3_moe.modeling_qwen3_moe
from transformers import AutoModelForCausalLM
from shardcut.ops.calibration.runner import make_batches


def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))



model_dir, data, batch_tokens, device, dtype, mbps, model_bytes = sys.argv[1:8]
keep = int(sys.argv[8]) if len(sys.argv) > 8 else 1  # logits of the last position; 0: of every position (bench/eval.py)
if len(sys.argv) > 9 and int(sys.argv[9]) > 0:  # the same intra-op threads as the calibrate side
    torch.set_num_threads(int(sys.argv[9]))
dtype = getattr(torch, dtype)
samples = [json.loads(line)["input_ids"] for line in open(data)]
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
if float(mbps) > 0:  # the simulated disk: the model's bytes take at least bytes / rate to arrive
    time.sleep(max(0.0, t0 + int(model_bytes) / (float(mbps) * 1e6) - time.perf_counter()))
t1, c1 = time.perf_counter(), time.process_time()
loaded = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak: measure the forward's own working memory
with torch.inference_mode():
    for b in make_batches([len(s) for s in samples], int(batch_tokens)):
        T = b.width
        ids = torch.zeros((len(b.samples), T), dtype=torch.long)
        mask = torch.zeros((len(b.samples), T), dtype=torch.long)
        for r, j in enumerate(b.samples):
            ids[r, : len(samples[j])] = torch.tensor(samples[j])
            mask[r, : len(samples[j])] = 1
        # use_cache=False: calibration keeps no KV cache either (with one, the plain side pays for filling it)
        model(
            ids.to(device),
            attention_mask=mask.to(device) if not bool(mask.all()) else None,
            logits_to_keep=keep,
            use_cache=False,
        )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
t2, c2 = time.perf_counter(), time.process_time()
out = {"load": t1 - t0, "forward": t2 - t1, "forward_cpu": c2 - c1, "working": status("VmHWM:") - loaded}
print(json.dumps({**out, "threads": torch.get_num_threads()}))
"""

_CALIBRATE = r"""
import dataclasses, json, sys, threading, time, torch
import transformers.models.qwen3_moe.modeling_qwen3_moe  # imports are outside the timings of both runs
from shardcut.ops.calibration import stream
from shardcut.ops.calibration.runner import calibrate
model_dir, data, out, batch_tokens, device, dtype, mbps, prefetch, threads = sys.argv[1:10]
if int(threads) > 0:
    torch.set_num_threads(int(threads))
if float(mbps) > 0:  # the simulated disk: one read at a time, each at least bytes / rate after the last
    rate, lock, free_at = float(mbps) * 1e6, threading.Lock(), [0.0]
    original = stream.TensorReader.read

    def throttled(self, name):
        t = original(self, name)
        with lock:
            free_at[0] = max(free_at[0], time.perf_counter()) + t.nbytes / rate
            until = free_at[0]
        time.sleep(max(0.0, until - time.perf_counter()))
        return t

    stream.TensorReader.read = throttled
t0, c0 = time.perf_counter(), time.process_time()
messages, total = [], {}

def progress(e):
    if e.kind == "info":
        messages.append(e.message)
    elif e.kind == "done":
        total.update(dataclasses.asdict(e.times))

calibrate(model_dir, data, out, max_length=1 << 20, batch_tokens=int(batch_tokens), device=device, dtype=dtype,
          prefetch=prefetch == "on", overwrite=True, progress=progress)
print(json.dumps({"calibrate": time.perf_counter() - t0, "calibrate_cpu": time.process_time() - c0, "log": messages,
                  "times": total}))
"""

_IMPORTS = "import torch, transformers.models.qwen3_moe.modeling_qwen3_moe, shardcut.ops.calibration.runner"


def run(args: list[str]) -> tuple[dict, int]:
    """The JSON a child process prints, and its peak RSS in bytes."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(args[:2])}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines else {}), usage.ru_maxrss * 1024


_BUILD = r"""
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
path, a = sys.argv[1], json.loads(sys.argv[2])
torch.manual_seed(0)
config = AutoConfig.for_model(
    "qwen3_moe", hidden_size=a["hidden"], intermediate_size=a["hidden"] * 2, moe_intermediate_size=a["moe_inter"],
    num_hidden_layers=a["layers"], num_attention_heads=max(4, a["hidden"] // 64), num_key_value_heads=4, head_dim=64,
    vocab_size=a["vocab"], num_experts=a["experts"], num_experts_per_tok=a["top_k"], norm_topk_prob=True,
    max_position_embeddings=max(4096, a["length"]), tie_word_embeddings=False)
model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, a["dtype"])).eval()
model.save_pretrained(path, max_shard_size="500MB")
layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
total = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"total": total, "layer": layer}))
"""


def _breakdown(t: dict) -> str:
    wall = t["wait_s"] + t["load_s"] + t["forward_s"] + t["stats_s"]
    return (
        f"read {t['read_s']:.1f} s (compute waited {t['wait_s']:.1f} s of it), dequantize/place {t['load_s']:.1f} s, "
        f"forward {t['forward_s']:.1f} s, statistics {t['stats_s']:.1f} s; layers' wall {wall:.1f} s "
        f"(read + compute = {t['read_s'] + t['load_s'] + t['forward_s'] + t['stats_s']:.1f} s)"
    )


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
    p.add_argument("--runs", type=int, default=3, help="median of N interleaved runs of each")
    p.add_argument("--read-mbps", type=float, default=0, help="simulate a disk of N MB/s for both sides (0: off)")
    p.add_argument("--prefetch", choices=["on", "off", "both"], default="on", help="calibrate with prefetch on/off")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads of both sides (0: torch's default)")
    p.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    a = p.parse_args()

    import numpy as np  # small: the parent must not import torch (forked children would inherit its RSS)

    work = a.dir or Path(tempfile.mkdtemp(prefix="shardcut-bench-calib-"))
    model_dir, data, out = work / "model", work / "ids.jsonl", work / "scores.safetensors"
    if not (model_dir / "config.json").exists():
        # in a child process: this one stays small, so the children's peak RSS is theirs alone
        sizes, _ = run(["-c", _BUILD, str(model_dir), json.dumps(vars(a), default=str)])
        (work / "sizes.json").write_text(json.dumps(sizes))
    sizes = json.loads((work / "sizes.json").read_text())
    rng = np.random.default_rng(0)
    lengths = rng.integers(a.length // 2, a.length + 1, a.samples)
    data.write_text("".join(json.dumps({"input_ids": rng.integers(0, a.vocab, n).tolist()}) + "\n" for n in lengths))
    tokens = int(lengths.sum())
    itemsize = 4 if a.dtype == "float32" else 2
    activations = tokens * a.hidden * itemsize

    _, base_rss = run(["-c", _IMPORTS])
    modes = ["on", "off"] if a.prefetch == "both" else [a.prefetch]
    fwds, fwd_rss = [], 0
    cals: dict[str, list[dict]] = {m: [] for m in modes}
    cal_rss = dict.fromkeys(modes, 0)
    common = [str(a.batch_tokens), a.device, a.dtype, str(a.read_mbps)]
    for _ in range(a.runs):  # interleaved, medians: timings on a shared machine are noisy
        fwd, rss = run(["-c", _FORWARD, str(model_dir), str(data), *common, str(sizes["total"]), "1", str(a.threads)])
        fwds.append(fwd)
        fwd_rss = max(fwd_rss, rss)
        print(
            f"run {len(fwds)}: plain forward {fwd['forward']:.1f} s (CPU {fwd['forward_cpu']:.1f} s, "
            f"{fwd['threads']} threads) + load {fwd['load']:.1f} s",
            flush=True,
        )
        for m in modes:
            cal, rss = run(["-c", _CALIBRATE, str(model_dir), str(data), str(out), *common, m, str(a.threads)])
            cals[m].append(cal)
            cal_rss[m] = max(cal_rss[m], rss)
            print(
                f"run {len(fwds)}: calibrate (prefetch {m}) {cal['calibrate']:.1f} s "
                f"(CPU {cal['calibrate_cpu']:.1f} s); "
                f"{_breakdown(cal['times'])}",
                flush=True,
            )
    fwd = {
        "forward": statistics.median(f["forward"] for f in fwds),
        "load": statistics.median(f["load"] for f in fwds),
        "forward_cpu": statistics.median(f["forward_cpu"] for f in fwds),
        "working": max(f["working"] for f in fwds),
    }
    by_mode = {m: sorted(c, key=lambda c: c["calibrate"])[len(c) // 2] for m, c in cals.items()}  # the median run
    cal, cal_rss = by_mode[modes[0]], cal_rss[modes[0]]

    working = fwd["working"]
    bound = sizes["layer"] + activations + working

    def mb(n: float) -> str:
        return f"{n / 1e6:,.0f} MB"

    rows = [
        ("model", f"qwen3_moe {a.layers} layers x {a.experts} experts (top {a.top_k}), hidden {a.hidden}, {a.dtype}"),
        (
            "tokens",
            f"{tokens:,} in {a.samples} samples, batches of <= {a.batch_tokens} tokens, device {a.device}, "
            f"medians of {a.runs} interleaved runs, {fwds[0]['threads']} torch threads",
        ),
        *([("disk", f"simulated at {a.read_mbps:,.0f} MB/s for both sides")] if a.read_mbps else []),
        ("sizes", f"model {mb(sizes['total'])}, one layer {mb(sizes['layer'])}, activations {mb(activations)}"),
        (
            "plain forward",
            f"{tokens / fwd['forward']:,.0f} tok/s forward only ({fwd['forward']:.1f} s); "
            f"{tokens / (fwd['forward'] + fwd['load']):,.0f} tok/s with from_pretrained "
            f"({fwd['load']:.1f} s load)",
        ),
        *(
            row
            for m, c in by_mode.items()
            for row in (
                (
                    f"calibrate (prefetch {m})",
                    f"{tokens / c['calibrate']:,.0f} tok/s end to end ({c['calibrate']:.1f} s, "
                    "reading every layer from disk and recording the statistics)",
                ),
                ("  where it went", _breakdown(c["times"])),
                (
                    "  ratio",
                    f"calibrate / forward only = {c['calibrate'] / fwd['forward']:.2f}x; "
                    f"/ load + forward = {c['calibrate'] / (fwd['forward'] + fwd['load']):.2f}x (target <= 1.3x)",
                ),
                (
                    "  CPU time",
                    f"calibrate {c['calibrate_cpu']:.1f} s / plain forward {fwd['forward_cpu']:.1f} s = "
                    f"{c['calibrate_cpu'] / fwd['forward_cpu']:.2f}x (process CPU time, all threads; steadier "
                    "than wall time on a shared machine, but it counts OpenMP spin-waits)",
                ),
            )
        ),
        (
            "peak RSS",
            f"imports alone {mb(base_rss)}; plain forward {mb(fwd_rss)} (+{mb(fwd_rss - base_rss)}); "
            f"calibrate (prefetch {modes[0]}) {mb(cal_rss)} (+{mb(cal_rss - base_rss)})",
        ),
        (
            "RSS bound",
            f"one layer {mb(sizes['layer'])} + stored activations {mb(activations)} + one batch's working "
            f"memory {mb(working)} (the plain forward's peak above its loaded model) = {mb(bound)}; "
            f"calibrate above imports = {(cal_rss - base_rss) / bound:.2f}x of it (target <= 1x)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for line in cal.get("log", []):
        print(f"{'':<{width}}  calibrate: {line}")
    if a.dir is None:
        print(f"(work folder {work} left in place; pass --dir to reuse the model)")


if __name__ == "__main__":
    main()
