"""`shardcut push`: the generated model card (parsed back with ModelCard.load), the exact file
list of a dry run, the upload through a recording HfApi-compatible fake, and refusals; the
card's parameter counts (quantized, fused), its commands run in real processes, and symlinks
leading out of OUT."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from fixtures.hub_fixtures import REPO, SCORE_META, FakeHubApi, http_error, set_token, tiny
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from shardcut.format import hub
from shardcut.format.checkpoint import open_checkpoint
from shardcut.format.errors import CheckpointError, ShardcutError
from shardcut.moe.model import describe
from shardcut.moe.parameters import count_parameters
from shardcut.ops.card import TAGS
from shardcut.ops.publish import PROVENANCE_NAME, push
from shardcut.plans.plan import Plan
from shardcut.plans.scores import file_sha256
from shardcut_cli.main import app

TARGET = "me/tiny-qwen3-moe-reap-50"
SECRET = "hf_TopSecretTokenForTests0123456789"
runner = CliRunner()


@pytest.fixture(scope="module")
def t(tmp_path_factory):
    return tiny(tmp_path_factory)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    set_token(monkeypatch, SECRET, tmp_path)
    api = FakeHubApi()
    monkeypatch.setattr(hub, "hub_api", lambda: api)
    return api


def expected_files(t) -> set[str]:
    """OUT's files (its README, the source's card, replaced) plus what push adds."""
    own = {p.relative_to(t.pruned).as_posix() for p in t.pruned.rglob("*") if p.is_file()}
    return own | {"README.md", "calibration/plan.json", "calibration/scores.safetensors", PROVENANCE_NAME}


def test_parameter_counts_follow_from_the_pruned_checkpoint(t):
    """Counts for the original expert count derived from the pruned checkpoint alone equal the
    counts of the source itself, and the other way round."""
    src, out = open_checkpoint(t.source), open_checkpoint(t.pruned)
    c_src, c_out = count_parameters(src, describe(src)), count_parameters(out, describe(out))
    E, kept = describe(src).num_experts, describe(out).num_experts
    assert c_out.at(E) == c_src.at(E) and c_src.at(kept) == c_out.at(kept)
    assert c_src.at(E)["total"] == sum(a.size for a in _all_tensors(t.source))
    assert c_src.at(E)["bytes"] == src.total_bytes and c_out.at(kept)["bytes"] == out.total_bytes
    assert c_out.at(kept)["total"] < c_src.at(E)["total"]
    # top-k experts per token either way; only the router rows of the pruned experts go
    H = src.config["hidden_size"]
    assert c_src.at(E)["active"] - c_out.at(kept)["active"] == len(describe(src).layers) * (E - kept) * H


def _all_tensors(path):
    from safetensors import safe_open

    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            for name in st.keys():
                yield st.get_tensor(name)


def test_card_parses_back_field_by_field(t, tmp_path, fake):
    report = push(t.pruned, TARGET, scores=t.scores, dry_run=True)
    path = tmp_path / "README.md"
    path.write_text(report.card)
    card = ModelCard.load(path)
    data = card.data
    assert data.base_model == REPO
    assert data.library_name == "transformers"
    assert data.license == "apache-2.0" and data.pipeline_tag == "text-generation"  # from the source's card
    assert data.language == ["en"]
    assert data.tags == TAGS
    text = card.text
    assert "SOURCE-CARD-BODY" not in text and f"https://huggingface.co/{REPO}" in text  # credited, not copied
    src, out = open_checkpoint(t.source), open_checkpoint(t.pruned)
    before, after = count_parameters(src, describe(src)).at(16), count_parameters(out, describe(out)).at(8)
    assert "| routed experts per MoE layer | 16 | 8 |" in text
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in text.splitlines() if line.startswith("| ")}
    assert f"({before['total']:,})" in rows["total parameters"][0]
    assert f"({after['total']:,})" in rows["total parameters"][1]
    assert f"({before['active']:,})" in rows["active parameters per token"][0]
    assert f"({after['active']:,})" in rows["active parameters per token"][1]
    assert "Criterion: `reap`" in text
    for key, value in SCORE_META.items():
        assert f"- {key}: {value}" in text
    assert f"shardcut calibrate {REPO} --data notes.txt:32 --samples 32 --max-length 64" in text
    assert f"hf download {TARGET} calibration/scores.safetensors" in text
    assert f"shardcut prune {REPO} -o pruned --scores calibration/scores.safetensors --ratio" in text
    plan_sha = json.loads((t.pruned / "model.safetensors.index.json").read_text())["metadata"]["plan_sha256"]
    assert plan_sha in text


def test_dry_run_lists_exactly_the_files_and_uploads_nothing(t, fake):
    result = runner.invoke(app, ["push", str(t.pruned), TARGET, "--scores", str(t.scores), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert {f["path"] for f in listed["files"]} == expected_files(t)
    assert len(listed["files"]) == len(expected_files(t))
    assert listed["card"].startswith("---\nbase_model: " + REPO)
    assert fake.calls == []  # a dry run talks to nobody

    human = runner.invoke(app, ["push", str(t.pruned), TARGET, "--scores", str(t.scores), "--dry-run"])
    assert human.exit_code == 0 and "calibration/scores.safetensors" in human.output
    assert "Re-prune at another ratio" in human.output


def test_upload_through_recording_api(t, fake, caplog):
    caplog.set_level(logging.DEBUG)
    dry = push(t.pruned, TARGET, scores=t.scores, dry_run=True)
    result = runner.invoke(app, ["push", str(t.pruned), TARGET, "--scores", str(t.scores), "--private"])
    assert result.exit_code == 0, result.output
    assert [c[0] for c in fake.calls] == ["create_repo", "upload_folder"]
    assert fake.calls[0][1] == (TARGET,) and fake.calls[0][2]["private"] is True and fake.calls[0][2]["exist_ok"]
    assert fake.calls[1][2]["revision"] is None and not fake.calls[1][2]["create_pr"]
    (uploaded,) = fake.uploaded
    assert set(uploaded) == {f.path_in_repo for f in dry.files} == expected_files(t)
    for rel in expected_files(t) - {
        "README.md",
        PROVENANCE_NAME,
        "calibration/plan.json",
        "calibration/scores.safetensors",
    }:
        assert hashlib.sha256(uploaded[rel]).digest() == hashlib.sha256((t.pruned / rel).read_bytes()).digest()
    assert uploaded["calibration/scores.safetensors"] == t.scores.read_bytes()
    assert uploaded["calibration/plan.json"] == (t.pruned / "shardcut-plan.json").read_bytes()
    provenance = json.loads(uploaded[PROVENANCE_NAME])
    assert provenance["source"]["model"] == REPO and provenance["scores_sha256"] == file_sha256(t.scores)
    assert provenance["experts_per_layer"] == {"before": 16, "after": 8}
    assert ModelCard(uploaded["README.md"].decode()).data.base_model == REPO
    assert "https://huggingface.co/" + TARGET in result.output
    assert SECRET not in result.output and SECRET not in caplog.text


def test_branch_and_pull_request(t, fake):
    push(t.pruned, TARGET, revision="pruned-50")
    assert [c[0] for c in fake.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert fake.calls[1][2]["branch"] == "pruned-50" and fake.calls[2][2]["revision"] == "pruned-50"
    report = push(t.pruned, TARGET, create_pr=True)
    assert fake.calls[-1][2]["create_pr"] is True and report.url.endswith("/discussions/1")
    line = _error(["push", str(t.pruned), TARGET, "--create-pr", "--revision", "dev"])
    assert "--create-pr" in line and "'dev'" in line


def _error(args) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_refuses_an_out_that_verify_rejects(t, tmp_path, fake):
    broken = tmp_path / "broken"
    shutil.copytree(t.pruned, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] += 1
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    line = _error(["push", str(broken), TARGET])
    assert "verify rejects it" in line and "total_size" in line
    victim = sorted(broken.glob("model-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-8])
    assert victim.name in _error(["push", str(broken), TARGET])
    assert fake.calls == []


def test_bad_push_inputs(t, tmp_path, fake, monkeypatch):
    assert "malformed Hub repo id" in _error(["push", str(t.pruned), "me/bad--name"])
    other = tmp_path / "other.safetensors"
    shutil.copyfile(t.scores, other)
    with other.open("ab") as f:
        f.write(b" ")
    with pytest.raises(ShardcutError):
        push(t.pruned, TARGET, scores=other, dry_run=True)
    no_plan = tmp_path / "no-plan"
    shutil.copytree(t.pruned, no_plan)
    (no_plan / "shardcut-plan.json").unlink()
    assert "not an output of shardcut prune" in _error(["push", str(no_plan), TARGET, "--dry-run"])
    set_token(monkeypatch, None, tmp_path)
    line = _error(["push", str(t.pruned), TARGET])
    assert "no Hugging Face token" in line and "HF_TOKEN" in line
    assert fake.calls == []


def test_hub_failure_during_upload_is_one_line_without_the_token(t, tmp_path, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    set_token(monkeypatch, SECRET, tmp_path)
    leaky = FakeHubApi(fail={"upload_folder": http_error(HfHubHTTPError, 500, f"500 upstream said token={SECRET}")})
    monkeypatch.setattr(hub, "hub_api", lambda: leaky)
    result = runner.invoke(app, ["push", str(t.pruned), TARGET])
    assert result.exit_code == 2 and "***" in result.output and SECRET not in result.output
    denied = FakeHubApi(fail={"create_repo": http_error(HfHubHTTPError, 403, "403 Forbidden: no rights to create")})
    monkeypatch.setattr(hub, "hub_api", lambda: denied)
    line = _error(["push", str(t.pruned), "someone-else/model"])
    assert "someone-else/model" in line and "403 Forbidden" in line
    assert Plan.load(t.pruned / "shardcut-plan.json").keep  # OUT untouched


# ---------------------------------------------------------------------------------------------
# Real parameters: quantized weights unpacked, fused experts as experts


def _shares(path):
    ckpt = open_checkpoint(path)
    c = count_parameters(ckpt, describe(ckpt))
    return c, {
        "base": c.base[0],
        "active": c.base_active,
        "expert": {k: v[0] for k, v in c.expert.items()},
        "router": {k: v[0] for k, v in c.router.items()},
    }


@pytest.mark.parametrize("name", ["ct_int4", "ct_int4_asym", "mxfp4", "gptq", "bnb_nf4", "modelopt_nvfp4", "fp8_block"])
def test_quantized_checkpoints_count_the_parameters_of_the_float_model(quantized, name):
    """A quantized checkpoint holds as many parameters as the float model it was quantized from,
    share by share: packed INT4 words hold 8 (by `weight_shape`), MXFP4 / NVFP4 / NF4 bytes 2,
    scales and zero points none; bytes stay as stored."""
    if name.startswith("ct_"):
        pytest.importorskip("compressed_tensors")
    q = quantized(name)
    c_q, quant = _shares(q.source)
    c_f, flt = _shares(q.float_dir)
    assert quant == flt
    E = describe(open_checkpoint(q.source)).num_experts
    assert c_q.at(E)["total"] == c_f.at(E)["total"] == sum(a.size for a in _all_tensors(q.float_dir))
    assert c_q.at(E)["bytes"] == open_checkpoint(q.source).total_bytes < c_f.at(E)["bytes"]
    c_p, pruned = _shares(q.pruned)  # the pruned copy: the same shares, so the same counts at E
    assert pruned == quant and c_p.at(E) == c_q.at(E)


def test_int4_weight_shape_decides_where_packing_pads(tmp_path):
    """A packed row of 40 INT4 values takes 5 words: the `weight_shape` companion says 40 (the
    packed shape alone would say 40 only by luck); a companion that contradicts the packed shape
    is not trusted."""
    from safetensors.numpy import save_file

    from shardcut.moe.parameters import tensor_parameters

    info = describe(open_checkpoint(tmp_path / _int4_model(tmp_path, 36)))
    ckpt = open_checkpoint(tmp_path / "m")
    params = tensor_parameters(ckpt, info)
    name = "model.layers.1.mlp.experts.0.gate_proj"
    assert params[f"{name}.weight_packed"] == 8 * 36  # [8, 5] words -> [8, 36] by weight_shape
    assert params[f"{name}.weight_scale"] == params[f"{name}.weight_shape"] == 0
    assert params["model.layers.1.mlp.gate.weight"] == 4 * 36
    shard = ckpt.tensors[f"{name}.weight_shape"][0].path
    from safetensors.numpy import load_file

    tensors = load_file(shard)
    tensors[f"{name}.weight_shape"] = np.array([8, 99], dtype=np.int64)  # 99 does not fit 5 words
    save_file(tensors, shard)
    assert tensor_parameters(open_checkpoint(tmp_path / "m"), info)[f"{name}.weight_packed"] == 8 * 5 * 8


def _int4_model(tmp_path, width: int) -> str:
    """A 2-layer DeepSeek-V3-shaped checkpoint (layer 1 MoE, 4 experts) whose experts are
    compressed-tensors INT4 with input width `width`, its `weight_shape` companions real."""
    from safetensors.numpy import save_file

    from shardcut.ops.synthetic import SyntheticSpec, synthetic_config

    spec = SyntheticSpec(
        layers=2,
        first_dense=1,
        experts=4,
        top_k=2,
        hidden=width,
        moe_inter=8,
        dense_inter=8,
        vocab=16,
        int4=True,
        group_size=4,
        shards=1,
    )
    rng = np.random.default_rng(0)
    H, I = width, 8
    t = {
        "model.embed_tokens.weight": rng.random((16, H), dtype=np.float32),
        "model.norm.weight": np.ones(H, np.float32),
        "lm_head.weight": rng.random((16, H), dtype=np.float32),
    }
    for L in (0, 1):
        p = f"model.layers.{L}"
        t[f"{p}.input_layernorm.weight"] = t[f"{p}.post_attention_layernorm.weight"] = np.ones(H, np.float32)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[f"{p}.self_attn.{proj}.weight"] = rng.random((H, H), dtype=np.float32)
        shapes = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
        if L == 0:
            t.update({f"{p}.mlp.{k}.weight": rng.random(v, dtype=np.float32) for k, v in shapes.items()})
            continue
        t[f"{p}.mlp.gate.weight"] = rng.random((4, H), dtype=np.float32)
        t[f"{p}.mlp.gate.e_score_correction_bias"] = np.zeros(4, np.float32)
        for e in range(4):
            for proj, (o, i) in shapes.items():
                q = f"{p}.mlp.experts.{e}.{proj}"
                t[f"{q}.weight_packed"] = rng.integers(0, 2**31, (o, -(-i // 8)), dtype=np.int32)
                t[f"{q}.weight_scale"] = rng.random((o, -(-i // 4)), dtype=np.float32)
                t[f"{q}.weight_shape"] = np.array([o, i], dtype=np.int64)
        for proj, shape in shapes.items():
            t[f"{p}.mlp.shared_experts.{proj}.weight"] = rng.random(shape, dtype=np.float32)
    root = tmp_path / "m"
    root.mkdir()
    save_file(t, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps(synthetic_config(spec)))
    return "m"


@pytest.mark.parametrize(
    "name, fused",
    [
        ("step3", ("moe.gate_proj.weight", "moe.up_proj.weight", "moe.down_proj.weight")),  # fused outside `experts`
        (
            "gpt_oss",
            (
                "mlp.experts.gate_up_proj",
                "mlp.experts.gate_up_proj_bias",
                "mlp.experts.down_proj",
                "mlp.experts.down_proj_bias",
            ),
        ),
    ],
)
def test_fused_expert_tensors_are_expert_parameters(families, name, fused):
    """Step3's fused `moe.*_proj` tensors (and gpt-oss's under `experts`) are expert parameters:
    one expert's share is 1/E of them, and a token runs through top_k of them, not all E."""
    b = families(name)
    src = open_checkpoint(b.source)
    info = describe(src)
    c = count_parameters(src, info)
    E, k = info.num_experts, info.top_k
    for layer in info.layers:
        expected = sum(math.prod(src.tensors[layer.prefix + rel][1].shape) for rel in fused)
        assert c.expert[layer.key][0] * E == expected
    model_params = sum(p.numel() for p in b.model.state_dict().values())
    assert c.at(E)["total"] == sum(math.prod(t.shape) for _, t in src.tensors.values()) == model_params
    routed = sum(c.expert[layer.key][0] for layer in info.layers)
    assert c.at(E)["active"] == c.base_active + k * routed + E * sum(v[0] for v in c.router.values())
    assert c.at(E)["total"] - c.at(E)["active"] == (E - k) * routed


