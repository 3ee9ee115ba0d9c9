"""CalibrateOptions is the one declaration of calibration settings (library and CLI); device
placement and timing go through one device-agnostic path, run here with a non-default device."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.calib_fixtures import write_ids_jsonl
from typer.testing import CliRunner

from shardcut.format.errors import ShardcutError
from shardcut.ops.calibration import stream
from shardcut.ops.calibration.options import CalibrateOptions
from shardcut.ops.calibration.runner import Calibrator, calibrate
from shardcut.plans.scores import Scores
from shardcut_cli.calibrate_cmd import FLAGS, calibrate_cmd
from shardcut_cli.main import app

pytest.importorskip("transformers")
VOCAB = 96
ROOT = Path(__file__).resolve().parents[1]
LIBRARY_ONLY = {"pair_chunk"}  # a tuning knob without a flag (it changes the float sums' order)


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "ids.jsonl"
    write_ids_jsonl(data, [20, 13, 7, 31], VOCAB)
    return data


def test_options_are_frozen_and_every_field_is_a_flag():
    opts = CalibrateOptions(max_length=64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.max_length = 32  # type: ignore[misc]
    params = set(inspect.signature(calibrate_cmd).parameters)
    fields = {f.name for f in dataclasses.fields(CalibrateOptions)} - LIBRARY_ONLY
    named = {"sequences": "pack"}  # the field whose flag has another name
    assert {named.get(f, f) for f in fields} <= params, "a CalibrateOptions field has no calibrate flag"
    # each flag's default and help are the field's (declared once, in CalibrateOptions)
    by_name = {f.name: f for f in dataclasses.fields(CalibrateOptions)}
    for name in fields - {"sequences"}:
        option = inspect.signature(calibrate_cmd).parameters[name].default
        assert option.default == by_name[name].default and option.help == by_name[name].metadata["help"], name
        assert by_name[name].metadata["flag"].partition("/")[0] in option.param_decls[0], name
    # the library call declares no setting of its own: they all come from the dataclass
    sig = inspect.signature(calibrate).parameters
    assert not fields & set(sig) and any(p.kind is p.VAR_KEYWORD for p in sig.values())


def test_bad_settings_name_the_parameter_and_the_cli_names_the_flag(families, tmp_path):
    data = _data(tmp_path)
    with pytest.raises(ShardcutError, match="^shard must look like i/N"):
        CalibrateOptions(shard="two")
    with pytest.raises(ShardcutError, match="^checkpoint_every must be >= 0"):
        CalibrateOptions(checkpoint_every=-1)
    with pytest.raises(ShardcutError, match="unknown calibration option 'max_lenght'"):
        calibrate(families("qwen3_moe").source, str(data), tmp_path / "s.safetensors", max_lenght=64)
    assert not (tmp_path / "s.safetensors").exists()
    out = tmp_path / "c.safetensors"
    for flag, value in (("--shard", "two"), ("--checkpoint-every", "-1")):
        result = CliRunner().invoke(
            app, ["calibrate", str(families("qwen3_moe").source), "--data", str(data), "-o", str(out), flag, value]
        )
        assert result.exit_code == 2 and f"{flag} " in result.output, result.output
        assert FLAGS[flag.removeprefix("--").replace("-", "_")] == flag
    assert not out.exists()


def test_options_object_and_keywords_agree(families, tmp_path):
    source, data = families("qwen3_moe").source, _data(tmp_path)
    a = calibrate(source, str(data), tmp_path / "a.safetensors", max_length=16, device="cpu")
    opts = CalibrateOptions(max_length=64, device="cpu")
    b = calibrate(source, str(data), tmp_path / "b.safetensors", opts, max_length=16)  # keywords replace fields
    for f in ("count", "gate_sum", "norm_sum", "reap_sum", "act_max", "tokens"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert a.metadata["max_length"] == b.metadata["max_length"] == "16"


def test_placement_and_timings_on_a_named_device(families, tmp_path, monkeypatch):
    """`device=torch.device("cpu", 0)` (not the default "auto"): every loaded parameter lands on
    that device through the one placement path, every layer reports where its time went, and
    reading ahead (prefetch) or not gives bit-identical statistics."""
    source, data = families("qwen3_moe").source, _data(tmp_path)
    placed: list[torch.device] = []
    original = stream.LayerLoader.load_layer

    def spy(self, i, raw):
        layer = original(self, i, raw)
        placed.extend(p.device for p in layer.parameters())
        return layer

    monkeypatch.setattr(stream.LayerLoader, "load_layer", spy)
    runs: dict[bool, tuple[Scores, list]] = {}
    for prefetch in (True, False):
        events: list = []
        opts = CalibrateOptions(max_length=64, device=torch.device("cpu", 0), prefetch=prefetch)
        cal = Calibrator(source, str(data), tmp_path / f"{prefetch}.safetensors", opts, progress=events.append)
        runs[prefetch] = (cal.run(), events)
        assert any("device cpu:0," in e.message for e in events if e.kind == "info")  # the run computes there
    assert placed and all(d.type == "cpu" for d in placed)
    for prefetch, (_, events) in runs.items():
        done = [e for e in events if e.kind == "layer_done"]
        assert len(done) == cal.skeleton.num_layers + 1 and all(e.times is not None for e in done)
        layers = [e.times for e in done[1:]]
        assert all(t.read_s > 0 and t.forward_s > 0 and t.load_s > 0 and t.peak_memory > 0 for t in layers)
        moe = [e.times for e in done[1:] if e.key is not None]
        assert moe and all(t.stats_s > 0 for t in moe)
        if not prefetch:  # read in turn: the compute waited for all of it
            assert all(t.wait_s >= t.read_s for t in layers)
        total = next(e.times for e in events if e.kind == "done")
        assert total.forward_s == pytest.approx(sum(e.times.forward_s for e in done))
    a, b = runs[True][0], runs[False][0]
    for f in ("count", "gate_sum", "norm_sum", "reap_sum", "act_max", "tokens"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_only_the_device_module_asks_cuda():
    """No `.cuda()` or `torch.cuda.*` in the calibration hot path: placement is `torch.device`
    passed down; device.py (and torchrun's set-up in distributed.py) alone ask CUDA anything."""
    allowed = {"device.py", "distributed.py"}
    offenders = []
    for path in [*sorted((ROOT / "shardcut/ops/calibration").glob("*.py")), ROOT / "shardcut/moe/dequant.py"]:
        if path.name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "cuda":
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders
