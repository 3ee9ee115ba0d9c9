"""Streaming REAP calibration: `calibrate(model, data, out)` writes a `shardcut-scores/1` file.

The submodules import torch; this package's top level does not, so `import shardcut.ops.calibration`
stays cheap until `calibrate` is first used.

    >>> from shardcut.ops.calibration import calibrate
    >>> scores = calibrate("Qwen/Qwen3-30B-A3B", "code.jsonl:700", "scores.safetensors")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shardcut.ops.calibration.runner import CalibEvent as CalibEvent
    from shardcut.ops.calibration.runner import Calibrator as Calibrator
    from shardcut.ops.calibration.runner import calibrate as calibrate

__all__ = ["calibrate", "Calibrator", "CalibEvent"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from shardcut.ops.calibration import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'shardcut.ops.calibration' has no attribute {name!r}")