# ---------------------------------------------------------------------------------------------
# The card's commands reproduce the plan


def _card_commands(card: str) -> list[list[str]]:
    import shlex

    return [shlex.split(line) for line in card.splitlines() if line.startswith("shardcut ")]


def _run_cli(argv: list[str], cwd, **env_extra: str) -> subprocess.CompletedProcess:
    assert argv[0] == "shardcut"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "shardcut_cli.main", *argv[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_card_commands_reproduce_the_plan(tmp_path, fake):
    """A plan made with every option that decides it (MTP policy, super-expert and explicit
    protection, the random criterion's seed, multiple_of, grouped routing): the card's
    `shardcut plan` command, run as a user would (a real process, in a folder holding the
    downloaded score file), writes the same plan; its re-prune command runs, and at the plan's
    own ratio prunes to the same kept experts."""
    from fixtures.scores_fixtures import random_scores

    from shardcut.ops.planning import make_plan
    from shardcut.ops.synthetic import SyntheticSpec, write_synthetic_checkpoint
    from shardcut.rewrite.writer import prune

    src = write_synthetic_checkpoint(
        tmp_path / "model",
        SyntheticSpec(
            layers=4,
            first_dense=1,
            experts=16,
            top_k=2,
            n_group=2,
            topk_group=2,
            mtp_layers=1,
            shards=2,
            hidden=16,
            moe_inter=8,
            dense_inter=16,
            vocab=32,
        ),
    )
    info = describe(open_checkpoint(src))
    assert info.grouped and [layer.key for layer in info.layers if layer.mtp] == ["4"]
    scores = random_scores(info, seed=2)
    scores.act_max[:] = 1.0
    scores.act_max[0, 9] = 100.0  # a super expert of layer 1
    scores_path = tmp_path / "made.safetensors"
    scores.save(scores_path)
    plan, report = make_plan(
        src,
        scores_path,
        ratio=0.4,
        criterion="random",
        seed=7,
        protect={"2": [3]},
        protect_super_experts=True,
        mtp_policy="reuse-last",
        multiple_of=4,
    )
    assert plan.num_experts == 12 and 9 in plan.keep["1"] and 3 in plan.keep["2"]  # 10 kept -> 12
    prune(src, tmp_path / "out", plan)
    card = push(tmp_path / "out", TARGET, scores=scores_path, dry_run=True).card
    assert (
        "- Experts kept per layer: pruned per layer = floor(16 x 0.4) = 6 -> 10 kept, kept rounded up from 10 to 12"
        in card
    )
    commands = _card_commands(card)
    (plan_cmd,) = [c for c in commands if c[1] == "plan"]
    (reprune,) = [c for c in commands if c[1] == "prune" and "--scores" in c]
    for flag in ("--mtp-policy", "--protect-super-experts", "--protect", "--seed", "--multiple-of", "--criterion"):
        assert flag in plan_cmd and flag in reprune, (flag, plan_cmd, reprune)

    work = tmp_path / "user"
    (work / "calibration").mkdir(parents=True)
    shutil.copyfile(scores_path, work / "scores.safetensors")
    shutil.copyfile(scores_path, work / "calibration" / "scores.safetensors")
    done = _run_cli(plan_cmd, work)
    assert done.returncode == 0, done.stderr + done.stdout
    again = Plan.load(work / "plan.json")
    assert again.to_json() == plan.to_json()  # keep, counts, rounding, options, scores sha256: all of it
    assert again.keep == Plan.load(tmp_path / "out" / "shardcut-plan.json").keep

    done = _run_cli([*reprune, "--dry-run"], work)  # verbatim, at the card's other ratio
    assert done.returncode == 0, done.stderr + done.stdout
    at_plan_ratio = [*reprune[: reprune.index("--ratio") + 1], "0.4", *reprune[reprune.index("--ratio") + 2 :]]
    done = _run_cli(at_plan_ratio, work)
    assert done.returncode == 0, done.stderr + done.stdout
    assert Plan.load(work / "pruned" / "shardcut-plan.json").keep == plan.keep


def test_card_plan_command_for_a_hub_source(t, tmp_path, fake):
    """The card of a model planned from a Hub repo id: its plan command, run against the Hub
    cache (offline), writes the plan that was pushed."""
    cache = tmp_path / "cache"
    shutil.copytree(t.reference_cache, cache, symlinks=True)
    card = push(t.pruned, TARGET, scores=t.scores, dry_run=True).card
    (plan_cmd,) = [c for c in _card_commands(card) if c[1] == "plan"]
    assert plan_cmd[2] == REPO
    shutil.copyfile(t.scores, tmp_path / "scores.safetensors")
    done = _run_cli(plan_cmd, tmp_path, HF_HUB_CACHE=str(cache))
    assert done.returncode == 0, done.stderr + done.stdout
    assert Plan.load(tmp_path / "plan.json").to_json() == Plan.load(t.plan_path).to_json()


def test_card_of_a_plan_without_recorded_options(t, tmp_path, fake):
    """A plan written before options were recorded: the card derives the command from its
    provenance (ratio, criterion, protected ids) instead of leaving them out."""
    out = tmp_path / "old"
    shutil.copytree(t.pruned, out)
    body = json.loads((out / "shardcut-plan.json").read_text())
    body.pop("options")
    body["protected"] = {"0": [1]}
    (out / "shardcut-plan.json").write_text(json.dumps(body))
    card = push(out, TARGET, scores=t.scores, dry_run=True).card
    (plan_cmd,) = [c for c in _card_commands(card) if c[1] == "plan"]
    assert plan_cmd[plan_cmd.index("--ratio") + 1] == "0.5" and plan_cmd[plan_cmd.index("--criterion") + 1] == "reap"
    assert plan_cmd[plan_cmd.index("--protect") + 1] == "0:1"


# ---------------------------------------------------------------------------------------------
# push reads nothing outside OUT


@pytest.mark.parametrize("planted", ["file", "folder", "broken", "nested"])
def test_symlinks_leading_out_of_out_are_refused(t, tmp_path, fake, planted):
    """A symlink in OUT pointing elsewhere (a token file, a folder, nowhere) is refused with one
    line before anything is read or uploaded; the secret it points to reaches no upload."""
    out = tmp_path / "out"
    shutil.copytree(t.pruned, out)
    secret_dir = tmp_path / "elsewhere"
    secret_dir.mkdir()
    (secret_dir / "token").write_text(SECRET)
    link = {
        "file": out / "notes.txt",
        "folder": out / "extra",
        "broken": out / "gone.txt",
        "nested": out / "assets" / "deep" / "token.txt",
    }[planted]
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(
        {
            "file": secret_dir / "token",
            "folder": secret_dir,
            "broken": tmp_path / "nothing",
            "nested": secret_dir / "token",
        }[planted]
    )
    for args in (["--dry-run"], []):
        line = _error(["push", str(out), TARGET, *args])
        assert str(link.relative_to(out)) in line and "nothing uploaded" in line
        assert SECRET not in line
    assert fake.calls == [] and fake.uploaded == []
    with pytest.raises(CheckpointError, match="symlink"):
        push(out, TARGET, dry_run=True)


def test_symlinks_inside_out_upload_their_content(t, tmp_path, fake):
    out = tmp_path / "out"
    shutil.copytree(t.pruned, out)
    (out / "docs").mkdir()
    (out / "docs" / "tokenizer_config.json").symlink_to(out / "tokenizer_config.json")
    push(out, TARGET)
    (uploaded,) = fake.uploaded
    assert uploaded["docs/tokenizer_config.json"] == (out / "tokenizer_config.json").read_bytes()
