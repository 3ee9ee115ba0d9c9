"""shardcut: prune experts out of MoE safetensors checkpoints without loading the model.

The public API, one call per CLI command:

    >>> import shardcut
    >>> shardcut.inspect_model("Qwen3-30B-A3B")          # shardcut inspect
    >>> plan = shardcut.Plan.load("plan.json")
    >>> shardcut.prune("Qwen3-30B-A3B", "out", plan)     # shardcut prune --plan
    >>> shardcut.verify("out", source="Qwen3-30B-A3B")   # shardcut verify --source
    >>> plan, report = shardcut.make_plan("Qwen3-30B-A3B", "scores.safetensors", ratio=0.5)  # shardcut plan

Submodules import lazily, so `import shardcut` stays fast and needs neither torch nor numpy.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ShardcutError": "shardcut.errors",
    "Plan": "shardcut.plan",
    "validate_plan": "shardcut.plan",
    "prune": "shardcut.rewrite",
    "PruneReport": "shardcut.rewrite",
    "verify": "shardcut.verify",
    "inspect_model": "shardcut.summary",
    "Scores": "shardcut.scores",
    "open_checkpoint": "shardcut.checkpoint",
    "describe": "shardcut.model",
    "make_plan": "shardcut.select",
    "import_scores": "shardcut.score_import",
    "merge_scores": "shardcut.scores",
    "open_model": "shardcut.hub",
    "prune_model": "shardcut.stream",
    "push": "shardcut.push",
    "calibrate": "shardcut.calibrate",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'shardcut' has no attribute {name!r}")


__all__ = ["__version__", *_EXPORTS]
