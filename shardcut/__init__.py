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
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# exported name -> module defining it. No exported name is also a submodule's name: importing
# `shardcut.verify` as a module would rebind `shardcut.verify` (tests/test_api.py checks it).
_EXPORTS = {
    "ShardcutError": "shardcut.format.errors",
    "Plan": "shardcut.plans.plan",
    "validate_plan": "shardcut.plans.plan",
    "prune": "shardcut.rewrite.writer",
    "PruneReport": "shardcut.rewrite.writer",
    "verify": "shardcut.ops.verification",
    "VerifyReport": "shardcut.ops.verification",
    "inspect_model": "shardcut.ops.summary",
    "Scores": "shardcut.plans.scores",
    "open_checkpoint": "shardcut.format.checkpoint",
    "describe": "shardcut.moe.model",
    "make_plan": "shardcut.ops.planning",
    "import_scores": "shardcut.plans.score_import",
    "merge_scores": "shardcut.plans.score_merge",
    "merge_score_files": "shardcut.plans.score_merge",
    "open_model": "shardcut.format.hub",
    "prune_model": "shardcut.rewrite.from_hub",
    "push": "shardcut.ops.publish",
    "calibrate": "shardcut.ops.calibration.runner",
    "evaluate": "shardcut.ops.evaluation.runner",
    "EvalReport": "shardcut.ops.evaluation.metrics",
    "EvalOptions": "shardcut.ops.evaluation.options",
    "merge_tally_files": "shardcut.ops.evaluation.tally",
}

if TYPE_CHECKING:
    from shardcut.format.checkpoint import open_checkpoint as open_checkpoint
    from shardcut.format.errors import ShardcutError as ShardcutError
    from shardcut.format.hub import open_model as open_model
    from shardcut.moe.model import describe as describe
    from shardcut.ops.calibration.runner import calibrate as calibrate
    from shardcut.ops.evaluation.metrics import EvalReport as EvalReport
    from shardcut.ops.evaluation.options import EvalOptions as EvalOptions
    from shardcut.ops.evaluation.runner import evaluate as evaluate
    from shardcut.ops.evaluation.tally import merge_tally_files as merge_tally_files
    from shardcut.ops.planning import make_plan as make_plan
    from shardcut.ops.publish import push as push
    from shardcut.ops.summary import inspect_model as inspect_model
    from shardcut.ops.verification import VerifyReport as VerifyReport
    from shardcut.ops.verification import verify as verify
    from shardcut.plans.plan import Plan as Plan
    from shardcut.plans.plan import validate_plan as validate_plan
    from shardcut.plans.score_import import import_scores as import_scores
    from shardcut.plans.score_merge import merge_score_files as merge_score_files
    from shardcut.plans.score_merge import merge_scores as merge_scores
    from shardcut.plans.scores import Scores as Scores
    from shardcut.rewrite.from_hub import prune_model as prune_model
    from shardcut.rewrite.writer import PruneReport as PruneReport
    from shardcut.rewrite.writer import prune as prune


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # bind once: later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'shardcut' has no attribute {name!r}")


__all__ = ["__version__", *_EXPORTS]
