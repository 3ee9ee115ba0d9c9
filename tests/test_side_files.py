"""What travels beside the weights (issue 11.3/11.4, issue 17.9/17.11/17.13).

A gpt-oss checkpoint laid out as the Hub repo (`original/`, `metal/`, the card, shards numbered
from 00000) prunes to an OUT where no file holds a pruned expert or a stale count, which loads in
transformers; side files that are symlinks out of MODEL or FIFOs are refused; permission bits
travel; `verify` catches what a tampered OUT holds beside its tensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shardcut.format.errors import CheckpointError, ShardcutError
from shardcut.ops.verification import verify
from shardcut.plans.plan import Plan
from shardcut.rewrite.writer import prune
from tests.fixtures.families import KEPT
from tests.fixtures.gpt_oss_hub import SHARDS, build_gpt_oss_hub, expert_chunks, keep, raw_tensors

COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The gpt-oss Hub-layout source and its prune (by the library), shared by the tests."""
    root = tmp_path_factory.mktemp("gpt-oss")
    source = build_gpt_oss_hub(root / "gpt-oss-20b")
    out = root / "pruned"
    report = prune(source, out, Plan(keep(), {"criterion": "test"}))
    return source, out, report


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _copy(out: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "tampered"
    shutil.copytree(out, dest)
    return dest


def test_gpt_oss_hub_repo_prunes_to_a_clean_output(hub):
    source, out, report = hub
    left = {f["path"]: f["why"] for f in report.side_files if f["action"] == "leave"}
    assert set(left) == {"README.md", "metal/model.bin"} and all(left.values())
    assert {f["path"] for f in report.side_files if f["action"] in ("prune", "rewrite")} == {
        "original/model.safetensors",
        "original/config.json",
    }
    assert _files(out) == (_files(source) - {"README.md", "metal/model.bin"}) | {"shardcut-plan.json"}

    # no file of OUT holds a byte block of a pruned expert (main shards, original/, anything else)
    kept = keep()
    chunks = expert_chunks(source)
    pruned = {k: v for k, v in chunks.items() if k[1] not in kept[re.search(r"(?:layers|block)\.(\d+)\.", k[0])[1]]}
    assert pruned and len(pruned) == len(chunks) // 2
    blobs = {rel: (out / rel).read_bytes() for rel in _files(out)}
    for (where, e), chunk in pruned.items():
        holders = [rel for rel, blob in blobs.items() if chunk in blob]
        assert not holders, f"expert {e} of {where} found in {holders}"

    # no JSON file states the source's count
    for rel, blob in blobs.items():
        if rel.endswith(".json"):

            def counts(node):
                if isinstance(node, dict):
                    for k, v in node.items():
                        if k in COUNT_KEYS:
                            yield v
                        yield from counts(v)

            data = json.loads(blob)
            if rel == "shardcut-plan.json":
                assert data.pop("source")["num_experts"] == 8  # provenance: the count before, by design
            assert all(v == KEPT for v in counts(data)), rel
    assert json.loads((out / "original/config.json").read_text())["num_experts"] == KEPT
    assert verify(out).ok and verify(out, source=source).ok


def test_original_copy_holds_the_kept_experts(hub):
    """original/'s expert tensors are the source's rows at the kept ids (computed here from the
    raw bytes), and its router is the main checkpoint's pruned router in bf16."""
    import torch
    from safetensors.torch import load_file

    source, out, _ = hub
    src, got = raw_tensors(source / "original/model.safetensors"), raw_tensors(out / "original/model.safetensors")
    assert set(src) == set(got)
    kept = keep()
    for name, (shape, data) in src.items():
        if ".mlp." in name and not name.endswith("norm.scale"):
            layer = kept[name.split(".")[1]]
            per = len(data) // shape[0]
            want = b"".join(data[e * per : (e + 1) * per] for e in layer)
            assert got[name] == ([len(layer), *shape[1:]], want), name
        else:
            assert got[name] == (shape, data), name
    main = {}
    for shard in SHARDS:
        main.update(load_file(out / shard))
    orig = load_file(out / "original/model.safetensors")
    for n in kept:
        assert torch.equal(orig[f"block.{n}.mlp.gate.weight"], main[f"model.layers.{n}.mlp.router.weight"].bfloat16())
        assert torch.equal(
            orig[f"block.{n}.mlp.mlp2_bias"], main[f"model.layers.{n}.mlp.experts.down_proj_bias"].bfloat16()
        )


def test_source_names_and_index_metadata_kept(hub):
    source, out, report = hub
    assert report.shards == SHARDS and sorted(p.name for p in out.glob("model-*.safetensors")) == SHARDS
    src_meta = json.loads((source / "model.safetensors.index.json").read_text())["metadata"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    meta = index["metadata"]
    assert list(meta)[: len(src_meta)] == list(src_meta)  # the source's keys, in its order
    tensors = {}
    for shard in SHARDS:
        tensors.update({k: v[0] for k, v in raw_tensors(out / shard).items()})
    assert meta["total_parameters"] == sum(int(np.prod(s)) for s in tensors.values()) < src_meta["total_parameters"]
    assert meta["total_size"] == sum(len(v[1]) for s in SHARDS for v in raw_tensors(out / s).values())
    assert set(index["weight_map"].values()) == set(SHARDS)


def test_resharding_or_deepseek_names(hub, tmp_path):
    """Six-digit `-of-000003` names (DeepSeek-V3 style) are kept; a reshard names its own."""
    source, _, _ = hub
    ds = tmp_path / "ds"
    shutil.copytree(source, ds)
    renames = {s: f"model-{i + 1:05d}-of-{len(SHARDS):06d}.safetensors" for i, s in enumerate(SHARDS)}
    index = json.loads((ds / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: renames[v] for k, v in index["weight_map"].items()}
    (ds / "model.safetensors.index.json").write_text(json.dumps(index))
    for old, new in renames.items():
        (ds / old).rename(ds / new)
    report = prune(ds, tmp_path / "out", Plan(keep(), {}))
    assert report.shards == list(renames.values()) == sorted(p.name for p in (tmp_path / "out").glob("model-*"))
    resharded = prune(ds, tmp_path / "out2", Plan(keep(), {}), max_shard_size="100KB")
    assert resharded.shards == [
        f"model-{i:05d}-of-{len(resharded.shards):05d}.safetensors" for i in range(1, len(resharded.shards) + 1)
    ]
    assert verify(tmp_path / "out2", source=ds).ok


def test_pruned_gpt_oss_loads_in_transformers(hub):
    import torch
    from transformers import GptOssForCausalLM

    _, out, _ = hub
    model, info = GptOssForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.num_local_experts == KEPT
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == KEPT
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 3]])).logits).all()


