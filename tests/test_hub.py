"""MODEL as a Hub repo id: offline resolution from a Hugging Face cache laid out as huggingface_hub
does, header-only opening (no shard data), and one-line errors for every way it can go wrong."""

from __future__ import annotations

import json
import shutil

import pytest
from fixtures.hub_fixtures import (
    REPO,
    SHA,
    FakeHubApi,
    http_error,
    lay_out_cache,
    pruned_digest,
    set_token,
    tiny,
    tree_digest,
    use_cache,
)
from typer.testing import CliRunner

from shardcut.format import hub
from shardcut.format.checkpoint import open_checkpoint
from shardcut.format.errors import ShardcutError
from shardcut.plans.plan import Plan
from shardcut_cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def t(tmp_path_factory):
    return tiny(tmp_path_factory)


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def signature(ckpt) -> dict:
    return {n: (t.dtype, t.shape, t.nbytes) for n, (_, t) in ckpt.tensors.items()}


# -- parsing ---------------------------------------------------------------------------------


def test_parse_repo_id_forms():
    assert hub.parse_repo_id("org/name") == hub.RepoRef("org/name", None)
    assert hub.parse_repo_id("org/name@v1.0") == hub.RepoRef("org/name", "v1.0")
    assert hub.parse_repo_id(f"org/name@{SHA}") == hub.RepoRef("org/name", SHA)
    assert hub.parse_repo_id("org/name@refs/pr/3").revision == "refs/pr/3"


@pytest.mark.parametrize(
    "bad, why",
    [
        ("no-such-folder", "not a Hub repo id"),
        ("a/b/c", "not a Hub repo id"),
        ("org/na me", "malformed Hub repo id"),
        ("org/x--y", "malformed Hub repo id"),
        ("org/name@", "malformed revision"),
        ("org/name@bad..rev", "malformed revision"),
    ],
)
def test_malformed_repo_id_is_one_line_exit_2(bad, why):
    line = one_line_error(run("inspect", bad))
    assert why in line and bad in line


# -- offline, from the cache -----------------------------------------------------------------


def test_offline_inspect_plan_prune_on_repo_id(t, tmp_path, monkeypatch):
    """The issue's proof: with HF_HUB_OFFLINE=1 and HF_HUB_CACHE laid out as huggingface_hub
    does, inspect, plan and prune take the repo id and give what they give on the folder."""
    before = tree_digest(t.reference_cache)
    use_cache(monkeypatch, t.reference_cache, offline=True)

    local = json.loads(run("inspect", t.source, "--json").output)
    for model in (REPO, f"{REPO}@main", f"{REPO}@{SHA}"):
        got = run("inspect", model, "--json")
        assert got.exit_code == 0, got.output
        got = json.loads(got.output)
        assert got.pop("path").endswith(f"snapshots/{SHA}")
        assert got == {k: v for k, v in local.items() if k != "path"}

    plan_file = tmp_path / "plan.json"
    result = run("plan", REPO, "--scores", t.scores, "--ratio", "0.5", "-o", plan_file)
    assert result.exit_code == 0, result.output
    assert Plan.load(plan_file).keep == Plan.load(t.plan_path).keep

    out = tmp_path / "out"
    result = run("prune", REPO, "-o", out, "--plan", t.plan_path)
    assert result.exit_code == 0, result.output
    provenance = Plan.load(out / "shardcut-plan.json").extra["source"]
    assert provenance["model"] == REPO and provenance["revision"] == SHA  # the exact commit pruned
    assert pruned_digest(out) == pruned_digest(t.pruned)  # byte for byte the prune of the local folder
    assert tree_digest(t.reference_cache) == before  # the cache is read, never written


def test_offline_repo_not_in_cache(t, tmp_path, monkeypatch):
    use_cache(monkeypatch, t.reference_cache, offline=True)
    line = one_line_error(run("inspect", "tiny-org/absent"))
    assert "tiny-org/absent" in line and "not in the local Hugging Face cache" in line and "HF_HUB_OFFLINE=1" in line


def test_offline_revision_not_in_cache(t, monkeypatch):
    use_cache(monkeypatch, t.reference_cache, offline=True)
    line = one_line_error(run("prune", f"{REPO}@v9", "-o", "never", "--plan", t.plan_path))
    assert "revision 'v9' is not in the local Hugging Face cache (cached: main)" in line
    line = one_line_error(run("inspect", f"{REPO}@{'0' * 40}"))
    assert "is not in the local Hugging Face cache" in line


