"""What RAM activation checkpoints cost, and what they save on a resume (issue 12 item 4).

    .venv/bin/python bench/checkpoint.py                     # 8 layers, hidden 1024, 16k tokens, CPU
    .venv/bin/python bench/checkpoint.py --hidden 2048 --samples 128 --length 512 --dir /nvme/bench

Builds the same random Qwen3-MoE as bench/calibrate.py (in --dir), then calibrates it with
activations in RAM three times: checkpoints never (`checkpoint_every=0`), after every layer
(`1`) and with the default policy (at most 10% of the compute). Reports each run's time, the
checkpoints written, their write time and throughput, the mean compute time of a layer, and
what a resume after a crash in the last layer recomputes under each policy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    a = p.parse_args()

    import numpy as np
    import torch

    import shardcut.ops.calibration.store as store
    from shardcut.ops.calibration.runner import calibrate

    spec = importlib.util.spec_from_file_location("bench_calibrate", Path(__file__).with_name("calibrate.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    work = a.dir or Path(tempfile.mkdtemp(prefix="shardcut-bench-ckpt-"))
    work.mkdir(parents=True, exist_ok=True)
    model, data = work / "model", work / "ids.jsonl"
    if not (model / "config.json").exists():
        args = {
            "hidden": a.hidden,
            "moe_inter": a.hidden // 2,
            "layers": a.layers,
            "vocab": 4096,
            "experts": a.experts,
            "top_k": 4,
            "length": a.length,
            "dtype": "float32",
        }
        subprocess.run(
            [sys.executable, "-c", bench._BUILD, str(model), json.dumps(args)], check=True, stdout=subprocess.DEVNULL
        )
    rng = np.random.default_rng(0)
    data.write_text(
        "".join(json.dumps({"input_ids": rng.integers(0, 4096, a.length).tolist()}) + "\n" for _ in range(a.samples))
    )
    torch.set_num_threads(max(1, torch.get_num_threads()))

    writes: list[tuple[float, int, int]] = []  # seconds, bytes, the step the activations enter
    real = store.ActivationStore.checkpoint

    def timed(self, path):
        t0 = time.perf_counter()
        real(self, path)
        writes.append((time.perf_counter() - t0, self.nbytes, int(Path(path).stem.split(".s")[-1])))

    store.ActivationStore.checkpoint = timed
    steps = a.layers + 1
    for every, name in ((0, "never"), (1, "every layer"), (None, "default (<= 10%)")):
        writes.clear()
        starts: dict[int, float] = {}
        compute: list[float] = []

        def progress(e, starts=starts, compute=compute):
            if e.kind == "layer_start":
                starts[e.step] = time.perf_counter()
            elif e.kind == "layer_done" and e.step - 1 in starts and e.step > 1:
                compute.append(time.perf_counter() - starts[e.step - 1])

        out = work / "scores.safetensors"
        t0 = time.perf_counter()
        calibrate(
            model,
            str(data),
            out,
            max_length=a.length,
            device="cpu",
            dtype="float32",
            checkpoint_every=every,
            overwrite=True,
            progress=progress,
        )
        total = time.perf_counter() - t0
        last_ckpt = max((s for _, _, s in writes), default=0)
        w = sum(s for s, _, _ in writes)
        gb = sum(n for _, n, _ in writes) / 1e9
        print(
            f"{name:>17}: {total:6.2f} s, {len(writes)} checkpoints of {writes[0][1] / 1e6 if writes else 0:.0f} MB "
            f"in {w:.2f} s ({gb / max(w, 1e-9):.2f} GB/s), layer compute + state {np.mean(compute):.2f} s"
            f"; entering steps {[s for _, _, s in writes]}; a crash in the last layer recomputes "
            f"{steps - last_ckpt} step(s)"
        )


if __name__ == "__main__":
    main()
