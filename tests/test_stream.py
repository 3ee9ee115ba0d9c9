"""`prune --stream`: one shard at a time from the Hub, disk = output + one shard, and a rerun
after a failure mid-way completes. The download step is injected (it copies a fixture shard
into place, as hf_hub_download would); the rest goes through an HfApi-compatible fake."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from fixtures.hub_fixtures import REPO, SHA, FakeHubApi, pruned_digest, tiny, tree_digest, use_cache
from typer.testing import CliRunner

from shardcut.format import hub
from shardcut.format.errors import ShardcutError
from shardcut.ops.verification import verify
from shardcut.plans.plan import Plan
from shardcut.rewrite.from_hub import STAGING, prune_model
from shardcut_cli.main import app


@pytest.fixture(scope="module")
def t(tmp_path_factory):
    return tiny(tmp_path_factory)


@pytest.fixture
def online(t, tmp_path, monkeypatch):
    """An empty HF cache, online, the Hub played by a fake serving the tiny repo."""
    use_cache(monkeypatch, tmp_path / "cache", offline=False)
    fake = FakeHubApi({REPO: (t.source, SHA)})
    monkeypatch.setattr(hub, "hub_api", lambda: fake)
    return fake


def disk_usage(root: Path, skip: Path | None = None) -> int:
    return sum(
        p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and (skip is None or skip not in p.parents)
    )


class Downloader:
    """The injected download: copies the fixture shard into place, measuring the disk used under
    `work` each time; `fail_at` makes the n-th call raise as a dropped connection would."""

    def __init__(self, source: Path, work: Path, fail_at: int | None = None) -> None:
        self.source, self.work, self.fail_at = source, work, fail_at
        self.fetched: list[str] = []
        self.peak = 0
        self.staged_counts: list[int] = []

    def measure(self, *_) -> None:
        self.peak = max(self.peak, disk_usage(self.work))

    def __call__(self, filename: str, dest: Path) -> Path:
        if self.fail_at is not None and len(self.fetched) + 1 == self.fail_at:
            raise ConnectionError("connection reset by peer")
        target = dest / filename
        shutil.copyfile(self.source / filename, target)
        self.fetched.append(filename)
        self.staged_counts.append(len([p for p in dest.rglob("*.safetensors")]))
        self.measure()
        return target


def test_stream_output_is_the_plain_prune_and_disk_is_output_plus_one_shard(t, tmp_path, online):
    plan = Plan.load(t.plan_path)
    work = tmp_path / "work"
    work.mkdir()
    fetch = Downloader(t.source, work)
    report = prune_model(REPO, work / "out", plan, stream=True, download=fetch, progress=fetch.measure)

    out = work / "out"
    assert pruned_digest(out) == pruned_digest(t.pruned)  # byte for byte what the local prune writes
    assert verify(out, source=t.source).ok
    shards = sorted(t.source.glob("*.safetensors"))
    assert fetch.fetched == [p.name for p in shards] == report.downloaded
    assert set(fetch.staged_counts) == {1}  # each shard is deleted before the next arrives
    output = disk_usage(out)
    largest = max(p.stat().st_size for p in shards)
    source_total = sum(p.stat().st_size for p in shards)
    assert fetch.peak <= output + largest
    assert fetch.peak < source_total + output - largest  # far from input + output
    assert report.disk["stream"] == report.output_bytes + report.disk["largest_missing_shard"]
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # shards never went to the cache
    assert not online.called("snapshot_download") or all(
        "*.safetensors" in c[2]["ignore_patterns"] for c in online.called("snapshot_download")
    )
    print(
        f"stream peak disk {fetch.peak} B = output {output} B + {fetch.peak - output} B "
        f"(largest shard {largest} B); input {source_total} B"
    )


def test_failure_mid_way_then_rerun_completes(t, tmp_path, online):
    plan = Plan.load(t.plan_path)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    failing = Downloader(t.source, work, fail_at=4)
    with pytest.raises(ShardcutError, match="run the same command again") as err:
        prune_model(REPO, out, plan, stream=True, download=failing)
    assert "ConnectionError" in str(err.value) and "3 of 9 output shards are kept" in str(err.value)
    assert not out.exists()  # nothing that looks finished
    partial = work / ".out.shardcut-partial"
    assert len(list(partial.glob("model-*.safetensors"))) == 3
    assert not (partial / STAGING).exists() or not any((partial / STAGING).rglob("*.safetensors"))
    cache_before = tree_digest(tmp_path / "cache")

    rerun = Downloader(t.source, work)
    report = prune_model(REPO, out, plan, stream=True, download=rerun)
    assert rerun.fetched == sorted(p.name for p in t.source.glob("*.safetensors"))[3:]
    assert len(report.resumed) == 3
    assert pruned_digest(out) == pruned_digest(t.pruned)
    assert not partial.exists()
    after = tree_digest(tmp_path / "cache")
    assert {k: v for k, v in after.items() if k in cache_before} == cache_before  # the cache only grows


def test_cached_shards_are_read_in_place_and_kept(t, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(t.reference_cache, cache, symlinks=True)
    use_cache(monkeypatch, cache, offline=False)
    fake = FakeHubApi({REPO: (t.source, SHA)})
    before = tree_digest(cache)
    never = Downloader(t.source, tmp_path, fail_at=1)
    report = prune_model(REPO, tmp_path / "out", Plan.load(t.plan_path), stream=True, api=fake, download=never)
    assert report.downloaded == [] and report.disk["stream"] == report.output_bytes
    assert pruned_digest(tmp_path / "out") == pruned_digest(t.pruned)
    assert tree_digest(cache) == before


def test_dry_run_states_disk_per_mode(t, tmp_path, online):
    plan = Plan.load(t.plan_path)
    report = prune_model(REPO, None, plan, dry_run=True, stream=True)
    shards = [p.stat().st_size for p in t.source.glob("*.safetensors")]
    disk = report.disk
    assert disk["output"] == report.output_bytes == sum(p.stat().st_size for p in t.pruned.glob("*.safetensors"))
    # remote headers are re-encoded, so a shard's size may differ from the file by its padding
    assert abs(disk["input"] - sum(shards)) <= 8 * len(shards)
    assert abs(disk["largest_missing_shard"] - max(shards)) <= 8
    assert disk["plain"] == disk["output"] + disk["input"] and disk["stream"] < disk["plain"]
    assert not online.called("hf_hub_download") or all(
        not c[1][1].endswith(".safetensors") for c in online.called("hf_hub_download")
    )

    result = CliRunner().invoke(
        app, ["prune", REPO, "-o", str(tmp_path / "x"), "--plan", str(t.plan_path), "--dry-run", "--stream"]
    )
    assert result.exit_code == 0, result.output
    assert "with --stream (output + one shard not yet on disk)" in result.output and "to download" in result.output
    assert not (tmp_path / "x").exists()


def test_refuses_to_start_when_disk_is_short(t, tmp_path, online, monkeypatch):
    import shutil as sh

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    fetch = Downloader(t.source, tmp_path)
    with pytest.raises(ShardcutError, match="not enough disk space"):
        prune_model(REPO, tmp_path / "out", Plan.load(t.plan_path), stream=True, download=fetch)
    assert fetch.fetched == []
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.shardcut-partial").exists()
    with pytest.raises(ShardcutError, match="not enough disk space"):
        prune_model(REPO, tmp_path / "out", Plan.load(t.plan_path))  # plain: output + the download


def test_stream_rejects_resharding(t, tmp_path, online):
    with pytest.raises(ShardcutError, match="stream keeps the source's shards"):
        prune_model(REPO, tmp_path / "out", Plan.load(t.plan_path), stream=True, max_shard_size="1MB")


def test_transient_download_failures_are_retried_with_backoff():
    from shardcut.rewrite.from_hub import with_retries

    class Flaky(ConnectionError):
        pass

    class NotFound(Exception):
        class response:  # noqa: N801 - mimics an HTTP error's response attribute
            status_code = 404

    calls, slept = [], []

    def fetch(filename, dest):
        calls.append(filename)
        if len(calls) < 3:
            raise Flaky("connection reset")
        return dest / filename

    assert with_retries(fetch, sleep=slept.append)("a.safetensors", Path("/x")) == Path("/x/a.safetensors")
    assert len(calls) == 3 and slept == [2.0, 4.0]

    def missing(filename, dest):
        calls.append(filename)
        raise NotFound("404")

    calls.clear()
    with pytest.raises(NotFound):
        with_retries(missing, sleep=slept.append)("b.safetensors", Path("/x"))
    assert calls == ["b.safetensors"]  # a 404 is final: no retry


def test_stream_goes_through_the_one_write_loop_and_is_read_back(t, tmp_path, online, monkeypatch):
    """Streamed shards are written by writer.write_shards with a readback.Follower each, like a
    plain prune: every source byte is compared, and a byte that reads back different stops it."""
    from shardcut.format import readback

    compared: list[int] = []
    run = readback.Follower.run
    monkeypatch.setattr(readback.Follower, "run", lambda self: compared.append(run(self)) or compared[-1])
    work = tmp_path / "work"
    work.mkdir()
    report = prune_model(REPO, work / "out", Plan.load(t.plan_path), stream=True, download=Downloader(t.source, work))
    assert len(compared) == len(report.shards) and all(n > 0 for n in compared)
    assert sum(compared) == sum(t.nbytes for p in (work / "out").glob("*.safetensors") for t in _tensors(p))

    monkeypatch.setattr(readback, "same_bytes", lambda *a: False)  # the disk "returns" other bytes
    with pytest.raises(ShardcutError, match="differs from its source bytes"):
        prune_model(REPO, tmp_path / "bad", Plan.load(t.plan_path), stream=True, download=Downloader(t.source, work))
    assert not (tmp_path / "bad").exists()


def _tensors(path: Path):
    from shardcut.format.container import read_header

    return read_header(path).tensors.values()


def test_a_downloaded_shard_is_read_through_the_page_cache_a_cached_one_directly(t, tmp_path, online, monkeypatch):
    """A shard just downloaded is in the page cache: the copy and the compare read it from
    there (an O_DIRECT read would first flush it to the disk and then read it back). A shard
    already in the HF cache is read with O_DIRECT, as a local prune reads its input."""
    from shardcut.format import direct_write, readback

    if not direct_write.direct_io_supported(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT: every read goes through the page cache")
    monkeypatch.setattr(readback, "DIRECT_MIN", 1)
    direct: list[Path] = []
    real = readback.read_direct
    monkeypatch.setattr(readback, "read_direct", lambda fd, p, *rest: direct.append(p) or real(fd, p, *rest))
    work = tmp_path / "work"
    work.mkdir()
    report = prune_model(REPO, work / "out", Plan.load(t.plan_path), stream=True, download=Downloader(t.source, work))
    assert report.downloaded and direct == []
    assert pruned_digest(work / "out") == pruned_digest(t.pruned)

    cache = tmp_path / "warm-cache"
    shutil.copytree(t.reference_cache, cache, symlinks=True)
    use_cache(monkeypatch, cache, offline=False)
    never = Downloader(t.source, tmp_path, fail_at=1)
    report = prune_model(REPO, tmp_path / "out2", Plan.load(t.plan_path), stream=True, download=never)
    assert report.downloaded == [] and direct
    assert pruned_digest(tmp_path / "out2") == pruned_digest(t.pruned)
