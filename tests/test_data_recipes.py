"""Calibration data as REAP users bring it: recipes of the REAP reference's datasets, Hub ids read
offline from a locally built datasets cache, saved datasets, parquet, JSON, CSV, mappings, packing.

The expected token streams (`tests/fixtures/reap_expected.json`) were derived once, outside this
repository, by running the REAP reference's own code unmodified (CerebrasResearch/reap
`src/reap/data.py` at 1970473, with `vllm` stubbed since only its `TokensPrompt` class is
imported): for each seed 003 dataset, `DATASET_REGISTRY[name](dataset=_load_raw_dataset(name,
"train"), tokenizer=..., split_by_category=False)`, then `dataset.map(_map_fn)` and
`_encode_sample(row)` for every row, on the rows of `seed003_rows()` loaded from the cache
`build_hub_cache` writes, with `save_byte_tokenizer`'s tokenizer. The file stores each row's
token count and a sha256 of its ids; the reference's code is not part of this repository.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fixtures.reap_fixtures import (
    EXPECTED,
    SEED003,
    SEED003_SPEC,
    build_hub_cache,
    save_byte_tokenizer,
    seed003_rows,
    token_digest,
)

from shardcut.format.errors import ShardcutError
from shardcut.ops.calibration.data import load_data, parse_spec
from shardcut.ops.calibration.recipes import REAP_RECIPES, find_recipe

pytest.importorskip("datasets")
pytest.importorskip("transformers")
VOCAB = 512
BIG = 1 << 20  # no truncation


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bytetok")
    save_byte_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def rows() -> dict[str, list[dict]]:
    return seed003_rows()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, rows) -> Path:
    root = tmp_path_factory.mktemp("hf-datasets")
    for repo, r in rows.items():
        build_hub_cache(root, repo, {"train": r})
    build_hub_cache(
        root,
        "someone/plain-chat",
        {"train": [{"text": "hello there"}, {"text": "general kenobi"}], "test": [{"text": "only in test"}]},
        config="en",
    )
    return root


@pytest.fixture
def offline(cache_dir, monkeypatch):
    """HF_HUB_OFFLINE=1 with the datasets cache above (datasets reads both at import, so set them there too)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache_dir))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache_dir)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache_dir


def _load(spec: str, tok: Path, **kw):
    kw.setdefault("samples", None)
    return load_data(spec, tok, max_length=kw.pop("max_length", BIG), seed=kw.pop("seed", 0), vocab_size=VOCAB, **kw)


def _by_source(data, counts: list[int]) -> list[Counter]:
    out, at = [], 0
    for n in counts:
        out.append(Counter(tuple(token_digest(s)) for s in data.samples[at : at + n]))
        at += n
    assert at == len(data.samples)
    return out


def _expected() -> list[Counter]:
    stored = json.loads(EXPECTED.read_text())["datasets"]
    return [Counter(tuple(d) for d in stored[repo]) for repo in SEED003]


# -- the seed 003 mix, exactly as the reference formats it -----------------------------------------


def test_seed003_by_hub_id_gives_the_reference_token_streams(offline, tok_dir):
    data = _load(SEED003_SPEC, tok_dir)  # the seed's mix verbatim, Hub ids, offline from the cache
    assert _by_source(data, list(SEED003.values())) == _expected()
    assert any("recipe xlam-function-calling-60k" in n for n in data.notes)
    again = _load(SEED003_SPEC, tok_dir)
    assert again.fingerprint() == data.fingerprint()  # tool-call ids are derived, not uuid4


def test_seed003_from_local_files_in_the_real_schemas(tmp_path, tok_dir, rows):
    """The issue's `evol.jsonl:700,xlam.jsonl:330,swe.jsonl:330`: evol and xlam are recognised by
    their columns; SWE-smith's tool list needs its recipe named (its rows are plain messages)."""
    names = []
    for r, short in zip(rows.values(), ("evol", "xlam", "swe"), strict=True):
        path = tmp_path / f"{short}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in r))
        names.append(str(path))
    spec = f"{names[0]}:700,{names[1]}:330,{names[2]}{{recipe=SWE-smith-trajectories}}:330"
    assert _by_source(_load(spec, tok_dir), list(SEED003.values())) == _expected()