def test_stale_records_and_counted_json_left_out(hub, tmp_path):
    """An earlier prune's plan, calibration/score files and a side JSON stating the source's
    expert count do not travel; each gets a line saying why."""
    source, _, _ = hub
    src = tmp_path / "src"
    shutil.copytree(source, src)
    (src / "shardcut-plan.json").write_text(json.dumps({"format": "shardcut-plan/1", "keep": {"0": [0]}}))
    (src / "calibration").mkdir()
    (src / "calibration/scores.safetensors").write_bytes((source / "original/model.safetensors").read_bytes())
    (src / "calibration/plan.json").write_text("{}")
    (src / "moe_params.json").write_text(json.dumps({"moe": {"num_local_experts": 8}}))
    (src / "weights.npz").write_bytes(b"PK\x03\x04")
    report = prune(src, tmp_path / "out", Plan(keep(), {}))
    left = {f["path"]: f["why"] for f in report.side_files if f["action"] == "leave"}
    assert {
        "shardcut-plan.json",
        "calibration/scores.safetensors",
        "calibration/plan.json",
        "moe_params.json",
        "weights.npz",
    } <= set(left)
    assert "num_local_experts=8" in left["moe_params.json"] and "earlier prune" in left["shardcut-plan.json"]
    out = tmp_path / "out"
    assert not (out / "calibration").exists() and not (out / "moe_params.json").exists()
    assert json.loads((out / "shardcut-plan.json").read_text())["keep"] == keep()
    assert verify(out, source=src).ok


