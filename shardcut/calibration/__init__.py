"""Streaming REAP calibration: `calibrate(model, data, out)` writes a `shardcut-scores/1` file.

The submodules import torch; this package's top level does not, so `import shardcut.calibration`
stays cheap until `calibrate` is first used.

    >>> from shardcut.calibration import calibrate
    >>> scores = calibrate("Qwen/Qwen3-30B-A3B", "code.jsonl:700", "scores.safetensors")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shardcut.calibration.runner import CalibEvent as CalibEvent
    from shardcut.calibration.runner import Calibrator as Calibrator
    from shardcut.calibration.runner import calibrate as calibrate

__all__ = ["calibrate", "Calibrator", "CalibEvent"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from shardcut.calibration import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'shardcut.calibration' has no attribute {name!r}")
