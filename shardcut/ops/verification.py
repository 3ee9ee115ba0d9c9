"""Prove a pruned checkpoint complete and consistent, and (with its source) byte-exact."""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from shardcut.format.checkpoint import CONFIG_NAME, INDEX_NAME, Checkpoint, open_checkpoint, read_json_object
from shardcut.format.container import COMPARE_CHUNK
from shardcut.format.errors import CheckpointError, ShardcutError
from shardcut.format.readback import compare_written
from shardcut.moe.model import ExpertAxisSlice, ExpertTensor, ModelInfo, describe
from shardcut.plans.plan import Plan


@dataclass
class VerifyReport:
    """The checks `verify` ran and what they found (`problems` empty means it passed)."""

    path: Path
    architecture: str
    num_experts: int
    layers: int
    tensors: int
    total_size: int
    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    compared_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str | Path, source: str | Path | None = None) -> VerifyReport:
    """Check a (pruned) checkpoint: index complete and consistent with the shards, experts
    numbered 0..E-1 with the same tensors each, expert-axis tensors sized for E, no weight file
    beside the index's and no JSON file stating another expert count; with `source`, every
    tensor byte-identical to the source ranges the plan selects, config.json the source's with
    only the plan's changes, every side file as prune makes it, expert-axis sizes exactly E.

    Example:
        >>> report = verify("Qwen3-30B-A3B-pruned", source="Qwen3-30B-A3B")
        >>> report.ok
        True
    """
    from shardcut.format.hub import resolve_model

    path = Path(path)
    ckpt = open_checkpoint(path)  # index <-> shard consistency, headers, bounds
    info = describe(ckpt)
    report = VerifyReport(path, info.arch.name, info.num_experts, len(info.layers), len(ckpt.tensors), ckpt.total_bytes)
    report.checks.append(f"index and {len(ckpt.shards)} shard headers consistent ({len(ckpt.tensors)} tensors)")

    index_path = path / INDEX_NAME
    if index_path.exists():
        declared = read_json_object(index_path).get("metadata", {}).get("total_size")
        if declared is not None and declared != ckpt.total_bytes:
            report.problems.append(f"{INDEX_NAME}: total_size {declared} != {ckpt.total_bytes} bytes of tensors")
        report.checks.append("index total_size matches the tensors")

    experts: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for name, (_, t) in ckpt.tensors.items():
        role = info.classify(name)
        if isinstance(role, ExpertTensor):
            experts[role.layer.key][role.expert].add(role.suffix)
        elif isinstance(role, ExpertAxisSlice):
            dim = t.shape[role.axis] if role.axis < len(t.shape) else -1
            if dim <= 0 or dim % role.blocks:
                report.problems.append(
                    f"{name}: dim {role.axis} is {dim}, not a multiple of {role.blocks} (num_experts"
                    f"{' + zero experts' if role.blocks != role.layer.num_experts else ''})"
                )
    for layer in info.layers:
        if layer.stack.experts is None:
            continue
        ids = experts.get(layer.key, {})
        if sorted(ids) != list(range(layer.num_experts)) and ids:
            report.problems.append(
                f"layer {layer.key}: expert ids {_ids(sorted(ids))} are not exactly 0..{layer.num_experts - 1}"
            )
        suffix_sets = {frozenset(s) for s in ids.values()}
        if len(suffix_sets) > 1:
            report.problems.append(f"layer {layer.key}: experts carry different tensor sets")
    report.checks.append(
        f"{len(info.layers)} MoE layers: experts contiguous 0..{info.num_experts - 1}, "
        "expert-axis tensors sized for num_experts"
    )
    check_side_files(path, ckpt, info, report)

    if source is not None:
        from shardcut.rewrite.writer import PLAN_COPY_NAME, layout

        plan_path = path / PLAN_COPY_NAME
        if not plan_path.exists():
            raise CheckpointError(f"{PLAN_COPY_NAME} not found: cannot tell which source experts were kept", path)
        plan = Plan.load(plan_path)
        src = open_checkpoint(resolve_model(source))
        lay = layout(src, describe(src), plan)
        expected = {t.name: t for t in lay.tensors}
        missing = sorted(set(expected) - set(ckpt.tensors))
        extra = sorted(set(ckpt.tensors) - set(expected))
        if missing or extra:
            report.problems.append(
                f"tensor set differs from the source under the plan: "
                f"{len(missing)} missing (e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]})"
            )
        else:
            by_shard: dict[Path, list] = defaultdict(list)
            for name, (shard, _) in ckpt.tensors.items():
                by_shard[shard.path].append(expected[name])
            try:
                report.compared_bytes += _compare_shards(by_shard)
                report.checks.append(
                    f"every tensor byte-identical to its source ranges ({report.compared_bytes} bytes)"
                )
            except ShardcutError as exc:
                report.problems.append(str(exc))
        check_against_source(ckpt, info, src, plan, report)
    return report


