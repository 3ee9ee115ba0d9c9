"""The rewriter: a pruned checkpoint from a source checkpoint and a plan, by byte-range copies.

Every output tensor is described as a list of byte ranges of the source shards (`layout`),
then written with `direct_write.write_shard_direct` (or `container.write_shard` where the
filesystem refuses `O_DIRECT`). Kept tensors are one range; expert-axis slices of
C-contiguous tensors are one range per kept block. Nothing is ever loaded whole, so memory
stays flat whatever the checkpoint size.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from shardcut import __version__
from shardcut.format.cache_paths import snapshot_of
from shardcut.format.checkpoint import CONFIG_NAME, INDEX_NAME, Checkpoint, open_checkpoint
from shardcut.format.container import (
    OutTensor,
    Piece,
    PinnedSources,
    encode_header,
    shard_size,
    slice_expert_axis,
    write_shard,
)
from shardcut.format.direct_write import direct_io_supported, write_shard_direct
from shardcut.format.errors import ShardcutError
from shardcut.format.readback import Follower, compare_written, release_buffers, shard_segments
from shardcut.format.text import parse_size
from shardcut.moe.model import Copied, ExpertTensor, ModelInfo, describe, experts_by_config, sub_config
from shardcut.plans.plan import Plan, validate_plan
from shardcut.rewrite.side_files import HF_QUANT_NAME, PLAN_COPY_NAME

Progress = Callable[[int, int], None]


@dataclass
class Layout:
    """Where every output tensor's bytes come from, grouped into output shards."""

    shards: list[list[OutTensor]]
    metadata: list[dict[str, str] | None]
    copied: int = 0
    renamed: int = 0
    sliced: int = 0
    dropped: int = 0
    dropped_bytes: int = 0
    resharded: bool = False

    @property
    def tensors(self) -> list[OutTensor]:
        return [t for shard in self.shards for t in shard]

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class PruneReport:
    """What a prune did (or, for a dry run, would do).

    experts_before / experts_after are the main stack's counts; a model with several expert
    counts (Qwen3-Omni's talker) also gets `experts_by_config`: count group (the config node,
    as `inspect --json` names it) -> [before, after].
    """

    out: Path | None
    architecture: str
    layers: dict[str, list[int]]
    experts_before: int
    experts_after: int
    input_bytes: int
    output_bytes: int
    shards: list[str]
    copied: int
    renamed: int
    sliced: int
    dropped: int
    dry_run: bool
    verified: bool = False
    config_changes: dict = field(default_factory=dict)
    experts_by_config: dict[str, list[int]] = field(default_factory=dict)
    side_files: list[dict] = field(default_factory=list)  # what is not copied unchanged, and why

    @classmethod
    def planned(
        cls, ckpt: Checkpoint, info: ModelInfo, plan: Plan, lay: Layout, sizes: list[int], dry_run: bool
    ) -> PruneReport:
        """The report of pruning `ckpt` by `plan` into `lay` (not yet written: out None, unverified).

        Example:
            >>> PruneReport.planned(ckpt, info, plan, layout(ckpt, info, plan), sizes, dry_run=True).experts_after
            4
        """
        from shardcut.rewrite.side_files import COPY, side_files

        sides = [f.to_json() for f in side_files(ckpt, info, plan) if f.action != COPY]
        return cls(
            None,
            info.arch.name,
            dict(plan.keep),
            info.num_experts,
            plan.num_experts,
            ckpt.file_bytes,
            sum(sizes),
            output_names(ckpt, lay),
            lay.copied,
            lay.renamed,
            lay.sliced,
            lay.dropped,
            dry_run,
            config_changes=updated_config(info, plan.keep)[1],
            experts_by_config=experts_by_config(info, plan.keep),
            side_files=sides,
        )


