"""Streaming REAP calibration: `calibrate(model, data, out)` writes a `shardcut-scores/1` file.

The submodules import torch; this package's top level does not, so `import shardcut.calibrate`
stays cheap until `calibrate` is called.

    >>> from shardcut.calibrate import calibrate
    >>> scores = calibrate("Qwen/Qwen3-30B-A3B", "code.jsonl:700", "scores.safetensors")
"""

from __future__ import annotations


def calibrate(model, data, out, **kwargs):
    """See `shardcut.calibrate.runner.calibrate` (same arguments)."""
    from shardcut.calibrate.runner import calibrate as run

    return run(model, data, out, **kwargs)


def __getattr__(name: str):
    if name in ("Calibrator", "CalibEvent"):
        from shardcut.calibrate import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'shardcut.calibrate' has no attribute {name!r}")


__all__ = ["calibrate", "Calibrator", "CalibEvent"]
