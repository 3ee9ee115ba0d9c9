"""shardcut against the two usual ways of pruning experts, same checkpoint, same run.

    .venv/bin/python bench/peers.py                      # ~0.8 GB bf16 Qwen3-MoE
    .venv/bin/python bench/peers.py --layers 8 --runs 3

(a) "load-save": transformers `from_pretrained`, slice the fused expert parameters and
    router rows in memory, `save_pretrained` (what the REAP reference does);
(b) "per-shard": for each shard `safetensors.torch.load_file`, filter and rename keys, slice
    the router, `save_file` (what model-free converters do);
(c) `shardcut prune` (with its byte verification, and with --no-verify).
Each runs in a fresh process; wall time and peak RSS (wait4) are medians over --runs.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

KEEP_EVERY = 2  # keep experts 0, 2, 4, ...


def build(path: Path, layers: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "qwen3_moe",
        hidden_size=1024,
        intermediate_size=2048,
        moe_intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=16384,
        num_experts=32,
        num_experts_per_tok=4,
        dtype="bfloat16",
    )
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="200MB")


def peer_load_save(src: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    E = model.config.num_experts
    keep = torch.arange(0, E, KEEP_EVERY)
    for layer in model.model.layers:
        moe = layer.mlp
        moe.gate.weight = torch.nn.Parameter(moe.gate.weight.data[keep].clone())
        for name in ("gate_up_proj", "down_proj"):
            setattr(moe.experts, name, torch.nn.Parameter(getattr(moe.experts, name).data[keep].clone()))
        moe.experts.num_experts = len(keep)
        moe.gate.num_experts = len(keep)
    model.config.num_experts = len(keep)
    model.save_pretrained(out)


def peer_per_shard(src: Path, out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    E = config.get("num_experts") or config["num_local_experts"]
    keep = list(range(0, E, KEEP_EVERY))
    new_id = {old: new for new, old in enumerate(keep)}
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    expert = re.compile(r"^(.*\.mlp\.experts\.)(\d+)(\..*)$")
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(src / shard)
        kept = {}
        for name, t in tensors.items():
            m = expert.match(name)
            if m:
                if int(m.group(2)) in new_id:
                    kept[f"{m.group(1)}{new_id[int(m.group(2))]}{m.group(3)}"] = t
            elif name.endswith("mlp.gate.weight"):
                kept[name] = t[torch.tensor(keep)].contiguous()
            else:
                kept[name] = t
        save_file(kept, out / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in kept})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for key in ("num_experts", "num_local_experts"):
        if key in config:
            config[key] = len(keep)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--peer", choices=["build", "load-save", "per-shard"], help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:  # child process mode
        if args.peer == "build":
            build(args.paths[0], args.layers)
        else:
            {"load-save": peer_load_save, "per-shard": peer_per_shard}[args.peer](*args.paths)
        return

    from measure import timed

    from shardcut.plans.plan import Plan

    work = Path(tempfile.mkdtemp(prefix="shardcut-peers-"))
    try:
        src, out = work / "src", work / "out"
        me = [sys.executable, __file__]
        # Built in a child: ru_maxrss survives fork+exec, so this process must stay small.
        subprocess.run(
            [*me, "--peer", "build", "--layers", str(args.layers), str(src)], check=True, stderr=subprocess.DEVNULL
        )
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        cfg = json.loads((src / "config.json").read_text())
        E = cfg.get("num_experts") or cfg["num_local_experts"]
        Plan({str(L): list(range(0, E, KEEP_EVERY)) for L in range(args.layers)}).save(work / "plan.json")
        shardcut = [
            sys.executable,
            "-m",
            "shardcut_cli.main",
            "prune",
            str(src),
            "-o",
            str(out),
            "--plan",
            str(work / "plan.json"),
        ]
        contenders = {
            "load + slice + save_pretrained (REAP reference style)": [*me, "--peer", "load-save", str(src), str(out)],
            "per-shard load_file + filter + save_file": [*me, "--peer", "per-shard", str(src), str(out)],
            "shardcut prune": shardcut,
            "shardcut prune --no-verify": [*shardcut, "--no-verify"],
        }
        results = {}
        for name, cmd in contenders.items():
            walls, peaks = [], []
            for _ in range(args.runs):
                shutil.rmtree(out, ignore_errors=True)
                wall, peak = timed(cmd)
                walls.append(wall)
                peaks.append(peak)
            results[name] = (statistics.median(walls), max(peaks))
        base_wall, base_rss = results["shardcut prune"]
        print(f"input: {size / 1e9:.2f} GB bf16 Qwen3-MoE, {args.layers} layers, {E} -> {E // KEEP_EVERY} experts\n")
        print("| method | wall | peak RSS | wall vs shardcut | RSS vs shardcut |\n|---|---|---|---|---|")
        for name, (wall, rss) in results.items():
            print(f"| {name} | {wall:.2f} s | {rss / 1e6:.0f} MB | {wall / base_wall:.2f}x | {rss / base_rss:.1f}x |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
