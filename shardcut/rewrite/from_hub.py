"""Prune straight from a Hub repo with bounded disk, and the disk each way of pruning needs.

`prune_model` is `rewrite.prune` for any MODEL. For a repo id it first reads only the headers
(`hub.open_model`), states the disk each mode needs and refuses to start when it is short:

- plain: the snapshot is downloaded into the Hugging Face cache (what is not there yet), then
  rewritten: disk = output + the missing input.
- `stream=True`: one shard at a time is fetched, rewritten and deleted before the next, so
  disk = output + one input shard. Shards already in the cache are read in place, never
  deleted. Finished output shards survive a failure (a dropped connection, a full disk aside)
  and a rerun of the same command skips them: the partial folder is keyed by the repo
  commit and the plan, so a rerun cannot mix two prunes.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shardcut.format import hub
from shardcut.format.checkpoint import Checkpoint
from shardcut.format.container import (
    OutTensor,
    PinnedSources,
    ShardHeader,
    read_header,
    shard_size,
)
from shardcut.format.errors import ShardcutError
from shardcut.format.hub import OTHER_WEIGHTS, RepoRef, cached_file, hub_errors
from shardcut.moe.model import ModelInfo, describe
from shardcut.plans.plan import Plan, validate_plan
from shardcut.rewrite.side_files import download_ignore_patterns
from shardcut.rewrite.writer import (
    Layout,
    Progress,
    PruneReport,
    ShardJob,
    byte_counter,
    layout,
    output_names,
    parse_size,
    prune,
    write_checkpoint_files,
    write_shards,
)

# download(filename in the repo, folder to put it in) -> path of the downloaded file
Download = Callable[[str, Path], Path]
STAGING = ".download"


@dataclass
class DiskNeeds:
    """Bytes of disk each way of pruning needs (free space is checked against these)."""

    output: int
    input: int
    input_on_disk: int  # source shard bytes already local (the folder itself, or the HF cache)
    largest_missing_shard: int  # the largest source shard that would have to be downloaded

    @property
    def plain(self) -> int:
        return self.output + self.input - self.input_on_disk

    @property
    def stream(self) -> int:
        return self.output + self.largest_missing_shard

    def to_json(self) -> dict:
        return {**vars(self), "plain": self.plain, "stream": self.stream}


@dataclass
class HubPruneReport(PruneReport):
    """A PruneReport plus the disk each mode needs and, for a stream, what was fetched."""

    disk: dict = field(default_factory=dict)
    stream: bool = False
    downloaded: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)


def prune_model(
    model: str | Path,
    out: str | Path | None,
    plan: Plan,
    *,
    stream: bool = False,
    max_shard_size: int | str | None = None,
    dry_run: bool = False,
    verify: bool = True,
    resume: bool = False,
    progress: Progress | None = None,
    api=None,
    download: Download | None = None,
) -> HubPruneReport:
    """Prune a local folder or a Hub repo id; `stream` bounds the disk to output + one shard.

    `api` (an `HfApi`-compatible object) and `download` replace the Hub calls, e.g. in tests.
    A stream keeps the source's shard boundaries (no `max_shard_size`) and always resumes.

    Example:
        >>> report = prune_model("Qwen/Qwen3-30B-A3B", "pruned", Plan.load("plan.json"), stream=True)
        >>> report.disk["stream"] < report.disk["plain"]
        True
    """
    if stream and max_shard_size:
        raise ShardcutError(
            "stream keeps the source's shards (each is rewritten on its own); "
            "drop max_shard_size or prune without stream",
            params=("stream", "max_shard_size"),
        )
    if hub.is_local(model):  # nothing to download: the plain rewrite; a stream needs no different disk
        base = prune(
            model,
            out,
            plan,
            max_shard_size=max_shard_size,
            dry_run=dry_run,
            verify=verify,
            resume=resume,
            progress=progress,
        )
        needs = DiskNeeds(base.output_bytes, base.input_bytes, base.input_bytes, 0)
        return HubPruneReport(**vars(base), disk=needs.to_json())

    ref = hub.parse_repo_id(str(model))
    api = api or hub.hub_api()
    pinned = RepoRef(ref.repo_id, hub.resolve_commit(ref, api))  # every file from one commit
    ckpt = hub.open_model(str(pinned), api=api)
    info = describe(ckpt)
    validate_plan(plan, info, plan.origin)
    lay = layout(ckpt, info, plan, parse_size(max_shard_size))
    sizes = [shard_size(s, m) for s, m in zip(lay.shards, lay.metadata, strict=True)]
    needs = disk_needs(ckpt, pinned, sum(sizes))
    if dry_run or out is None:
        report = _report(ckpt, info, plan, lay, sizes, dry_run=True)
        return HubPruneReport(**vars(report), disk=needs.to_json(), stream=stream)
    out = Path(out)
    if stream:
        return _stream(
            pinned,
            ckpt,
            info,
            plan,
            lay,
            sizes,
            out,
            needs,
            verify=verify,
            progress=progress,
            api=api,
            download=download,
        )
    _check_space({out.parent: needs.output, hub.cache_root(): needs.input - needs.input_on_disk})
    snapshot = hub.resolve_model(str(pinned), api=api)  # downloads what the cache lacks
    base = prune(snapshot, out, plan, max_shard_size=max_shard_size, verify=verify, resume=resume, progress=progress)
    return HubPruneReport(**vars(base), disk=needs.to_json())


def disk_needs(ckpt: Checkpoint, ref: RepoRef, output: int) -> DiskNeeds:
    """What each mode needs for `ckpt` (headers of `ref` at a pinned commit)."""
    missing = [s.file_size for s in ckpt.shards if cached_file(ref, ref.revision, _rel(ckpt, s)) is None]
    total = sum(s.file_size for s in ckpt.shards)
    return DiskNeeds(output, total, total - sum(missing), max(missing, default=0))


def _rel(ckpt: Checkpoint, shard: ShardHeader) -> str:
    return shard.path.relative_to(ckpt.root).as_posix()


def _report(ckpt: Checkpoint, info: ModelInfo, plan: Plan, lay: Layout, sizes: list[int], dry_run: bool) -> PruneReport:
    return PruneReport.planned(ckpt, info, plan, lay, sizes, dry_run)


def _check_space(needs: dict[Path, int]) -> None:
    """Refuse when a filesystem lacks what it must hold (paths on one filesystem add up)."""
    from shardcut.rewrite.outdir import check_free_space

    by_device: dict[int, tuple[Path, int]] = {}
    for where, n in needs.items():
        probe = Path(where).absolute()
        while not probe.exists():
            probe = probe.parent
        dev = os.stat(probe).st_dev
        prev = by_device.get(dev, (probe, 0))
        by_device[dev] = (prev[0], prev[1] + max(0, n))
    for probe, n in by_device.values():
        check_free_space(probe, n)


def _one_shard(ckpt: Checkpoint, header: ShardHeader) -> Checkpoint:
    return Checkpoint(
        ckpt.root, ckpt.config, [header], {n: (header, t) for n, t in header.tensors.items()}, ckpt.index_metadata
    )


def _signature(tensors: list[OutTensor]) -> list[tuple]:
    return [(t.name, t.dtype, tuple(t.shape), t.nbytes) for t in tensors]


def _stream(
    ref: RepoRef,
    ckpt: Checkpoint,
    info: ModelInfo,
    plan: Plan,
    lay: Layout,
    sizes: list[int],
    out: Path,
    needs: DiskNeeds,
    *,
    verify: bool,
    progress: Progress | None,
    api,
    download: Download | None,
) -> HubPruneReport:
    from shardcut.rewrite.outdir import OutputTransaction, check_free_space, check_output_path

    names = output_names(ckpt, lay)
    # Source shard -> its output shard (shards whose every tensor is dropped produce none).
    jobs: list[tuple[ShardHeader, str, list[OutTensor], dict | None, int]] = []
    for header in ckpt.shards:
        part = layout(_one_shard(ckpt, header), info, plan)
        if part.shards:
            i = len(jobs)
            jobs.append((header, names[i], part.shards[0], part.metadata[0], sizes[i]))
    if [_signature(j[2]) for j in jobs] != [_signature(s) for s in lay.shards]:
        raise ShardcutError("internal: per-shard layout differs from the whole-checkpoint layout", ckpt.root)

    check_output_path(out, ckpt.root)
    if not hub.offline():  # tokenizer, templates, remote code: small files, into the cache
        with hub_errors(ref):  # what the side-file rules leave out is not even downloaded
            api.snapshot_download(
                ref.repo_id,
                revision=ref.revision,
                ignore_patterns=sorted({"*.safetensors", *OTHER_WEIGHTS, *download_ignore_patterns()}),
            )
    listing = _repo_files(api, ref)
    fetch = download or _hub_download(api, ref)
    report = HubPruneReport(
        **vars(_report(ckpt, info, plan, lay, sizes, dry_run=False)), disk=needs.to_json(), stream=True
    )
    state = {"mode": "stream", "source": f"hub:{ref}", "plan_sha256": plan.sha256(), "shards": names, "sizes": sizes}
    failure: BaseException | None = None
    current = ""
    with OutputTransaction(out, state, resume=True) as tx:
        staging = tx.dir / STAGING
        try:
            shutil.rmtree(staging, ignore_errors=True)  # a download an earlier run left half done
            todo = []
            for job in jobs:
                if tx.finished(job[1], job[4]) and _signature_of(tx.dir / job[1]) == _signature(job[2]):
                    report.resumed.append(job[1])
                else:
                    todo.append(job)
            missing = [j[0].file_size for j in todo if cached_file(ref, ref.revision, _rel(ckpt, j[0])) is None]
            check_free_space(out.parent, sum(j[4] for j in todo) + max(missing, default=0))
            done = sum(sizes) - sum(j[4] for j in todo)

            def shard_jobs() -> Iterator[ShardJob]:
                nonlocal current
                for header, name, expect, meta, size in todo:
                    current = _rel(ckpt, header)
                    local = cached_file(ref, ref.revision, current)
                    if local is None:
                        staging.mkdir(exist_ok=True)
                        with hub_errors(ref):
                            src = Path(fetch(current, staging))
                        report.downloaded.append(current)
                    else:
                        src = local
                    on_disk = read_header(src)
                    part = layout(_one_shard(ckpt, on_disk), info, plan)
                    tensors = part.shards[0] if part.shards else []
                    if _signature(tensors) != _signature(expect) or shard_size(tensors, meta) != size:
                        raise ShardcutError(
                            "shard differs from the header read from the Hub (did the repo change?)",
                            f"{ref}/{current}",
                        )
                    # the point of streaming: a downloaded input shard goes before the next comes
                    release = src.unlink if local is None else None
                    with PinnedSources([on_disk]) as pinned:  # copy and self-check read one file, unchanged
                        yield ShardJob(
                            name, tensors, meta, size, pinned, check=pinned.check, release=release, cached=local is None
                        )

            # one shard at a time (overlap=False): disk = output + one input shard
            on_bytes = byte_counter(done, sum(sizes), progress)
            write_shards(tx, shard_jobs(), verify=verify, on_bytes=on_bytes, overlap=False)
            shutil.rmtree(staging, ignore_errors=True)
            write_checkpoint_files(tx.dir, ckpt, info, plan, lay, names)
            tx.commit()
            report.side_files = stream_side_report(ckpt, info, plan, listing)
        except Exception as exc:
            shutil.rmtree(staging, ignore_errors=True)
            nothing_kept = not current and not report.resumed
            if nothing_kept or isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise  # the transaction removes the partial folder (and says so for a full disk)
            failure = exc  # keep the finished shards: a rerun continues from them
    if failure is not None:
        kept = sum((tx.dir / n).exists() for n in names)
        raise ShardcutError(
            f"stream stopped at {current} ({_why(failure)}); {kept} of {len(names)} output shards "
            f"are kept in {tx.dir}: run the same command again to continue",
            out,
        ) from failure
    report.verified = verify
    report.out = out
    return report


def _repo_files(api, ref: RepoRef) -> list[str]:
    """Every file of the repo at the pinned commit ([] offline or where the API cannot list)."""
    if hub.offline() or not hasattr(api, "list_repo_files"):
        return []
    with hub_errors(ref):
        return list(api.list_repo_files(ref.repo_id, revision=ref.revision))


def stream_side_report(ckpt: Checkpoint, info: ModelInfo, plan: Plan, listing: list[str]) -> list[dict]:
    """The side-file lines of a stream: the same rules as a local prune, plus the files the
    rules kept from being downloaded at all."""
    from shardcut.rewrite.side_files import COPY, not_downloaded, side_files

    lines = [f for f in side_files(ckpt, info, plan) if f.action != COPY] + not_downloaded(ckpt, info, listing)
    return [f.to_json() for f in sorted(lines, key=lambda f: f.rel)]


def _signature_of(path: Path) -> list[tuple]:
    """The tensors a finished shard holds, in order (empty if unreadable)."""
    try:
        header = read_header(path)
    except ShardcutError:
        return []
    return [(t.name, t.dtype, t.shape, t.nbytes) for t in header.tensors.values()]


def _why(exc: BaseException) -> str:
    from shardcut.format.hub import scrub

    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return scrub(f"{type(exc).__name__}: {text}" if not isinstance(exc, ShardcutError) else text)


def _hub_download(api, ref: RepoRef) -> Download:
    def fetch(filename: str, dest: Path) -> Path:
        return Path(api.hf_hub_download(ref.repo_id, filename, revision=ref.revision, local_dir=dest))

    return with_retries(fetch)


def is_transient(exc: BaseException) -> bool:
    """Network hiccups and server-side errors are worth retrying; a 4xx or bad input is not."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:
        return status >= 500 or status == 429
    return isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in (
        "ConnectError",
        "ReadTimeout",
        "ConnectTimeout",
        "RemoteProtocolError",
        "ReadError",
    )


def with_retries(fetch: Download, attempts: int = 5, base_delay: float = 2.0, sleep=None) -> Download:
    """Retry a shard download on transient failures with exponential backoff (2, 4, 8, 16 s).
    A partially downloaded file is resumed by huggingface_hub on the next attempt."""
    import time

    sleep = sleep or time.sleep

    def retrying(filename: str, dest: Path) -> Path:
        for attempt in range(attempts):
            try:
                return fetch(filename, dest)
            except Exception as exc:
                if attempt == attempts - 1 or not is_transient(exc):
                    raise
                sleep(base_delay * 2**attempt)
        raise AssertionError("unreachable")

    return retrying