def test_cli_prints_what_is_left_out(hub, tmp_path):
    from typer.testing import CliRunner

    from shardcut_cli.main import app

    source, _, _ = hub
    plan = tmp_path / "plan.json"
    Plan(keep(), {}).save(plan)
    result = CliRunner().invoke(
        app, ["prune", str(source), "-o", str(tmp_path / "out"), "--plan", str(plan), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "left out metal/model.bin" in text and "left out README.md" in text
    assert "pruned original/model.safetensors" in text


# ---- refusals: symlinks out of MODEL, special files ------------------------------------------


def _tiny(tmp_path: Path) -> Path:
    from shardcut.ops.demo import build_demo_model

    src = tmp_path / "model"
    build_demo_model(src)
    return src


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("tiny"))


def _demo_plan(src: Path) -> Plan:
    from shardcut.format.checkpoint import open_checkpoint
    from shardcut.moe.model import describe

    info = describe(open_checkpoint(src))
    return Plan({layer.key: list(range(0, info.num_experts, 2)) for layer in info.layers}, {})


def test_symlinked_side_file_outside_model_is_refused(tiny, tmp_path):
    src = tmp_path / "model"
    shutil.copytree(tiny, src)
    secret = tmp_path / "secret-token.txt"
    secret.write_text("hf_SECRET_TOKEN_123\n")
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to(secret)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="tokenizer.json: a symlink resolving outside"):
        prune(src, out, _demo_plan(src))
    assert not out.exists() and not list(tmp_path.glob(".out*"))

    # the same through the real CLI process: exit 2, one line, nothing written
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(_demo_plan(src).to_json()))
    run = subprocess.run(
        [sys.executable, "-m", "shardcut_cli.main", "prune", str(src), "-o", str(out), "--plan", str(plan)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "symlink resolving outside" in " ".join((run.stderr + run.stdout).split())
    assert not out.exists()
    assert "hf_SECRET" not in run.stdout + run.stderr

    # a symlink that stays inside MODEL is fine, and travels as a regular file
    (src / "tokenizer.json").unlink()
    (src / "real").mkdir()
    shutil.copy(tiny / "tokenizer.json", src / "real/tokenizer.json")
    (src / "tokenizer.json").symlink_to("real/tokenizer.json")
    (src / "tokenizer_copy.json").symlink_to("tokenizer_config.json")
    prune(src, out, _demo_plan(src))
    assert not (out / "tokenizer_copy.json").is_symlink()
    assert (out / "tokenizer_copy.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()


def test_symlinked_folder_outside_model_is_refused(tiny, tmp_path):
    src = tmp_path / "model"
    shutil.copytree(tiny, src)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("outside\n")
    (src / "assets").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(CheckpointError, match="assets: a symlink resolving outside"):
        prune(src, tmp_path / "out", _demo_plan(src))


def test_fifo_side_file_is_refused_without_hanging(tiny, tmp_path):
    src = tmp_path / "model"
    shutil.copytree(tiny, src)
    os.mkfifo(src / "vocab.txt")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(_demo_plan(src).to_json()))
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "shardcut_cli.main", "prune", str(src), "-o", str(out), "--plan", str(plan)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "vocab.txt: not a regular file" in " ".join((run.stderr + run.stdout).split())
    assert not out.exists()
    # verify meets a FIFO in OUT: a problem, not a hang
    (src / "vocab.txt").unlink()
    prune(src, out, _demo_plan(src))
    os.mkfifo(out / "notes.txt")
    ver = subprocess.run(
        [sys.executable, "-m", "shardcut_cli.main", "verify", str(out)], capture_output=True, text=True, timeout=120
    )
    assert ver.returncode != 0 and "notes.txt: not a regular file" in " ".join((ver.stdout + ver.stderr).split())


def test_permission_bits_are_kept(tiny, tmp_path):
    src = tmp_path / "model"
    shutil.copytree(tiny, src)
    for p in src.rglob("*"):
        if p.is_file():
            p.chmod(0o600)
    (src / "tokenizer_config.json").chmod(0o640)
    src.chmod(0o700)
    out = tmp_path / "out"
    prune(src, out, _demo_plan(src))
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert modes.pop("tokenizer_config.json") == 0o640
    assert set(modes.values()) == {0o600}, modes
    assert out.stat().st_mode & 0o777 == 0o700


# ---- verify: config, side files, expert-axis sizes -------------------------------------------


@pytest.mark.parametrize("tamper", ["empty_tokenizer", "empty_chat_template", "hidden_size", "eps_and_layers"])
def test_verify_source_catches_changed_side_files_and_config(hub, tmp_path, tamper):
    source, out, _ = hub
    bad = _copy(out, tmp_path)
    if tamper == "empty_tokenizer":
        (bad / "tokenizer.json").write_text("")
        where = "tokenizer.json"
    elif tamper == "empty_chat_template":
        (bad / "chat_template.jinja").write_text("")
        where = "chat_template.jinja"
    else:
        cfg = json.loads((bad / "config.json").read_text())
        if tamper == "hidden_size":
            cfg["hidden_size"] += 16
        else:
            cfg["rms_norm_eps"] = 0.1
            cfg["num_hidden_layers"] -= 1
        (bad / "config.json").write_text(json.dumps(cfg))
        where = "config.json"
    if tamper == "eps_and_layers":  # a layer count the tensors contradict: refused while describing OUT
        with pytest.raises(ShardcutError, match=r"config\.json: num_hidden_layers = 2 but"):
            verify(bad, source=source)
        return
    if tamper == "hidden_size":  # contradicts the embedding's shape: refused on opening (shardcut/moe/config_check.py)
        with pytest.raises(CheckpointError, match=r"hidden_size=64 but model.embed_tokens.weight has shape \[96, 48\]"):
            verify(bad, source=source)
        return
    report = verify(bad, source=source)
    assert not report.ok and any(p.startswith(where) for p in report.problems), report.problems


def test_verify_flags_stale_counts_and_unaccounted_weights(hub, tmp_path):
    source, out, _ = hub
    bad = _copy(out, tmp_path)
    (bad / "extra_config.json").write_text(json.dumps({"text": {"num_local_experts": 8}}))
    report = verify(bad)
    assert any("extra_config.json: text.num_local_experts=8 contradicts" in p for p in report.problems)

    bad2 = _copy(out, tmp_path / "b")
    (bad2 / "metal").mkdir()
    shutil.copy(source / "metal/model.bin", bad2 / "metal/model.bin")
    assert any(p.startswith("metal/model.bin: a weight file the index does not list") for p in verify(bad2).problems)

    bad3 = _copy(out, tmp_path / "c")
    shutil.copy(source / "original/model.safetensors", bad3 / "original/model.safetensors")  # unpruned copy
    problems = verify(bad3).problems
    assert any(p.startswith("original/:") and "dim 0" in p for p in problems), problems
    shutil.copy(source / "original/config.json", bad3 / "original/config.json")
    assert any("num_experts=8" in p for p in verify(bad3).problems)


def test_verify_source_catches_a_config_count_that_divides_the_real_one(hub, tmp_path):
    """config.json saying 2 experts over tensors of 4 (2 divides 4, so a multiple-of check
    passes) is refused: describing OUT checks the count against the router's expert rows."""
    source, out, _ = hub
    bad = _copy(out, tmp_path)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_local_experts"] = KEPT // 2
    cfg["num_experts_per_tok"] = 1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ShardcutError, match=r"config\.json: num_local_experts = 2 but layer 0's router .* has 4 expert rows"
    ):
        verify(bad, source=source)


def test_stream_applies_the_same_rules(hub, tmp_path, monkeypatch):
    """`prune --stream` from the Hub: the same side-file rules. The card, metal/ and original/
    (whose weights a stream never downloads) are left out with their reasons; everything else
    equals the local prune byte for byte."""
    import hashlib

    from shardcut.format import hub as hub_mod
    from shardcut.rewrite.from_hub import prune_model
    from tests.fixtures.hub_fixtures import FakeHubApi, use_cache

    source, local, _ = hub
    repo, sha = "openai/gpt-oss-tiny", hashlib.sha1(b"gpt-oss-tiny").hexdigest()
    use_cache(monkeypatch, tmp_path / "cache", offline=False)
    fake = FakeHubApi({repo: (source, sha)})
    monkeypatch.setattr(hub_mod, "hub_api", lambda: fake)

    def fetch(filename: str, dest: Path) -> Path:
        assert filename in SHARDS, filename  # only main shards are fetched
        shutil.copyfile(source / filename, dest / filename)
        return dest / filename

    out = tmp_path / "out"
    report = prune_model(repo, out, Plan(keep(), {"criterion": "test"}), stream=True, download=fetch)
    lines = {f["path"]: f["why"] for f in report.side_files if f["action"] == "leave"}
    assert {"README.md", "metal/model.bin", "original/config.json", "original/dtypes.json"} <= set(lines)
    assert "a streamed prune never downloads it" in lines["original/config.json"]
    assert not (out / "original").exists() and not (out / "metal").exists() and not (out / "README.md").exists()
    assert report.shards == SHARDS
    for rel in _files(out) - {"shardcut-plan.json"}:
        assert (out / rel).read_bytes() == (local / rel).read_bytes(), rel
    assert verify(out).ok


def test_a_vocabulary_token_spelled_like_a_count_is_not_a_count(tiny, tmp_path):
    src = tmp_path / "model"
    shutil.copytree(tiny, src)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["model"]["vocab"]["num_experts"] = len(tok["model"]["vocab"])
    (src / "tokenizer.json").write_text(json.dumps(tok))
    prune(src, tmp_path / "out", _demo_plan(src))
    assert (tmp_path / "out/tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