def test_every_reference_dataset_has_a_recipe():
    wanted = [
        "evol-codealpaca-v1",
        "xlam-function-calling-60k",
        "SWE-smith-trajectories",
        "tulu-3-sft-mixture",
        "Magicoder-Evol-Instruct-110K",
        "CodeFeedback-Filtered-Instruction",
        "c4",
        "mmlu",
        "WritingPrompts_curated",
        "tulu-3-sft-personas-math",
        "Mixture-of-Thoughts",
    ]
    assert sorted(r.name for r in REAP_RECIPES) == sorted(wanted)
    assert find_recipe("Salesforce/xlam-function-calling-60k").name == "xlam-function-calling-60k"


def test_turn_recipes_format_like_the_reference(tmp_path, tok_dir):
    """MMLU, WritingPrompts and Magicoder rows, against the reference's _map_fn written out."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cases = {
        "mmlu": (
            {"question": "2+2?", "choices": ["3", "4"], "subject": "math", "answer": 1},
            [{"role": "user", "content": "2+2? Choose from the following options: ['3', '4']"}],
        ),
        "WritingPrompts_curated": (
            {"prompt": "a cat", "body": "Once."},
            [
                {
                    "role": "user",
                    "content": "Please write a creative story using the following writing prompt:\n\n a cat",
                },
                {"role": "assistant", "content": "Once."},
            ],
        ),
        "Magicoder-Evol-Instruct-110K": (
            {"instruction": "sort", "response": "sorted()"},
            [{"role": "user", "content": "sort"}, {"role": "assistant", "content": "sorted()"}],
        ),
    }
    for name, (row, messages) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        got = _load(f"{path}{{recipe={name}}}", tok_dir).samples[0].tolist()
        assert got == tok(tok.apply_chat_template(messages, tokenize=False))["input_ids"], name


# -- sources --------------------------------------------------------------------------------------


def test_hub_subset_and_split(offline, tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    data = _load("someone/plain-chat[en](test)", tok_dir)
    assert [s.tolist() for s in data.samples] == [tok("only in test")["input_ids"]]
    assert len(_load("someone/plain-chat[en]", tok_dir).samples) == 2  # default split: train


def test_saved_datasets_parquet_json_csv_agree(tmp_path, tok_dir, rows):
    """One evol dataset through every local form gives the same token streams."""
    from datasets import Dataset, DatasetDict

    evol = rows["theblackcat102/evol-codealpaca-v1"][:20]
    ds = Dataset.from_list(evol)
    ds.save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_list(evol[:3]), "validation": ds}).save_to_disk(str(tmp_path / "dict"))
    ds.to_parquet(str(tmp_path / "evol.parquet"))
    (tmp_path / "repo" / "data").mkdir(parents=True)
    Dataset.from_list(evol[:10]).to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00002.parquet"))
    Dataset.from_list(evol[10:]).to_parquet(str(tmp_path / "repo" / "data" / "train-00001-of-00002.parquet"))
    Dataset.from_list(evol[:2]).to_parquet(str(tmp_path / "repo" / "data" / "test-00000-of-00001.parquet"))
    (tmp_path / "evol.json").write_text(json.dumps(evol))
    ds.to_csv(str(tmp_path / "evol.csv"), index=False)
    forms = [
        tmp_path / "saved",
        f"{tmp_path / 'dict'}(validation)",
        tmp_path / "evol.parquet",
        tmp_path / "repo",
        tmp_path / "evol.json",
        tmp_path / "evol.csv",
    ]
    streams = [sorted(s.tolist() for s in _load(str(f), tok_dir).samples) for f in forms]
    assert all(s == streams[0] for s in streams) and len(streams[0]) == 20
    assert len(_load(f"{tmp_path / 'repo'}(test)", tok_dir).samples) == 2
    assert len(_load(str(tmp_path / "dict"), tok_dir).samples) == 3  # train by default
    with pytest.raises(ShardcutError, match="split 'nope' not found"):
        _load(f"{tmp_path / 'dict'}(nope)", tok_dir)


def test_explicit_mapping_and_recipe_file(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    path = tmp_path / "qa.jsonl"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    path.write_text(
        json.dumps({"question": "why", "answer": "because", "sys": "be brief", "fns": json.dumps(tools)}) + "\n"
    )
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "why"},
        {"role": "assistant", "content": "because"},
    ]
    want = tok(tok.apply_chat_template(msgs, tools=tools, tokenize=False), add_special_tokens=False)["input_ids"]
    got = _load(f"{path}{{prompt=question;response=answer;system=sys;tools=fns}}", tok_dir).samples[0].tolist()
    assert got == want
    recipe = tmp_path / "qa.recipe.json"
    recipe.write_text(json.dumps({"prompt": "question", "response": "answer", "system": "sys", "tools": "fns"}))
    assert _load(f"{path}{{recipe={recipe}}}", tok_dir).samples[0].tolist() == want
    assert [s.spec for s in parse_spec(f"{path}{{prompt=a;response=b}}:3,x.txt")] == [str(path), "x.txt"]
    with pytest.raises(ShardcutError, match=r"needs columns \['nope'\]"):
        _load(f"{path}{{prompt=nope}}", tok_dir)
    with pytest.raises(ShardcutError, match="unknown mapping key"):
        _load(f"{path}{{question=prompt}}", tok_dir)


@pytest.mark.parametrize("spec", ["missing.jsonl", "data/missing.jsonl", "./nope", "not a repo", "a/b/c"])
def test_missing_local_path_fails_at_once(tmp_path, tok_dir, spec, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    with pytest.raises(ShardcutError, match="data source not found") as err:
        _load(spec, tok_dir)
    assert time.monotonic() - start < 2 and "\n" not in str(err.value)


def test_uncached_hub_id_offline_is_one_line(offline, tok_dir):
    with pytest.raises(ShardcutError, match="cannot load dataset") as err:
        _load("someone/not-cached", tok_dir)
    assert "\n" not in str(err.value)


# -- packing and truncation ------------------------------------------------------------------------


def test_packing_like_the_reference(tmp_path, tok_dir):
    path = tmp_path / "ids.jsonl"
    lengths = [5, 3, 9, 2, 7, 4, 6]
    samples = [list(range(10 * i + 1, 10 * i + 1 + n)) for i, n in enumerate(lengths)]
    path.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in samples))
    data = _load(f"{path}:2", tok_dir, max_length=8, sequences="pack", seed=3)
    order = np.random.default_rng([3, 0]).permutation(len(samples))
    stream = iter(samples[i] for i in order)
    want = []
    for _ in range(2):  # the reference's loop: fill from seq_idx, cut at the end, skip one position
        seq, pos = [], 0
        while pos < 8:
            take = next(stream)[: 8 - pos]
            seq += take
            pos += len(take) + 1
        want.append(seq)
    assert [s.tolist() for s in data.samples] == want
    assert data.sequences == "pack"
    assert _load(f"{path}:2", tok_dir, max_length=8, sequences="pack", seed=3).fingerprint() == data.fingerprint()
    everything = _load(str(path), tok_dir, max_length=8, sequences="pack")
    assert sum(len(s) for s in everything.samples) <= sum(lengths) and len(everything.samples[-1]) <= 8
    with pytest.raises(ShardcutError, match="fill only"):
        _load(f"{path}:30", tok_dir, max_length=8, sequences="pack")
    truncated = _load(str(path), tok_dir, max_length=4)
    assert truncated.sequences == "truncate" and sorted(s.tolist() for s in truncated.samples) == sorted(
        s[:4] for s in samples
    )


def test_calibrate_records_sequences_and_provenance(families, tmp_path):
    from fixtures.calib_fixtures import write_ids_jsonl

    from shardcut.format.checkpoint import layout_fingerprint, open_checkpoint
    from shardcut.ops.calibration.runner import calibrate

    src = families("qwen3_moe").source
    data = tmp_path / "ids.jsonl"
    write_ids_jsonl(data, [5, 9, 12, 4], 96)
    scores = calibrate(src, f"{data}:2", tmp_path / "s.safetensors", max_length=16, sequences="pack")
    meta = scores.metadata
    assert meta["sequences"] == "pack" and meta["gate_convention"] == "applied"
    assert meta["model_fingerprint"] == layout_fingerprint(open_checkpoint(src)) and len(meta["data_fingerprint"]) == 64
    packed = load_data(f"{data}:2", src, samples=None, max_length=16, seed=0, vocab_size=96, sequences="pack")
    assert int(meta["samples"]) == 2 and int(meta["tokens"]) == packed.tokens and len(packed.samples[0]) <= 16
    assert meta["data_fingerprint"] == packed.fingerprint()
