"""One home for calibration facts: the architecture table. Every model type it lists either
calibrates (a tiny fixture of that model type is among those whose statistics tests/test_calibrate.py
checks against the float64 full-model reference) or carries an explicit reason, which the CLI prints
in one line. Every model type transformers can build a model for calibrates, or says why not."""

from __future__ import annotations

import json
import shutil

import pytest
from fixtures.calib_fixtures import write_ids_jsonl
from fixtures.families import FAMILIES
from test_calibrate import CALIBRATED

from shardcut.moe.architectures import ARCHITECTURES
from shardcut.ops.calibration.observe import calibratable_model_types, unsupported_reason

# config.json model_type of each calibrated fixture
_FIXTURE_TYPES = {(f.config_edits.get("model_type") or f.model_type): f.name for f in FAMILIES if f.name in CALIBRATED}
_CALIBRATED_TYPES = {f.model_type for f in FAMILIES if f.name in CALIBRATED} | set(_FIXTURE_TYPES)


def _all_types() -> list[tuple[str, str]]:
    return [(a.name, mt) for a in ARCHITECTURES for mt in a.model_types]


def _plain_config(arch: str, model_type: str) -> dict:
    """A config of `model_type` with the keys its entry's `unsupported_when` names turned off."""
    entry = next(a for a in ARCHITECTURES if a.name == arch)
    return {"model_type": model_type, **{k: 0 for k, _, _ in entry.calibration_of(model_type).unsupported_when}}


@pytest.mark.parametrize("arch,model_type", _all_types())
def test_every_model_type_calibrates_on_a_fixture_or_says_why_not(arch, model_type):
    reason = unsupported_reason(_plain_config(arch, model_type))
    if reason is None:
        assert model_type in _CALIBRATED_TYPES, f"{model_type} claims to calibrate but no fixture proves it"
        assert model_type in calibratable_model_types()
    else:
        assert reason.strip() and "\n" not in reason and len(reason) > 20
        assert model_type not in calibratable_model_types()


def test_every_family_transformers_registers_calibrates_or_is_explained():
    """The target of issue 12: whatever transformers can build calibrates; the rest is explained."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    explained = {mt: unsupported_reason(_plain_config(a, mt)) for a, mt in _all_types()}
    registered = [mt for mt in explained if mt in CONFIG_MAPPING_NAMES]
    unregistered = [mt for mt in explained if mt not in CONFIG_MAPPING_NAMES]
    assert all(explained[mt] for mt in unregistered if mt != "kimi_k2"), unregistered  # kimi_k2: an alias
    calibrates = [mt for mt in registered if explained[mt] is None]
    assert len(calibrates) >= 39
    # what transformers builds but shardcut does not calibrate, each with its reason
    assert {mt for mt in registered if explained[mt]} == {
        "deepseek_v4",
        "jetmoe",
        "step3p5",
    }


def test_a_config_switch_can_make_a_family_uncalibratable():
    """Gemma-4 calibrates without per-layer inputs or shared KV (its MoE checkpoints), not with them."""
    assert unsupported_reason({"model_type": "gemma4_text", "hidden_size_per_layer_input": 0}) is None
    assert "per-layer token inputs" in unsupported_reason({"model_type": "gemma4_text"})  # transformers' default 256
    wrapped = {"model_type": "gemma4", "text_config": {"hidden_size_per_layer_input": 0, "num_kv_shared_layers": 2}}
    assert "keys and values of earlier layers" in unsupported_reason(wrapped)


def test_the_cli_prints_the_reason_in_one_line(families, tmp_path):
    from typer.testing import CliRunner

    from shardcut_cli.main import app

    model = tmp_path / "model"
    shutil.copytree(families("gemma4").source, model)
    config = json.loads((model / "config.json").read_text())
    config["hidden_size_per_layer_input"] = 8  # Gemma-4's small dense models' per-layer inputs
    (model / "config.json").write_text(json.dumps(config))
    data = tmp_path / "ids.jsonl"
    write_ids_jsonl(data, [5], json.loads((model / "config.json").read_text())["vocab_size"])
    result = CliRunner().invoke(app, ["calibrate", str(model), "--data", str(data), "-o", str(tmp_path / "s.st")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot calibrate model_type='gemma4_text'" in lines[0]
    assert unsupported_reason(config) in " ".join(result.output.split())
    assert not (tmp_path / "s.st").exists()
