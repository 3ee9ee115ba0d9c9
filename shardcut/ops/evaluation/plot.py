"""`shardcut eval --plot`: quality against ratio, and per-layer error of every variant, as a PNG.

matplotlib (the `eval` extra) is imported here only, with the Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path

from shardcut.format.errors import ShardcutError
from shardcut.ops.evaluation.metrics import EvalReport


def plot_report(report: EvalReport, path: str | Path) -> Path:
    """Write a 2x2 figure: perplexity, KL (mean and p99) and top-1 agreement against the fraction
    of experts pruned (the original at 0), and each variant's residual-stream error per layer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ShardcutError("the plot needs matplotlib (pip install 'shardcut[eval]')") from None
    path = Path(path)
    if not path.parent.is_dir():
        raise ShardcutError("the picture's folder does not exist", path.parent)
    variants = sorted(report.plans, key=lambda p: p.ratio)
    x = [0.0] + [p.ratio for p in variants]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (ppl, kl), (agree, layers) = axes
    ppl.plot(x, [report.perplexity] + [p.perplexity for p in variants], "o-")
    ppl.set(title="perplexity on the held-out data", xlabel="fraction of experts pruned", ylabel="perplexity")
    kl.plot(x[1:], [p.kl_mean for p in variants], "o-", label="mean")
    kl.plot(x[1:], [p.kl_p99 for p in variants], "s--", label="p99")
    kl.set(title="KL(original || pruned) per token", xlabel="fraction of experts pruned", ylabel="nats")
    kl.legend()
    agree.plot(x, [1.0] + [p.top1_agreement for p in variants], "o-")
    agree.set(title="top-1 agreement with the original", xlabel="fraction of experts pruned", ylim=(0, 1.02))
    for p in report.plans:
        layers.plot(range(len(p.residual_error)), p.residual_error, ".-", label=f"{p.name} ({p.ratio:.0%})")
    layers.set(title="relative error of the residual stream", xlabel="decoder layer", ylabel="||h' - h|| / ||h||")
    layers.legend(fontsize="small")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report.model}: {report.tokens:,} held-out tokens")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