def layout(ckpt: Checkpoint, info: ModelInfo, plan: Plan, max_shard_size: int | None = None) -> Layout:
    """Describe the pruned checkpoint: each output tensor and the source bytes it is made of."""
    result = Layout([], [])
    for shard in ckpt.shards:
        out: list[OutTensor] = []
        for t in shard.tensors.values():
            role = info.classify(t.name)
            whole = [Piece(shard.path, t.start, t.nbytes)]
            if isinstance(role, Copied):
                out.append(OutTensor(t.name, t.dtype, t.shape, whole))
                result.copied += 1
            elif isinstance(role, ExpertTensor):
                if role.expert >= role.layer.num_experts:
                    raise ShardcutError(
                        f"tensor {t.name!r}: expert id {role.expert} >= num_experts={role.layer.num_experts}",
                        shard.path,
                    )
                new = info.new_expert_id(role.layer, role.expert, plan.keep)
                if new is None:
                    result.dropped += 1
                    result.dropped_bytes += t.nbytes
                    continue
                out.append(OutTensor(info.expert_name(role.layer, new, role.suffix), t.dtype, t.shape, whole))
                result.renamed += 1
            else:
                kept = info.kept_blocks(role, plan.keep)
                sliced = slice_expert_axis(shard.path, t, role.axis, role.blocks, kept)
                result.dropped_bytes += t.nbytes - sliced.nbytes
                out.append(sliced)
                result.sliced += 1
        if out:
            result.shards.append(out)
            result.metadata.append(shard.metadata)
    if max_shard_size:
        result.shards, result.metadata = _reshard(result.tensors, max_shard_size, result.metadata)
        result.resharded = True
    return result


def _reshard(tensors: list[OutTensor], limit: int, metadata: list) -> tuple[list[list[OutTensor]], list]:
    meta = next((m for m in metadata if m), None)
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards, [meta] * len(shards)


def shard_names(n: int) -> list[str]:
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def output_names(ckpt: Checkpoint, lay: Layout) -> list[str]:
    """Output shard file names: the source's own when each output shard is one source shard
    (same count, no resharding), so gpt-oss keeps `model-00000-of-00002` and DeepSeek-V3
    `-of-000163`; otherwise transformers' `model-0000i-of-0000n`."""
    if not lay.resharded and len(lay.shards) == len(ckpt.shards):
        names = []
        for shard in ckpt.shards:
            try:
                names.append(shard.path.relative_to(ckpt.root).as_posix())
            except ValueError:
                break
        if len(names) == len(lay.shards) and all("/" not in n for n in names) and len(set(names)) == len(names):
            return names
    return shard_names(len(lay.shards))


def index_metadata(ckpt: Checkpoint, lay: Layout, plan: Plan) -> dict:
    """The output index's `metadata`: the source's keys in its order, with the counts pruning
    changes recomputed (`total_size`; `total_parameters` minus the pruned elements), plus
    shardcut's own."""
    meta = dict(ckpt.index_metadata)
    meta["total_size"] = lay.total_size
    params = meta.get("total_parameters")
    if isinstance(params, int) and not isinstance(params, bool):
        removed = sum(math.prod(t.shape) for _, t in ckpt.tensors.values()) - sum(
            math.prod(t.shape) for t in lay.tensors
        )
        meta["total_parameters"] = params - removed
    meta["shardcut_version"] = __version__
    meta["plan_sha256"] = plan.sha256()
    return meta


def updated_config(info: ModelInfo, kept: int | dict[str, list[int]]) -> tuple[dict, dict]:
    """config.json with every spelling of the expert count set to the kept count, and the changes.

    `kept` is one count for all layers, or a plan's keep lists (stacks with their own config,
    such as Qwen3-Omni's talker, get their own count). A count stored as a list (ERNIE-VL's
    `[text, vision]`) gets each entry set.
    """
    config = copy.deepcopy(info.config)
    changes: dict[str, list] = {}
    main_path = info.layers[0].config_path if info.layers else info.arch.config_path
    for path, layers in info.layers_by_config().items():
        n = kept if isinstance(kept, int) else len(kept[layers[0].key])
        before = layers[0].num_experts
        text = sub_config(config, path)
        where = ".".join(path) if text is not config else ""
        nodes = [(text, where)] + ([(config, "")] if path == main_path and text is not config else [])
        for node, at in nodes:
            for key in info.arch.expert_keys:
                value = node.get(key)
                if isinstance(value, int) and value == before and value != n:
                    node[key] = n
                    changes[f"{at}.{key}".lstrip(".")] = [before, n]
                elif isinstance(value, list) and value and all(v == before for v in value) and before != n:
                    node[key] = [n] * len(value)
                    changes[f"{at}.{key}".lstrip(".")] = [value, node[key]]
    return config, changes