def test_offline_shards_not_in_cache(t, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    lay_out_cache(cache, t.source, only=lambda rel: not rel.endswith(".safetensors"))
    use_cache(monkeypatch, cache, offline=True)
    line = one_line_error(run("inspect", REPO))
    assert "shards" in line and "not in the local Hugging Face cache" in line and REPO in line
    with pytest.raises(ShardcutError, match="not in the local Hugging Face cache"):
        hub.resolve_model(REPO)


# -- online, through an HfApi-compatible fake --------------------------------------------------


def test_open_model_reads_headers_only(t, tmp_path, monkeypatch):
    """Shards not in the cache: config and index are downloaded, headers come from
    get_safetensors_metadata (range reads), no shard is ever downloaded."""
    use_cache(monkeypatch, tmp_path / "cache", offline=False)
    fake = FakeHubApi({REPO: (t.source, SHA)})
    monkeypatch.setattr(hub, "hub_api", lambda: fake)

    ckpt = hub.open_model(REPO)
    assert hub.is_remote(ckpt)
    assert signature(ckpt) == signature(open_checkpoint(t.source))
    assert ckpt.config == open_checkpoint(t.source).config
    downloaded = [c[1][1] for c in fake.called("hf_hub_download")]
    assert downloaded == ["config.json", "model.safetensors.index.json"]
    assert len(fake.called("get_safetensors_metadata")) == 1
    assert not list((tmp_path / "cache").rglob("*.safetensors"))

    got = json.loads(run("inspect", REPO, "--json").output)
    local = json.loads(run("inspect", t.source, "--json").output)
    got.pop("path"), local.pop("path")
    assert got == local
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_open_model_uses_cached_shards(t, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(t.reference_cache, cache, symlinks=True)
    use_cache(monkeypatch, cache, offline=False)
    fake = FakeHubApi({REPO: (t.source, SHA)})
    ckpt = hub.open_model(REPO, api=fake)
    assert not hub.is_remote(ckpt) and not fake.called("get_safetensors_metadata")
    assert signature(ckpt) == signature(open_checkpoint(t.source))


def test_private_repo_without_token(t, tmp_path, monkeypatch):
    use_cache(monkeypatch, tmp_path / "cache", offline=False)
    set_token(monkeypatch, None, tmp_path)
    monkeypatch.setattr(hub, "hub_api", lambda: FakeHubApi({}))
    line = one_line_error(run("inspect", "tiny-org/private-model"))
    assert "tiny-org/private-model" in line and "no token is set" in line and "HF_TOKEN" in line


def test_private_repo_with_token_never_prints_it(t, tmp_path, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    secret = "hf_SeCrEtTokenValue1234567890"
    use_cache(monkeypatch, tmp_path / "cache", offline=False)
    set_token(monkeypatch, secret, tmp_path)
    monkeypatch.setattr(hub, "hub_api", lambda: FakeHubApi({}))
    line = one_line_error(run("inspect", "tiny-org/private-model"))
    assert "your token cannot read it" in line and secret not in line
    # a library message that carried the token would still not show it
    leaky = FakeHubApi(
        {REPO: (t.source, SHA)},
        fail={"repo_info": http_error(HfHubHTTPError, 500, f"500 Server Error for Authorization: Bearer {secret}")},
    )
    monkeypatch.setattr(hub, "hub_api", lambda: leaky)
    result = run("inspect", REPO)
    line = one_line_error(result)
    assert "***" in line and secret not in result.output


def test_revision_that_does_not_exist(t, tmp_path, monkeypatch):
    use_cache(monkeypatch, tmp_path / "cache", offline=False)
    monkeypatch.setattr(hub, "hub_api", lambda: FakeHubApi({REPO: (t.source, SHA)}))
    line = one_line_error(run("inspect", f"{REPO}@nope"))
    assert "revision 'nope' does not exist" in line and REPO in line


def test_online_prune_downloads_into_the_cache(t, tmp_path, monkeypatch):
    """Without --stream a repo id is pruned from its snapshot, fetched into the HF cache
    (weights in other formats skipped) and kept there."""
    cache = tmp_path / "cache"
    use_cache(monkeypatch, cache, offline=False)
    fake = FakeHubApi({REPO: (t.source, SHA)})
    monkeypatch.setattr(hub, "hub_api", lambda: fake)
    out = tmp_path / "out"
    result = run("prune", REPO, "-o", out, "--plan", t.plan_path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["disk"]["plain"] == report["disk"]["output"] + report["disk"]["input"]
    assert pruned_digest(out) == pruned_digest(t.pruned)
    (snap,) = fake.called("snapshot_download")
    assert "*.bin" in snap[2]["ignore_patterns"] and snap[2]["revision"] == SHA
    assert len(list((cache / "models--tiny-org--tiny-qwen3-moe" / "blobs").iterdir())) == len(tree_digest(t.source))
