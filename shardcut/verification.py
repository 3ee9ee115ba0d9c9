"""Prove a pruned checkpoint complete and consistent, and (with its source) byte-exact."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from shardcut.checkpoint import INDEX_NAME, open_checkpoint, read_json_object
from shardcut.container import OutTensor, PinnedSources, read_header
from shardcut.errors import ShardcutError
from shardcut.model import describe
from shardcut.plan import Plan

_COMPARE_CHUNK = 4 << 20


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


def compare_written(out_dir: Path, shards: list[list[OutTensor]], names: list[str],
                    pinned: PinnedSources | None = None) -> int:
    """Re-read every written tensor and compare it with its source byte ranges.

    Raises ShardcutError at the first difference; returns the bytes compared. Reads in
    bounded chunks, so memory stays flat. `pinned`: the source files the copy read (compared
    through those same descriptors, not re-opened by path).
    """
    compared = 0
    sources: dict[Path, int] = {}
    try:
        for name, tensors in zip(names, shards):
            path = out_dir / name
            header = read_header(path)
            out_fd = os.open(path, os.O_RDONLY)
            try:
                for t in tensors:
                    info = header.tensors.get(t.name)
                    if info is None or info.shape != t.shape or info.dtype != t.dtype:
                        raise ShardcutError(f"tensor {t.name!r} missing or with the wrong dtype/shape", path)
                    pos = info.start
                    for piece in t.pieces:
                        if pinned is not None and piece.path in pinned:
                            src_fd = pinned.fd(piece.path)
                        else:
                            if piece.path not in sources:
                                sources[piece.path] = os.open(piece.path, os.O_RDONLY)
                            src_fd = sources[piece.path]
                        for off in range(0, piece.length, _COMPARE_CHUNK):
                            n = min(_COMPARE_CHUNK, piece.length - off)
                            if os.pread(out_fd, n, pos + off) != os.pread(src_fd, n, piece.offset + off):
                                raise ShardcutError(f"tensor {t.name!r} differs from its source bytes", path)
                        pos += piece.length
                        compared += piece.length
            finally:
                os.close(out_fd)
    finally:
        for fd in sources.values():
            os.close(fd)
    return compared


def verify(path: str | Path, source: str | Path | None = None) -> VerifyReport:
    """Check a (pruned) checkpoint: index complete and consistent with the shards, experts
    numbered 0..E-1 with the same tensors each, expert-axis tensors sized for E, and, with
    `source`, every tensor byte-identical to the source ranges the plan selects.

    Example:
        >>> report = verify("Qwen3-30B-A3B-pruned", source="Qwen3-30B-A3B")
        >>> report.ok
        True
    """
    from shardcut.hub import resolve_model

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
        if role.kind == "expert":
            experts[role.layer.key][role.expert].add(role.suffix)
        elif role.kind == "slice":
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
    report.checks.append(f"{len(info.layers)} MoE layers: experts contiguous 0..{info.num_experts - 1}, "
                         "expert-axis tensors sized for num_experts")

    if source is not None:
        from shardcut.rewrite import PLAN_COPY_NAME, layout

        plan_path = path / PLAN_COPY_NAME
        if not plan_path.exists():
            raise ShardcutError(f"{PLAN_COPY_NAME} not found: cannot tell which source experts were kept", path)
        plan = Plan.load(plan_path)
        src = open_checkpoint(resolve_model(source))
        lay = layout(src, describe(src), plan)
        expected = {t.name: t for t in lay.tensors}
        missing = sorted(set(expected) - set(ckpt.tensors))
        extra = sorted(set(ckpt.tensors) - set(expected))
        if missing or extra:
            report.problems.append(f"tensor set differs from the source under the plan: "
                                   f"{len(missing)} missing (e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]})")
        else:
            by_shard: dict[Path, list] = defaultdict(list)
            for name, (shard, _) in ckpt.tensors.items():
                by_shard[shard.path].append(expected[name])
            try:
                for shard_path, tensors in by_shard.items():
                    report.compared_bytes += compare_written(shard_path.parent, [tensors], [shard_path.name])
                report.checks.append(f"every tensor byte-identical to its source ranges ({report.compared_bytes} bytes)")
            except ShardcutError as exc:
                report.problems.append(str(exc))
    return report


def _ids(ids: list[int]) -> str:
    return str(ids) if len(ids) <= 10 else f"[{ids[0]}, …, {ids[-1]}] ({len(ids)} ids)"