def prune(
    model: str | Path,
    out: str | Path | None,
    plan: Plan,
    *,
    max_shard_size: int | str | None = None,
    dry_run: bool = False,
    verify: bool = True,
    resume: bool = False,
    progress: Progress | None = None,
) -> PruneReport:
    """Write a pruned copy of `model` to `out`, keeping the experts `plan` lists.

    The input is never modified. OUT is assembled under a hidden partial folder next to it and
    renamed into place only when complete, so a crash leaves no OUT that looks finished; with
    `resume`, shards an interrupted run finished are checked against the source and kept.
    With `verify` (default) every written tensor is re-read and compared with its source.

    Example:
        >>> plan = Plan.load("plan.json")
        >>> report = prune("Qwen3-30B-A3B", "Qwen3-30B-A3B-pruned", plan)
        >>> report.experts_after
        64
    """
    from shardcut.format.hub import resolve_model
    from shardcut.rewrite.outdir import OutputTransaction, check_output_path

    src = resolve_model(model)
    ckpt = open_checkpoint(src)
    info = describe(ckpt)
    validate_plan(plan, info, plan.origin)
    pruned_config(ckpt, info, plan)  # refuses quantization configs it cannot renumber, before any write
    lay = layout(ckpt, info, plan, parse_size(max_shard_size))
    names = output_names(ckpt, lay)
    sizes = [shard_size(s, m) for s, m in zip(lay.shards, lay.metadata, strict=True)]
    report = PruneReport.planned(ckpt, info, plan, lay, sizes, dry_run)
    if dry_run or out is None:
        return report

    out = Path(out)
    check_output_path(out, src)
    state = {"source": str(src.resolve()), "plan_sha256": plan.sha256(), "shards": names, "sizes": sizes}
    with PinnedSources(ckpt.shards) as pinned, OutputTransaction(out, state, resume=resume) as tx:
        _write_pinned(tx, pinned, ckpt, info, plan, lay, names, sizes, verify, progress)
        report.verified = verify
        tx.commit()
    report.out = out
    return report


def _write_pinned(
    tx,
    pinned: PinnedSources,
    ckpt: Checkpoint,
    info: ModelInfo,
    plan: Plan,
    lay: Layout,
    names: list[str],
    sizes: list[int],
    verify: bool,
    progress: Progress | None,
) -> None:
    """Write (or, resuming, keep) every shard of `lay` into the transaction's folder, reading the
    sources only through `pinned`; the sources are checked unchanged after the copy and again
    after the self-check, so an output mixing two versions of a shard is never committed."""
    from shardcut.rewrite.outdir import check_free_space

    todo = []
    for name, tensors, size in zip(names, lay.shards, sizes, strict=True):
        if tx.finished(name, size):
            try:  # finished by an interrupted run: trusted only once its bytes match the source
                compare_written(tx.dir, [tensors], [name], pinned)
                continue
            except ShardcutError:
                pass
        todo.append(name)
    check_free_space(tx.out.parent, sum(sz for n, sz in zip(names, sizes, strict=True) if n in todo))
    done = sum(t.nbytes for n, s in zip(names, lay.shards, strict=True) if n not in todo for t in s)
    jobs = (
        ShardJob(name, tensors, meta, size, pinned)
        for name, tensors, meta, size in zip(names, lay.shards, lay.metadata, sizes, strict=True)
        if name in todo
    )
    write_shards(tx, jobs, verify=verify, on_bytes=byte_counter(done, lay.total_size, progress))
    pinned.check()
    write_checkpoint_files(tx.dir, ckpt, info, plan, lay, names)  # shards are all renamed by now


def byte_counter(done: int, total: int, progress: Progress | None) -> Callable[[int], None]:
    """The `on_bytes` of a rewrite: bytes copied added to `done` (what a resumed run kept) and
    reported to `progress(done, total)`."""

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    return on_bytes


@dataclass
class ShardJob:
    """One output shard to write: its tensors, read only through `sources` (pinned files), and
    what must happen once it is verified: `check` before it is marked finished (a streamed
    source still unchanged), `release` after (a streamed source deleted). `cached`: the
    sources are in the page cache (just downloaded), so the shard is copied through it with
    `container.write_shard`, not with O_DIRECT."""

    name: str
    tensors: list[OutTensor]
    metadata: dict[str, str] | None
    size: int
    sources: PinnedSources
    check: Callable[[], None] | None = None
    release: Callable[[], None] | None = None
    cached: bool = False  # the sources were just written (a download): written through the page cache


