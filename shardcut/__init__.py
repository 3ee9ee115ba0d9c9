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
    "ShardcutError": "shardcut.errors",
    "Plan": "shardcut.plan",
    "validate_plan": "shardcut.plan",
    "prune": "shardcut.rewrite",
    "PruneReport": "shardcut.rewrite",
    "verify": "shardcut.verification",
    "VerifyReport": "shardcut.verification",
    "inspect_model": "shardcut.summary",
    "Scores": "shardcut.scores",
    "open_checkpoint": "shardcut.checkpoint",
    "describe": "shardcut.model",
    "make_plan": "shardcut.planning",
    "import_scores": "shardcut.score_import",
    "merge_scores": "shardcut.scores",
    "merge_score_files": "shardcut.scores",
    "open_model": "shardcut.hub",
    "prune_model": "shardcut.stream",
    "push": "shardcut.publish",
    "calibrate": "shardcut.calibration.runner",
    "evaluate": "shardcut.evaluation.runner",
    "EvalReport": "shardcut.evaluation.metrics",
}

if TYPE_CHECKING:
    from shardcut.calibration.runner import calibrate as calibrate
    from shardcut.checkpoint import open_checkpoint as open_checkpoint
    from shardcut.errors import ShardcutError as ShardcutError
    from shardcut.evaluation.metrics import EvalReport as EvalReport
    from shardcut.evaluation.runner import evaluate as evaluate
    from shardcut.hub import open_model as open_model
    from shardcut.model import describe as describe
    from shardcut.plan import Plan as Plan
    from shardcut.plan import validate_plan as validate_plan
    from shardcut.planning import make_plan as make_plan
    from shardcut.publish import push as push
    from shardcut.rewrite import PruneReport as PruneReport
    from shardcut.rewrite import prune as prune
    from shardcut.score_import import import_scores as import_scores
    from shardcut.scores import Scores as Scores
    from shardcut.scores import merge_score_files as merge_score_files
    from shardcut.scores import merge_scores as merge_scores
    from shardcut.stream import prune_model as prune_model
    from shardcut.summary import inspect_model as inspect_model
    from shardcut.verification import VerifyReport as VerifyReport
    from shardcut.verification import verify as verify


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # bind once: later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'shardcut' has no attribute {name!r}")


__all__ = ["__version__", *_EXPORTS]
