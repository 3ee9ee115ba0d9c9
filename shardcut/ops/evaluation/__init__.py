"""`shardcut eval`: what a prune costs, measured before any byte is written.

`evaluate(model, data, plans=...)` streams MODEL one decoder layer at a time over held-out text,
carrying the original hidden states and one stream per plan (the plan applied as the router mask
of the DESIGN.md oracle, `shardcut.moe.oracle.forbid_pruned_experts`), or one stream per pruned
checkpoint (`pruned=[OUT]`, streamed next to its source). The submodules import torch; this
package's top level does not.

    >>> from shardcut.ops.evaluation import evaluate
    >>> report = evaluate("Qwen3-30B-A3B", "heldout.jsonl:200", scores="s.safetensors", ratios=[0.25, 0.5])
    >>> [(p.name, p.kl_mean, p.top1_agreement) for p in report.plans]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shardcut.ops.evaluation.metrics import EvalReport as EvalReport
    from shardcut.ops.evaluation.metrics import PlanQuality as PlanQuality
    from shardcut.ops.evaluation.options import EvalOptions as EvalOptions
    from shardcut.ops.evaluation.runner import evaluate as evaluate
    from shardcut.ops.evaluation.tally import EvalTally as EvalTally
    from shardcut.ops.evaluation.tally import merge_tallies as merge_tallies
    from shardcut.ops.evaluation.tally import merge_tally_files as merge_tally_files

_WHERE = {
    "evaluate": "runner",
    "EvalOptions": "options",
    "EvalReport": "metrics",
    "PlanQuality": "metrics",
    "EvalTally": "tally",
    "merge_tallies": "tally",
    "merge_tally_files": "tally",
}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"shardcut.ops.evaluation.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'shardcut.ops.evaluation' has no attribute {name!r}")