VERIFY_READERS = 2  # shards compared at once: both sides are reads, and two in flight keep the disk busier


def _compare_shards(by_shard: dict[Path, list]) -> int:
    """compare_written over OUT's shards, VERIFY_READERS at a time; the first difference raises
    (the shards not started yet are not compared)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(VERIFY_READERS, thread_name_prefix="shardcut-verify")
    try:
        jobs = [pool.submit(compare_written, p.parent, [tensors], [p.name]) for p, tensors in by_shard.items()]
        return sum(job.result() for job in jobs)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def check_side_files(path: Path, ckpt: Checkpoint, info: ModelInfo, report: VerifyReport) -> None:
    """Flag what OUT holds beside its shards that contradicts them: a weight file the index does
    not list (unpruned weights), a JSON file stating another expert count than the config, a
    derived weight set (gpt-oss `original/`) whose experts or count do not match."""
    from shardcut.rewrite.side_files import (
        PLAN_COPY_NAME,
        WEIGHT_PATTERNS,
        derived_layout,
        main_files,
        stale_counts,
        walk,
    )

    try:
        files = walk(path, main_files(ckpt) | {PLAN_COPY_NAME})
    except ShardcutError as exc:
        report.problems.append(str(exc))
        return
    counts = {layer.num_experts for layer in info.layers} or {info.num_experts}
    derived = {d.folder: d for d in info.arch.derived_sets}
    checked: set[str] = set()
    for rel, _ in files:
        folder, _, inner = rel.partition("/")
        d = derived.get(folder) if inner else None
        if d is not None and inner in (*d.weights, d.config):
            if folder not in checked:
                checked.add(folder)
                try:
                    derived_layout(path, d, info, None)
                except ShardcutError as exc:
                    report.problems.append(f"{folder}/: {exc}")
            continue
        if any(fnmatch.fnmatchcase(rel, p) for p in WEIGHT_PATTERNS):
            report.problems.append(f"{rel}: a weight file the index does not list (it may hold pruned experts)")
        elif rel.endswith(".json"):
            stale = stale_counts(path / rel, counts)
            if stale:
                report.problems.append(f"{rel}: {stale[0]} contradicts config.json's {sorted(counts)} experts")
    report.checks.append(f"{len(files)} side files: no weights outside the index, no contradicting expert count")


def check_against_source(ckpt: Checkpoint, info: ModelInfo, src: Checkpoint, plan: Plan, report: VerifyReport) -> None:
    """With the source: config.json differs only where the plan changes it, every side file is
    what the prune makes of the source's (copies byte for byte, left-out files absent, derived
    sets byte-exact), and the config's expert counts agree with every expert-axis size."""
    from shardcut.rewrite.side_files import (
        COPY,
        HF_QUANT_NAME,
        LEAVE,
        PLAN_COPY_NAME,
        WEIGHT_PATTERNS,
        derived_layout,
        side_files,
    )
    from shardcut.rewrite.writer import pruned_config

    src_info = describe(src)
    want_config, want_quant = pruned_config(src, src_info, plan)
    diffs = json_diff(want_config, read_json_object(ckpt.root / CONFIG_NAME))
    if diffs:
        report.problems.append(
            f"{CONFIG_NAME} differs from the source beyond the plan's changes: "
            + "; ".join(diffs[:4])
            + (f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else "")
        )
    report.checks.append(f"{CONFIG_NAME} equals the source's with the plan's changes only")

    try:
        files = side_files(src, src_info, plan)
    except ShardcutError as exc:
        report.problems.append(f"source side files: {exc}")
        files = []
    done: set[str] = set()
    for f in files:
        out_file = ckpt.root / f.rel
        if f.action == LEAVE:
            # OUT's own plan copy, or a card written for it, is not the source's file left in
            weight = any(fnmatch.fnmatchcase(f.rel, p) for p in WEIGHT_PATTERNS)
            if f.rel != PLAN_COPY_NAME and out_file.is_file() and (weight or same_bytes(src.root / f.rel, out_file)):
                report.problems.append(f"{f.rel}: present, but a prune leaves it out ({f.why})")
        elif not out_file.is_file():
            report.problems.append(f"{f.rel}: missing (the source has it)")
        elif f.action == COPY or (f.rel == HF_QUANT_NAME and want_quant is None):
            if not same_bytes(src.root / f.rel, out_file):
                report.problems.append(f"{f.rel}: differs from the source's byte for byte")
        elif f.rel == HF_QUANT_NAME:
            diffs = json_diff(want_quant, read_json_object(out_file))
            if diffs:
                report.problems.append(f"{f.rel}: differs from the renumbered source: {'; '.join(diffs[:2])}")
        elif f.derived is not None and f.derived.folder not in done:
            d = f.derived
            done.add(d.folder)
            tensors, _, want = derived_layout(src.root, d, src_info, plan)
            try:
                for wname, out in tensors.items():
                    report.compared_bytes += compare_written(ckpt.root / d.folder, [out], [wname])
            except ShardcutError as exc:
                report.problems.append(str(exc))
            cfg = ckpt.root / d.folder / d.config
            diffs = json_diff(want, read_json_object(cfg)) if cfg.is_file() else ["missing"]
            if diffs:
                report.problems.append(f"{d.folder}/{d.config}: {'; '.join(diffs[:2])}")
    report.checks.append(
        f"{len(files)} side files as the prune makes them (copies byte-identical, "
        f"{sum(f.action == LEAVE for f in files)} left out)"
    )

    for name, (_, t) in ckpt.tensors.items():
        role, src_role = info.classify(name), src_info.classify(name) if name in src.tensors else None
        if not isinstance(role, ExpertAxisSlice) or not isinstance(src_role, ExpertAxisSlice):
            continue
        src_dim = src.tensors[name][1].shape[src_role.axis]
        block = src_dim // src_role.blocks
        dim = t.shape[role.axis] if role.axis < len(t.shape) else -1
        if dim != role.blocks * block:
            report.problems.append(
                f"{name}: dim {role.axis} is {dim}, but config.json's count makes it "
                f"{role.blocks} x {block} = {role.blocks * block}"
            )
    report.checks.append("expert-axis sizes agree with config.json's expert counts")


def json_diff(want: object, got: object, at: str = "") -> list[str]:
    """Where `got` differs from `want`, as `key want -> got` lines."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = []
        for k in list(want) + [k for k in got if k not in want]:
            where = f"{at}.{k}" if at else str(k)
            if k not in got:
                out.append(f"{where} missing")
            elif k not in want:
                out.append(f"{where} added")
            else:
                out += json_diff(want[k], got[k], where)
        return out
    if want != got or type(want) is not type(got):
        return [f"{at or 'value'} {_short(want)} -> {_short(got)}"]
    return []


def _short(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def same_bytes(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes (compared in bounded chunks)."""
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(COMPARE_CHUNK), fb.read(COMPARE_CHUNK)
            if x != y:
                return False
            if not x:
                return True


def _ids(ids: list[int]) -> str:
    return str(ids) if len(ids) <= 10 else f"[{ids[0]}, …, {ids[-1]}] ({len(ids)} ids)"