def write_shards(tx, jobs: Iterable[ShardJob], *, verify: bool, on_bytes, overlap: bool = True) -> None:
    """The write loop of every prune, plain or streamed: each shard of `jobs` is written into
    the transaction's folder, flushed, read back from the disk and compared (with `verify`),
    fsynced and renamed into place (`tx.shard_done`).

    Each shard is written from this thread while a follower on a second thread trails it chunk
    by chunk: it reads the chunk back from the device and compares it with the source
    (readback.Follower), then fsyncs and renames the shard. Where the filesystem allows it the
    shard is written with `O_DIRECT` from reused buffers (direct_write: no page cache for the
    output, each chunk on the device when reported); otherwise with `copy_file_range` through
    the page cache, and the follower waits for each chunk's write-back first. Copy, write and
    read-back overlap (every wait and memcmp releases the GIL), and the writer waits when it
    runs more than readback.WINDOW ahead, so memory and dirty pages stay bounded. With
    `overlap` the next shard is written while the last one is still verified; without it the
    next job is not even asked for before the last one is finished (a stream: disk = output +
    one input shard). A failure in any shard stops every writer and raises here.
    """
    direct = direct_io_supported(tx.dir)  # else through the page cache (tmpfs, some network filesystems)
    finisher = ThreadPoolExecutor(1, thread_name_prefix="shardcut-finish")
    followers: list[Follower] = []
    failed: list[BaseException] = []
    futures = []

    def stop_all(future) -> None:  # a difference in shard i stops the writer of shard i+1 at once
        exc = None if future.cancelled() else future.exception()
        if exc is not None:
            failed.append(exc)
            for f in followers:
                f.cancel(exc)

    def finish(follower: Follower, job: ShardJob) -> None:
        follower.run()  # flushed, read back, compared, fsynced
        if job.check is not None:
            job.check()
        tx.shard_done(job.name)  # durable before it is renamed into place
        if job.release is not None:
            job.release()

    it = iter(jobs)
    try:
        for job in it:
            if failed:
                raise failed[0]
            header = encode_header(job.tensors, job.metadata)
            path = tx.shard_path(job.name)
            segments = shard_segments(header, job.tensors)
            # a shard just downloaded is in the page cache: copied from there, through it (measured:
            # a stream of direct writes behind page-cache downloads was 6-12% slower)
            direct_job = direct and not job.cached
            follower = Follower(path, segments, job.size, verify=verify, sources=job.sources, direct=direct_job)
            followers.append(follower)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))  # for the follower to open
            futures.append(finisher.submit(finish, follower, job))
            futures[-1].add_done_callback(stop_all)
            try:
                _write_for(follower, job.tensors, job.metadata, on_bytes, job.sources)
            finally:
                follower.writer_done()
            if not overlap:
                futures[-1].result()
        for future in futures:
            future.result()  # the first failure (a difference, ENOSPC at fsync) raises here
    finally:
        for f in followers:
            f.writer_done()
        finisher.shutdown(wait=True, cancel_futures=True)
        release_buffers()
        close = getattr(it, "close", None)
        if close is not None:
            close()  # a generator of jobs releases what it holds (a streamed shard's pins)


def _write_for(follower: Follower, tensors: list[OutTensor], metadata, on_bytes, sources: PinnedSources) -> None:
    """Write `follower`'s shard the way it follows: with O_DIRECT, or through the page cache."""
    if follower.direct:
        write_shard_direct(follower.path, tensors, metadata, on_bytes, sources=sources, on_written=follower.written)
    else:
        write_shard(
            follower.path, tensors, metadata, on_bytes, sources=sources, sync=False, on_written=follower.written
        )


def write_followed(
    path: Path,
    tensors: list[OutTensor],
    metadata: dict[str, str] | None = None,
    *,
    sources: PinnedSources,
    verify: bool = True,
) -> int:
    """One shard written as `write_shards` writes each (with its follower on a second thread):
    when it returns, the file is written, read back from the disk and compared (with `verify`),
    and fsynced. Returns the file size.

    Example:
        >>> with PinnedSources(ckpt.shards) as pinned:
        ...     write_followed(Path("out.safetensors"), lay.shards[0], lay.metadata[0], sources=pinned)
    """
    header = encode_header(tensors, metadata)
    size = len(header) + sum(t.nbytes for t in tensors)
    direct = direct_io_supported(Path(path).parent)
    follower = Follower(path, shard_segments(header, tensors), size, verify=verify, sources=sources, direct=direct)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))  # for the follower to open
    with ThreadPoolExecutor(1, thread_name_prefix="shardcut-follow") as pool:
        job = pool.submit(follower.run)
        try:
            _write_for(follower, tensors, metadata, None, sources)
        finally:
            follower.writer_done()
        job.result()
    release_buffers()
    return size


