"""One Llama-4 MoE block: transformers' own forward against the calibration observer.

    .venv/bin/python bench/llama4_observer.py                 # 16 experts top-1 (Scout's routing), CPU
    .venv/bin/python bench/llama4_observer.py --experts 128   # Maverick's

transformers' Llama4TextMoe runs every expert on every token (`[E·T, H]`, zero rows for the
experts a token did not choose); the observer (`ScaledInputObserver`) runs the routed pairs only,
twice (on s·x for the layer's output, on x for the statistics). Both sides are timed interleaved
(A B A B ...), medians reported, and the observer's block output is checked against the model's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    from shardcut.ops.calibration.observe import ScaledInputObserver
    from shardcut.plans.scores import Scores

    torch.manual_seed(0)
    cfg = Llama4TextConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
    )
    block = Llama4TextMoe(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(1, args.tokens, args.hidden)
    scores = Scores.zeros(["0"], args.experts)
    obs = ScaledInputObserver(block.experts, block.router, scores, "0", args.top_k, 16384)
    times: dict[str, list[float]] = {"transformers": [], "observer": []}
    with torch.inference_mode():
        want, _ = block(x)
        with obs:
            got, _ = block(x)
        err = float((got - want).abs().max() / want.abs().max())
        assert obs.calls == 1 and scores.count.sum() == args.tokens * args.top_k  # the observer ran
        for _ in range(args.runs):
            for side in ("transformers", "observer"):
                t = time.perf_counter()
                if side == "observer":
                    with obs:
                        block(x)
                else:
                    block(x)
                times[side].append(time.perf_counter() - t)
    a, b = statistics.median(times["transformers"]), statistics.median(times["observer"])
    print(
        f"E={args.experts} top_k={args.top_k} H={args.hidden} I={args.intermediate} T={args.tokens}: "
        f"transformers {a * 1e3:.1f} ms, observer {b * 1e3:.1f} ms (x{b / a:.2f}); max rel. output diff {err:.1e}"
    )


if __name__ == "__main__":
    main()
