"""Calibration data specs, and bad input: one-line ShardcutError, CLI exit code 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures.calib_fixtures import save_tokenizer, write_ids_jsonl
from typer.testing import CliRunner

from shardcut.format.errors import ShardcutError
from shardcut.ops.calibration.data import load_data, parse_spec
from shardcut.ops.calibration.runner import calibrate, parse_shard
from shardcut.plans.scores import Scores
from shardcut_cli.main import app

pytest.importorskip("transformers")
VOCAB = 96
TEXT_LINES = "first line of text\nsecond line here\n\nthird line\n"
PARAGRAPHS = "one paragraph\nstill the first\n\nthe second paragraph\n\n\nthe third\n"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(path, VOCAB)
    return path


@pytest.fixture(scope="session")
def model_with_tokenizer(families, tokenizer_dir, tmp_path_factory) -> Path:
    """The tiny Qwen3-MoE with a real tokenizer (the family fixture carries a stub)."""
    path = tmp_path_factory.mktemp("qwen3-tok") / "model"
    shutil.copytree(families("qwen3_moe").source, path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def _load(spec: str, model_dir: Path, **kw):
    kw.setdefault("samples", None)
    return load_data(
        spec, model_dir, max_length=kw.pop("max_length", 64), seed=kw.pop("seed", 0), vocab_size=VOCAB, **kw
    )


# -- data specs ---------------------------------------------------------------------------------


def test_parse_spec_counts_and_paths(tmp_path):
    assert [(s.spec, s.count) for s in parse_spec("a.jsonl:700, b.txt")] == [("a.jsonl", 700), ("b.txt", None)]
    odd = tmp_path / "name:12"
    odd.write_text("x\n")
    assert parse_spec(str(odd))[0].count is None  # an existing path is a path, even with ':N' in it
    with pytest.raises(ShardcutError):
        parse_spec("a.txt:0")
    with pytest.raises(ShardcutError):
        parse_spec("a.txt,,b.txt")


def test_txt_lines_or_paragraphs(tmp_path, tokenizer_dir):
    lines, paras = tmp_path / "lines.txt", tmp_path / "paras.txt"
    lines.write_text("alpha beta\ngamma\ndelta epsilon\n")
    paras.write_text(PARAGRAPHS)
    a = _load(str(lines), tokenizer_dir)
    b = _load(str(paras), tokenizer_dir)
    assert len(a.samples) == 3 and "one sample per line" in a.notes[0]
    assert len(b.samples) == 3 and "blank-line-separated paragraph" in b.notes[0]


def test_jsonl_text_messages_and_input_ids(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    msgs = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the quick fox"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        "\n".join(json.dumps(o) for o in [{"text": "a router sends"}, {"messages": msgs}, {"input_ids": [5, 6, 7]}])
        + "\n"
    )
    data = _load(str(path), tokenizer_dir)
    got = sorted(s.tolist() for s in data.samples)
    want = sorted(
        [
            tok("a router sends")["input_ids"],
            tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"],
            [5, 6, 7],
        ]
    )
    assert got == want


def test_mixture_counts_selection_and_truncation(tmp_path, tokenizer_dir):
    a = tmp_path / "a.jsonl"
    write_ids_jsonl(a, [10] * 8, VOCAB, seed=1)
    b = tmp_path / "b.txt"
    b.write_text("\n".join(f"the quick brown fox {i}" for i in range(6)))
    data = _load(f"{a}:3,{b}", tokenizer_dir, samples=5, max_length=4)
    assert len(data.samples) == 5 and all(len(s) <= 4 for s in data.samples)
    again = _load(f"{a}:3,{b}", tokenizer_dir, samples=5, max_length=4)
    other = _load(f"{a}:3,{b}", tokenizer_dir, samples=5, max_length=4, seed=7)
    assert data.fingerprint() == again.fingerprint() != other.fingerprint()
    source = [json.loads(line)["input_ids"][:4] for line in a.read_text().splitlines()]
    assert all(s.tolist() in source for s in data.samples[:3])  # the first three come from a.jsonl, truncated


def test_folder_of_files(tmp_path, tokenizer_dir):
    (tmp_path / "d").mkdir()
    write_ids_jsonl(tmp_path / "d" / "x.jsonl", [4, 5], VOCAB)
    (tmp_path / "d" / "y.txt").write_text("hello world\nthe fox\n")
    assert len(_load(str(tmp_path / "d"), tokenizer_dir).samples) == 4


# -- bad input: library ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "not found"),
        ("", "empty"),
        ("\n\n  \n", "empty"),
        ('{"nothing": 1}\n', "row 1"),
        ('{"input_ids": [1, 500]}\n', "vocabulary"),
    ],
)
def test_bad_data_files(tmp_path, tokenizer_dir, content, match):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ShardcutError, match=match) as err:
        _load(str(path), tokenizer_dir)
    assert "\n" not in str(err.value)


def test_more_samples_than_data(tmp_path, tokenizer_dir):
    path = tmp_path / "ids.jsonl"
    write_ids_jsonl(path, [4, 5, 6], VOCAB)
    with pytest.raises(ShardcutError, match="holds only 3"):
        _load(str(path), tokenizer_dir, samples=4)
    with pytest.raises(ShardcutError, match="holds only 3"):
        _load(f"{path}:5", tokenizer_dir)


def test_no_tokenizer_for_text(families, tmp_path):
    bare = tmp_path / "model"
    shutil.copytree(families("qwen3_moe").source, bare, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    text = tmp_path / "t.txt"
    text.write_text("hello world\n")
    with pytest.raises(ShardcutError, match="tokenizer"):
        calibrate(bare, str(text), tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors").exists()


def test_messages_need_a_chat_template(tmp_path, tokenizer_dir):
    plain = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ShardcutError, match="chat template"):
        _load(str(path), plain)


def test_unsupported_architecture(families, tmp_path):
    data = tmp_path / "ids.jsonl"
    write_ids_jsonl(data, [5], VOCAB)
    with pytest.raises(ShardcutError, match="deepseek_v4.*hash-routed"):
        calibrate(families("deepseek_v4").source, str(data), tmp_path / "s.safetensors")


def test_bad_shard_and_device(families, tmp_path):
    data = tmp_path / "ids.jsonl"
    write_ids_jsonl(data, [5, 6], VOCAB)
    for shard in ("3/2", "0/2", "a/b"):
        with pytest.raises(ShardcutError, match="shard"):
            parse_shard(shard)
    with pytest.raises(ShardcutError, match="no samples"):
        calibrate(families("qwen3_moe").source, str(data), tmp_path / "s.safetensors", shard="3/3")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ShardcutError, match="CUDA"):
            calibrate(families("qwen3_moe").source, str(data), tmp_path / "s.safetensors", device="cuda")


class _Stop(Exception):
    pass


def _interrupted(model: Path, data: Path, out: Path) -> None:
    def stop(event):
        if event.kind == "layer_done" and event.step == 2:
            raise _Stop

    with pytest.raises(_Stop):
        calibrate(model, str(data), out, max_length=64, progress=stop)


def test_resume_state_from_another_run(families, tmp_path):
    data, other = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_ids_jsonl(data, [5, 9, 12], VOCAB, seed=0)
    write_ids_jsonl(other, [5, 9, 12], VOCAB, seed=1)
    out = tmp_path / "s.safetensors"
    _interrupted(families("qwen3_moe").source, data, out)
    with pytest.raises(ShardcutError, match="another run: data"):
        calibrate(families("qwen3_moe").source, str(other), out, max_length=64, resume=True)
    with pytest.raises(ShardcutError, match="another run: model"):
        calibrate(families("olmoe").source, str(data), out, max_length=64, resume=True)
    with pytest.raises(ShardcutError, match="another run: max_length"):
        calibrate(families("qwen3_moe").source, str(data), out, max_length=32, resume=True)
    assert not out.exists()
    # the state survived the refusals: the right run still resumes
    calibrate(families("qwen3_moe").source, str(data), out, max_length=64, resume=True)
    assert out.exists()


# -- the command ----------------------------------------------------------------------------------


def test_cli_bad_input_exits_2(families, tmp_path):
    runner = CliRunner()
    model = str(families("qwen3_moe").source)
    out = tmp_path / "s.safetensors"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        ["calibrate", model, "--data", str(tmp_path / "missing.txt"), "-o", str(out)],
        ["calibrate", model, "--data", str(empty), "-o", str(out)],
        ["calibrate", str(families("deepseek_v4").source), "--data", str(empty), "-o", str(out)],
        ["calibrate", model, "--data", str(empty), "-o", str(tmp_path / "no" / "s.safetensors")],
        ["calibrate", model, "--data", str(empty), "-o", str(out), "--dtype", "int3"],
    ]
    for args in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "error:" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_cli_calibrates_text_with_json_summary(model_with_tokenizer, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(PARAGRAPHS)
    out = tmp_path / "s.safetensors"
    result = CliRunner().invoke(
        app,
        [
            "calibrate",
            str(model_with_tokenizer),
            "--data",
            str(text),
            "-o",
            str(out),
            "--max-length",
            "16",
            "--samples",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    scores = Scores.load(out)
    assert summary["layers"] == scores.layers == ["1", "2", "3"]
    assert summary["samples"] == 2 and summary["tokens"] == int(scores.tokens[0])
    np.testing.assert_array_equal(scores.count.sum(1), 2 * scores.tokens)


def test_saved_dataset_folder_needs_datasets(tmp_path, tokenizer_dir):
    import importlib.util

    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ShardcutError, match="datasets"):
            _load(str(folder), tokenizer_dir)
    else:
        with pytest.raises(ShardcutError, match="cannot load dataset"):
            _load(str(folder), tokenizer_dir)


def test_demo_calibrates_plans_prunes_and_verifies(tmp_path):
    from shardcut.ops.demo import run_demo

    lines = []
    report = run_demo(tmp_path / "demo", log=lines.append)
    assert report["passed"] and report["verify_ok"] and report["experts_after"] == 8
    scores = Scores.load(report["scores"])
    assert scores.metadata["data"].endswith("demo.txt") and report["calibration_tokens"] > 500
    assert any("blank-line-separated" in line for line in lines)
    assert report["eval"].kind == "checkpoint" and report["eval"].kl_mean > 0 and report["eval"].top1_agreement > 0.5


def test_unreadable_quantization_is_refused(families, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(families("qwen3_moe").source, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}  # compressed-tensors is read since issue 5
    (model / "config.json").write_text(json.dumps(cfg))
    data = tmp_path / "ids.jsonl"
    write_ids_jsonl(data, [5], VOCAB)
    with pytest.raises(ShardcutError, match="cannot dequantize quant_method 'gptq'"):
        calibrate(model, str(data), tmp_path / "s.safetensors")
