"""Streaming calibration against a plain full-model forward on the same tokens.

    .venv/bin/python bench/calibrate.py                       # 8 layers, 64 experts, hidden 512, CPU
    .venv/bin/python bench/calibrate.py --device cuda --dtype bfloat16 --layers 16 --hidden 2048 \\
        --experts 128 --samples 256 --length 1024              # on a GPU machine

Builds a random Qwen3-MoE checkpoint (saved in the Hub layout, float32 or bf16), writes
pre-tokenised samples, then runs, each in its own process: (1) the imports alone (baseline
RSS), (2) `from_pretrained` + a plain forward of every batch (the same batches calibration
uses; logits of the last position only), (3) `shardcut.ops.calibration.calibrate`. Reports tokens/s
(forward alone, and load + forward, against calibrate end to end) and peak RSS (from wait4)
against the model's size and against one layer + the activations: the stored hidden states
plus one batch's working memory, measured as the plain forward's peak above its loaded model.
Targets (issue 4): calibrate <= 1.5x the plain forward; peak RSS <= one layer + activations
(above the import baseline). Each run is repeated `--runs` times, interleaved; the best time counts.
"""

from __future__ import annotations

import argparse
import json
import os
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



model_dir, data, batch_tokens, device, dtype = sys.argv[1:6]
keep = int(sys.argv[6]) if len(sys.argv) > 6 else 1  # logits of the last position; 0: of every position (bench/eval.py)
dtype = getattr(torch, dtype)
samples = [json.loads(line)["input_ids"] for line in open(data)]
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
t1 = time.perf_counter()
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
        model(ids.to(device), attention_mask=mask.to(device) if not bool(mask.all()) else None, logits_to_keep=keep)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
t2 = time.perf_counter()
print(json.dumps({"load": t1 - t0, "forward": t2 - t1, "working": status("VmHWM:") - loaded}))
"""

_CALIBRATE = r"""
import json, sys, time
import transformers.models.qwen3_moe.modeling_qwen3_moe  # imports are outside the timings of both runs
from shardcut.ops.calibration.runner import calibrate
model_dir, data, out, batch_tokens, device, dtype = sys.argv[1:7]
t0 = time.perf_counter()
messages = []
calibrate(model_dir, data, out, max_length=1 << 20, batch_tokens=int(batch_tokens), device=device, dtype=dtype,
          progress=lambda e: messages.append(e.message) if e.kind == "info" else None)
print(json.dumps({"calibrate": time.perf_counter() - t0, "log": messages}))
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
    p.add_argument("--runs", type=int, default=3, help="best of N interleaved runs of each")
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
    fwds, cals, fwd_rss, cal_rss = [], [], 0, 0
    for _ in range(a.runs):  # interleaved, best of N: timings on a shared machine are noisy
        fwd, rss = run(["-c", _FORWARD, str(model_dir), str(data), str(a.batch_tokens), a.device, a.dtype])
        fwds.append(fwd)
        fwd_rss = max(fwd_rss, rss)
        cal, rss = run(["-c", _CALIBRATE, str(model_dir), str(data), str(out), str(a.batch_tokens), a.device, a.dtype])
        cals.append(cal)
        cal_rss = max(cal_rss, rss)
    fwd = {
        "forward": min(f["forward"] for f in fwds),
        "load": min(f["load"] for f in fwds),
        "working": max(f["working"] for f in fwds),
    }
    cal = min(cals, key=lambda c: c["calibrate"])

    working = fwd["working"]
    bound = sizes["layer"] + activations + working

    def mb(n: float) -> str:
        return f"{n / 1e6:,.0f} MB"

    rows = [
        ("model", f"qwen3_moe {a.layers} layers x {a.experts} experts (top {a.top_k}), hidden {a.hidden}, {a.dtype}"),
        (
            "tokens",
            f"{tokens:,} in {a.samples} samples, batches of <= {a.batch_tokens} tokens, device {a.device}, "
            f"best of {a.runs} runs",
        ),
        ("sizes", f"model {mb(sizes['total'])}, one layer {mb(sizes['layer'])}, activations {mb(activations)}"),
        (
            "plain forward",
            f"{tokens / fwd['forward']:,.0f} tok/s forward only ({fwd['forward']:.1f} s); "
            f"{tokens / (fwd['forward'] + fwd['load']):,.0f} tok/s with from_pretrained "
            f"({fwd['load']:.1f} s load)",
        ),
        (
            "calibrate",
            f"{tokens / cal['calibrate']:,.0f} tok/s end to end ({cal['calibrate']:.1f} s, "
            "reading every layer from disk and recording the statistics)",
        ),
        (
            "ratio",
            f"calibrate / forward only = {cal['calibrate'] / fwd['forward']:.2f}x; "
            f"/ load + forward = {cal['calibrate'] / (fwd['forward'] + fwd['load']):.2f}x (target <= 1.5x)",
        ),
        (
            "peak RSS",
            f"imports alone {mb(base_rss)}; plain forward {mb(fwd_rss)} (+{mb(fwd_rss - base_rss)}); "
            f"calibrate {mb(cal_rss)} (+{mb(cal_rss - base_rss)})",
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