def pruned_config(ckpt: Checkpoint, info: ModelInfo, plan: Plan) -> tuple[dict, dict | None]:
    """config.json and ModelOpt's hf_quant_config.json (None if absent) of the pruned model:
    expert counts updated, quantization entries naming experts dropped or renumbered."""
    from shardcut.format.checkpoint import read_json_object
    from shardcut.moe.quant_config import rewrite_quantization

    side = ckpt.root / HF_QUANT_NAME
    return rewrite_quantization(
        updated_config(info, plan.keep)[0], info, plan.keep, read_json_object(side) if side.exists() else None
    )


def write_checkpoint_files(
    dest: Path, ckpt: Checkpoint, info: ModelInfo, plan: Plan, lay: Layout, names: list[str]
) -> None:
    """Everything of the output but the shards' bytes: index, config.json, side files (by the
    rules of `shardcut.rewrite.side_files`), the plan; every file with its source's permission bits."""
    from shardcut.format.durable import fsync_dir
    from shardcut.rewrite.side_files import output_mode, set_mode, side_files, write_side_files

    def mode_of(*paths: Path) -> int:
        for p in paths:
            if p.is_file():
                return output_mode(os.stat(p).st_mode)
        return 0o644

    files = side_files(ckpt, info, plan)  # refuses symlinks out of MODEL and special files
    for name, tensors in zip(names, lay.shards, strict=True):  # a shard made of several keeps the strictest bits
        sources = {p.path for t in tensors for p in t.pieces}
        bits = 0o777
        for src in sources:
            bits &= os.stat(src).st_mode if src.is_file() else 0o644
        path = dest / name
        if not path.exists():
            path = dest / f"{name}.part"
        if path.exists():
            set_mode(path, output_mode(bits))
    config_mode = mode_of(ckpt.root / CONFIG_NAME)
    _write_json(
        dest / INDEX_NAME,
        {
            "metadata": index_metadata(ckpt, lay, plan),
            "weight_map": {t.name: name for name, tensors in zip(names, lay.shards, strict=True) for t in tensors},
        },
        mode=mode_of(ckpt.root / INDEX_NAME, ckpt.root / CONFIG_NAME),
    )
    config, quant_side = pruned_config(ckpt, info, plan)
    _write_json(dest / CONFIG_NAME, config, mode=config_mode)
    write_side_files(dest, ckpt, info, plan, files, quant_side)
    provenance = plan.to_json()
    source = provenance.setdefault("source", {})
    if isinstance(source, dict):
        source.setdefault("num_experts", info.num_experts)
        if len(info.layers_by_config()) > 1:  # the card's "before" for every stack (push)
            source.setdefault("num_experts_by_config", info.summary()["num_experts_by_config"])
        root = ckpt.root.resolve() if ckpt.root.exists() else ckpt.root
        snapshot = snapshot_of(root)
        if snapshot:  # a Hugging Face cache snapshot: name the repo and the exact commit pruned
            source.setdefault("model", snapshot[0])
            source.setdefault("revision", snapshot[1])
        card = _card_metadata(ckpt.root / "README.md")
        if card:  # the source's card is not copied (push writes a new one); its license etc. are kept here
            source.setdefault("card", card)
    _write_json(dest / PLAN_COPY_NAME, provenance, mode=config_mode)
    root_mode = os.stat(ckpt.root).st_mode if ckpt.root.is_dir() else 0o755
    os.chmod(dest, (root_mode & 0o777) | 0o700)
    fsync_dir(dest)


def _card_metadata(path: Path) -> dict:
    """License, pipeline tag and language from a model card's YAML front matter ({} if none)."""
    if not path.is_file() or path.stat().st_size > 4 << 20:
        return {}
    try:
        from huggingface_hub import ModelCard

        data = ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a card that does not parse has nothing to keep
        return {}
    keys = ("license", "license_name", "license_link", "pipeline_tag", "language")
    return {k: data[k] for k in keys if data.get(k)}


def _write_json(path: Path, data: dict, indent: int | None = 2, mode: int | None = None) -> None:
    from shardcut.format.durable import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n", mode)
