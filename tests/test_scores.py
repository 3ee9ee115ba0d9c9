"""The score file (shardcut.plans.scores): accumulate, save/load, validation, merge; `scores show/merge`."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from shardcut.format.errors import ShardcutError
from shardcut.plans.score_merge import merge_scores, parse_weighted
from shardcut.plans.scores import Scores, file_sha256
from shardcut_cli.main import app

runner = CliRunner()


def filled(layers=("1", "2"), E=4, seed=0, metadata=None) -> Scores:
    s = Scores.zeros(list(layers), E, metadata or {"model": "org/m", "architecture": "deepseek_v3"})
    rng = np.random.default_rng(seed)
    for key in s.layers:
        n = 40
        s.accumulate(key, rng.integers(0, E, n), rng.random(n), rng.random(n) * 3, rng.normal(size=n), tokens=n // 2)
    return s


def test_accumulate_sums_routed_pairs():
    s = Scores.zeros(["3"], 4)
    s.accumulate(
        "3", experts=[1, 1, 2], gates=[0.5, 0.25, 1.0], norms=[2.0, 4.0, 3.0], peaks=[-7.0, 2.0, 1.5], tokens=2
    )
    np.testing.assert_array_equal(s.count[0], [0, 2, 1, 0])
    np.testing.assert_allclose(s.gate_sum[0], [0, 0.75, 1.0, 0])
    np.testing.assert_allclose(s.norm_sum[0], [0, 6.0, 3.0, 0])
    np.testing.assert_allclose(s.reap_sum[0], [0, 0.5 * 2 + 0.25 * 4, 3.0, 0])
    np.testing.assert_allclose(s.act_max[0], [0, 7.0, 1.5, 0])  # max |f_j(x)_i|
    assert s.tokens[0] == 2
    with pytest.raises(ValueError):
        s.accumulate("3", [4], [1.0], [1.0], [1.0])


def test_save_load_round_trip(tmp_path):
    s = filled()
    s.save(tmp_path / "s.safetensors")
    back = Scores.load(tmp_path / "s.safetensors")
    assert back.layers == s.layers and back.has_sums and back.values == {}
    for name in ("count", "gate_sum", "norm_sum", "reap_sum", "act_max", "tokens"):
        np.testing.assert_array_equal(getattr(back, name), getattr(s, name))
    assert back.metadata["model"] == "org/m" and back.metadata["num_experts"] == "4"
    assert file_sha256(tmp_path / "s.safetensors") == s.sha256() == back.sha256()
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write leaves no temporary behind


def test_string_layer_keys_survive(tmp_path):
    s = filled(layers=("3", "mtp.0"))
    s.save(tmp_path / "s.safetensors")
    assert Scores.load(tmp_path / "s.safetensors").layers == ["3", "mtp.0"]
    assert load_file(str(tmp_path / "s.safetensors"))["layers"].tolist() == [3, -1]


def test_values_only_file(tmp_path):
    s = Scores.from_values(["1", "2"], {"reap": np.array([[0.1, 0.2], [0.3, 0.0]])}, {"model": "m"})
    s.save(tmp_path / "v.safetensors")
    raw = load_file(str(tmp_path / "v.safetensors"))
    assert set(raw) == {"layers", "criterion.reap"}  # no made-up sums on disk
    back = Scores.load(tmp_path / "v.safetensors")
    assert not back.has_sums and back.num_experts == 2
    np.testing.assert_array_equal(back.values["reap"], s.values["reap"])


def _write_raw(path, tensors, meta):
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t, m: t["count"].__setitem__((0, 1), np.nan), "'count' holds NaN"),
        (lambda t, m: t["reap_sum"].__setitem__((1, 0), -1.0), "'reap_sum' holds NaN, infinite or negative"),
        (lambda t, m: t["act_max"].__setitem__((1, 0), -0.5), "'act_max' holds NaN, infinite or negative"),
        (lambda t, m: t.__setitem__("gate_sum", np.zeros((2, 3))), "'gate_sum' has shape [2, 3]"),
        (lambda t, m: t.__setitem__("tokens", np.zeros(3)), "'tokens' must be [2]"),
        (lambda t, m: t.pop("norm_sum"), "missing tensor 'norm_sum'"),
        (lambda t, m: t.__setitem__("count", t["count"].astype(np.float32)), "dtype F32, expected F64"),
        (lambda t, m: m.__setitem__("format", "pt"), "not a shardcut-scores/1 file"),
        (lambda t, m: m.__setitem__("layer_keys", "1,1"), "duplicate layer keys"),
        (lambda t, m: m.__setitem__("num_experts", "8"), "num_experts=8 but the arrays hold 4"),
        (lambda t, m: m.__setitem__("layer_keys", "1,2\nx"), "layer key '2\\nx' is not a plan key"),
    ],
)
def test_bad_files_are_refused(tmp_path, mutate, message):
    s = filled()
    tensors, meta = s.tensors(), s.file_metadata()
    mutate(tensors, meta)
    path = _write_raw(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(ShardcutError, match=re.escape(message)) as exc:
        Scores.load(path)
    assert str(exc.value).startswith(str(path)) and "\n" not in str(exc.value)


def test_not_a_safetensors_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ShardcutError, match="truncated"):
        Scores.load(tmp_path / "x.safetensors")
    with pytest.raises(ShardcutError, match="file not found"):
        Scores.load(tmp_path / "missing.safetensors")


def test_save_refuses_invalid_scores(tmp_path):
    s = filled()
    s.count[0, 0] = -1
    with pytest.raises(ShardcutError, match="negative"):
        s.save(tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors").exists()


def test_merge_adds_weighted_sums_and_takes_maxima():
    a, b = filled(seed=1), filled(seed=2, layers=("2", "1"))  # same layers, another order
    m = merge_scores([(a, 2.0), (b, 1.0)])
    assert m.layers == a.layers
    rows_b = [b.row(k) for k in a.layers]
    for name in ("count", "gate_sum", "norm_sum", "reap_sum"):
        np.testing.assert_allclose(getattr(m, name), 2 * getattr(a, name) + getattr(b, name)[rows_b])
    np.testing.assert_allclose(m.act_max, np.maximum(a.act_max, b.act_max[rows_b]))
    np.testing.assert_allclose(m.tokens, 2 * a.tokens + b.tokens[rows_b])
    assert m.metadata["model"] == "org/m" and len(json.loads(m.metadata["merged_from"])) == 2
    local = filled(seed=3, metadata={"model": "/data/models/m", "samples": "5"})
    a.metadata["samples"] = "7"
    assert merge_scores([(a, 1.0), (local, 1.0)]).metadata["samples"] == "12"  # same name, local copy
    # equal weights: merging two halves of a run equals the run over all pairs
    whole, half1, half2 = (Scores.zeros(["1"], 4) for _ in range(3))
    rng = np.random.default_rng(9)
    ids, g, n, p = rng.integers(0, 4, 50), rng.random(50), rng.random(50), rng.random(50)
    whole.accumulate("1", ids, g, n, p, 50)
    half1.accumulate("1", ids[:20], g[:20], n[:20], p[:20], 20)
    half2.accumulate("1", ids[20:], g[20:], n[20:], p[20:], 30)
    both = merge_scores([(half1, 1.0), (half2, 1.0)])
    for name in ("count", "gate_sum", "norm_sum", "reap_sum", "act_max", "tokens"):
        np.testing.assert_allclose(getattr(both, name), getattr(whole, name))


@pytest.mark.parametrize(
    "other, message",
    [
        (filled(E=8), "has 8 experts per layer"),
        (filled(layers=("1", "3")), "layer sets differ"),
        (filled(metadata={"model": "org/other"}), "scores of another model: model is 'org/other'"),
        (Scores.from_values(["1", "2"], {"reap": np.ones((2, 4))}), "merging is impossible"),
    ],
)
def test_merge_refuses_mismatches(other, message):
    with pytest.raises(ShardcutError, match=message):
        merge_scores([(filled(), 1.0), (other, 1.0)], ["a.safetensors", "b.safetensors"])


def test_parse_weighted(tmp_path):
    assert parse_weighted("a.safetensors") == (tmp_path.__class__("a.safetensors"), 1.0)
    assert parse_weighted("dir/a.safetensors:2.5") == (tmp_path.__class__("dir/a.safetensors"), 2.5)
    with pytest.raises(ShardcutError, match="positive"):
        parse_weighted("a.safetensors:0")


# ---------------------------------------------------------------------------------------------
# CLI


def test_show_command(tmp_path):
    s = filled()
    s.count[0, 3] = s.gate_sum[0, 3] = s.norm_sum[0, 3] = s.reap_sum[0, 3] = s.act_max[0, 3] = 0  # never routed
    s.save(tmp_path / "s.safetensors")
    r = runner.invoke(app, ["scores", "show", str(tmp_path / "s.safetensors")])
    assert r.exit_code == 0, r.output
    assert "never routed" in r.output and "1: 3" in r.output
    r = runner.invoke(app, ["scores", "show", str(tmp_path / "s.safetensors"), "--criterion", "frequency", "--json"])
    data = json.loads(r.output)
    assert data["criterion"] == "frequency" and data["num_experts"] == 4 and data["has_sums"]
    row = data["layers"][0]
    assert set(row) == {"layer", "tokens", "never_routed", "lowest", "highest"}
    assert row["never_routed"] == [3] and row["lowest"][0] == [3, 0.0]
    order = np.lexsort((np.arange(4), -s.count[0]))
    assert [i for i, _ in row["highest"]] == order[:3].tolist()


def test_merge_command(tmp_path):
    filled(seed=1).save(tmp_path / "a.safetensors")
    filled(seed=2).save(tmp_path / "b.safetensors")
    r = runner.invoke(
        app,
        [
            "scores",
            "merge",
            str(tmp_path / "a.safetensors"),
            f"{tmp_path / 'b.safetensors'}:3",
            "-o",
            str(tmp_path / "m.safetensors"),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert [i["weight"] for i in data["inputs"]] == [1.0, 3.0]
    m = Scores.load(tmp_path / "m.safetensors")
    a, b = Scores.load(tmp_path / "a.safetensors"), Scores.load(tmp_path / "b.safetensors")
    np.testing.assert_allclose(m.count, a.count + 3 * b.count)


@pytest.mark.parametrize(
    "make_b, message",
    [
        (lambda: filled(E=8), "has 8 experts per layer"),
        (lambda: filled(layers=("1", "3")), "layer sets differ"),
        (lambda: filled(metadata={"model": "org/other"}), "scores of another model"),
    ],
)
def test_merge_command_bad_input_exits_2(tmp_path, make_b, message):
    filled().save(tmp_path / "a.safetensors")
    make_b().save(tmp_path / "b.safetensors")
    before = (tmp_path / "a.safetensors").read_bytes()
    r = runner.invoke(
        app,
        [
            "scores",
            "merge",
            str(tmp_path / "a.safetensors"),
            str(tmp_path / "b.safetensors"),
            "-o",
            str(tmp_path / "m.safetensors"),
        ],
    )
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.safetensors").exists() and (tmp_path / "a.safetensors").read_bytes() == before


def test_merge_command_never_overwrites_an_input(tmp_path):
    filled(seed=1).save(tmp_path / "a.safetensors")
    filled(seed=2).save(tmp_path / "b.safetensors")
    before = (tmp_path / "a.safetensors").read_bytes()
    r = runner.invoke(
        app,
        [
            "scores",
            "merge",
            str(tmp_path / "a.safetensors"),
            str(tmp_path / "b.safetensors"),
            "-o",
            str(tmp_path / "a.safetensors"),
        ],
    )
    assert r.exit_code == 2 and "is one of the inputs" in r.output
    assert (tmp_path / "a.safetensors").read_bytes() == before


def test_show_command_refuses_nan(tmp_path):
    s = filled()
    tensors = s.tensors()
    tensors["norm_sum"][0, 0] = np.nan
    _write_raw(tmp_path / "nan.safetensors", tensors, s.file_metadata())
    r = runner.invoke(app, ["scores", "show", str(tmp_path / "nan.safetensors")])
    assert r.exit_code == 2 and "'norm_sum' holds NaN" in r.output and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["scores", "show", str(tmp_path / "nan.safetensors").replace("nan.", "x.")])
    assert r.exit_code == 2 and "file not found" in r.output
    s.save(tmp_path / "ok.safetensors")
    r = runner.invoke(app, ["scores", "show", str(tmp_path / "ok.safetensors"), "-c", "nope"])
    assert r.exit_code == 2 and "unknown criterion 'nope'" in r.output
