"""What travels beside the weights: one table decides, for every file of MODEL that is not a
main shard, the index or config.json, whether the pruned output copies it, rewrites it, prunes
it like the main shards, or leaves it out (and says why).

A file left in the output unchanged must stay true of the pruned model. So a second copy of
the weights (gpt-oss's `original/`, OpenAI's own names) is pruned by the same plan where its
layout is known (the table's `derived_sets`), and every other weight file, the source's model card, stale
score or calibration files and an earlier prune's plan are left out. Copies are made safely: a
symlink that resolves outside MODEL, a FIFO or a device is refused by `stat`, never opened;
outputs keep their sources' permission bits.

    >>> for f in side_files(ckpt, info):
    ...     print(f.rel, f.action, f.why)
    original/model.safetensors prune OpenAI's own copy of the weights: pruned by the same plan
    metal/model.bin leave weights shardcut cannot prune (Metal format): …
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import stat
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path

from shardcut.format.checkpoint import CONFIG_NAME, INDEX_NAME, WEIGHT_PATTERNS, Checkpoint, link_area, read_json_object
from shardcut.format.container import OutTensor, Piece, read_header, slice_expert_axis, write_shard
from shardcut.format.durable import atomic_write_text, fsync_dir
from shardcut.format.errors import CheckpointError, ShardcutError
from shardcut.moe.schema import DerivedSet

COPY, REWRITE, PRUNE, LEAVE = "copy", "rewrite", "prune", "leave"
PLAN_COPY_NAME = "shardcut-plan.json"
HF_QUANT_NAME = "hf_quant_config.json"  # ModelOpt's legacy side file
_COPY_CHUNK = 8 << 20


@dataclass(frozen=True)
class Rule:
    """Files matching any of `patterns` (fnmatch on the path relative to MODEL, `/`-separated)
    get `action`; `why` is the line the prune report prints for what is not copied."""

    patterns: tuple[str, ...]
    action: str
    why: str


# First match wins. Derived sets of the model's architecture are tried before these.
SIDE_RULES: tuple[Rule, ...] = (
    Rule(("README.md",), LEAVE, "the source model's card: `shardcut push` writes the pruned model's card"),
    Rule((PLAN_COPY_NAME, "shardcut-provenance.json"), LEAVE, "an earlier prune's record: this prune writes its own"),
    Rule(
        ("calibration/*", "*scores*.safetensors", "*scores*.json", "*saliency*.json", "*observer*.pt"),
        LEAVE,
        "scores or calibration data of the source model: stale for the pruned one",
    ),
    Rule((HF_QUANT_NAME,), REWRITE, "ModelOpt's quantization config: entries naming experts renumbered"),
    Rule(("metal/*",), LEAVE, "Metal weights of every expert, a format shardcut cannot prune"),
    Rule(("original/*",), LEAVE, "a second copy of the weights in a layout shardcut cannot prune for this model"),
    Rule(
        WEIGHT_PATTERNS,
        LEAVE,
        "weights outside the main index, in a format or set shardcut cannot prune: they would bring back "
        "every pruned expert",
    ),
    Rule(("*",), COPY, ""),
)


@dataclass
class SideFile:
    """One file of MODEL beside the main weights and what the prune does with it."""

    rel: str
    action: str
    why: str = ""
    mode: int = 0o644  # permission bits of the source file
    derived: DerivedSet | None = None
    st: os.stat_result | None = None  # the file as `walk` found it: a copy must open this very file

    def to_json(self) -> dict:
        return {"path": self.rel, "action": self.action, "why": self.why}


def output_mode(src_mode: int) -> int:
    """Permission bits for an output made from a source with `src_mode`: the source's group
    and other bits exactly (a 0600 source never becomes 0644); the owner can always read and
    write what shardcut writes, so a resume or a re-run can replace it."""
    return (src_mode & 0o777) | 0o600


def expert_count_keys() -> set[str]:
    """Every spelling of a routed-expert count any supported family uses."""
    from shardcut.moe.architectures import ARCHITECTURES

    return {k for arch in ARCHITECTURES for k in (*arch.expert_keys, *(d.count_key for d in arch.derived_sets))}


def walk(root: Path, skip: Set[str] = frozenset(), area: Path | None = None) -> list[tuple[str, os.stat_result]]:
    """Every regular file under `root` (hidden folders excepted) but `skip`: (relative path, stat).

    Refused (CheckpointError naming the file): a symlink resolving outside `area` (default:
    the checkpoint's own folder, or its Hugging Face cache repo folder), and anything that is
    not a regular file (a FIFO, socket or device: checked by `stat`, never opened).
    """
    root = Path(root)
    area = (area or link_area(root)).resolve()
    seen: set[Path] = set()
    found: list[tuple[str, os.stat_result]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        real = here.resolve()
        if real in seen:  # a symlinked folder seen before (or a loop): walk it once
            dirnames[:] = []
            continue
        seen.add(real)
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            _inside_or_refuse(root, here / d, area)
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            p = here / name
            rel = p.relative_to(root).as_posix()
            if rel in skip:
                continue
            _inside_or_refuse(root, p, area)
            st = os.stat(p)
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError("not a regular file (a FIFO, socket or device): refusing it", p)
            found.append((rel, st))
    return found


def _inside_or_refuse(root: Path, p: Path, area: Path) -> None:
    target = p.resolve()
    try:
        target.relative_to(area)
    except ValueError:
        raise CheckpointError(
            f"a symlink resolving outside the checkpoint folder ({target}): refusing to copy it", p
        ) from None


def main_files(ckpt: Checkpoint) -> set[str]:
    """Paths (relative to MODEL) of the files the rewrite itself produces: shards, index, config."""
    names = {INDEX_NAME, CONFIG_NAME}
    for s in ckpt.shards:
        try:
            names.add(s.path.relative_to(ckpt.root).as_posix())
        except ValueError:
            pass
    return names


def side_files(ckpt: Checkpoint, info, plan=None) -> list[SideFile]:
    """Every file of MODEL but the main shards, the index and config.json, with its action.

    Raises CheckpointError for a symlink resolving outside MODEL or a special file. A copied
    JSON file that states the source's expert count is left out (it would contradict the pruned
    config); with `plan`, a derived set that does not fit the plan is left out with the reason.
    """
    root = ckpt.root
    files = walk(root, main_files(ckpt))
    derived = {d.folder: d for d in info.arch.derived_sets}
    set_problems = {
        folder: _derived_problem(root, d, info, plan) for folder, d in derived.items() if (root / d.folder).is_dir()
    }
    # the counts the output will state: a copied JSON stating any other would contradict it
    counts = (
        {len(v) for v in plan.keep.values()} if plan is not None else {layer.num_experts for layer in info.layers}
    ) or {info.num_experts}
    out = []
    for rel, st in files:
        folder = rel.split("/", 1)[0] if "/" in rel else None
        if folder in derived and folder in set_problems:
            d = derived[folder]
            problem = set_problems[folder]
            if problem:
                out.append(SideFile(rel, LEAVE, f"{d.folder}/ left out whole: {problem}", st.st_mode))
                continue
            inner = rel.split("/", 1)[1]
            action = PRUNE if inner in d.weights else REWRITE if inner == d.config else None
            if action:
                out.append(SideFile(rel, action, d.why, st.st_mode, d))
                continue
            if not any(fnmatch.fnmatchcase(inner, p) for p in WEIGHT_PATTERNS):
                out.append(_checked_copy(root, rel, st, counts))
                continue
        rule = rule_for(rel)
        if rule.action == COPY:
            out.append(_checked_copy(root, rel, st, counts))
        else:
            out.append(SideFile(rel, rule.action, rule.why, st.st_mode, st=st))
    return out


def rule_for(rel: str) -> Rule:
    """The first rule of SIDE_RULES matching `rel` (the last one matches everything)."""
    return next(r for r in SIDE_RULES if any(fnmatch.fnmatchcase(rel, p) for p in r.patterns))


def not_downloaded(ckpt: Checkpoint, info, listing: list[str]) -> list[SideFile]:
    """The lines for files of a Hub repo (`listing`) that `--stream` did not download, by the
    same rules: what the table leaves out, with its reason."""
    skip = main_files(ckpt)
    derived = {d.folder: d for d in info.arch.derived_sets}
    out = []
    for rel in sorted(listing):
        if rel in skip or (ckpt.root / rel).exists() or any(part.startswith(".") for part in rel.split("/")):
            continue
        folder, _, inner = rel.partition("/")
        if folder in derived and inner in derived[folder].weights:
            continue  # the derived set's own line says why it is left out
        rule = rule_for(rel)
        out.append(SideFile(rel, LEAVE, rule.why if rule.action == LEAVE else "not downloaded by --stream"))
    return out


def _checked_copy(root: Path, rel: str, st: os.stat_result, counts: set[int]) -> SideFile:
    if rel.endswith(".json") and st.st_size <= 64 << 20:
        stale = stale_counts(root / rel, counts)
        if stale:
            return SideFile(
                rel,
                LEAVE,
                f"states the source's expert count ({stale[0]}), which the pruned config no longer has",
                st.st_mode,
            )
    return SideFile(rel, COPY, "", st.st_mode, st=st)


# Vocabularies map token strings to ids: a token spelled like a count key is not a count.
VOCAB_PATTERNS = ("tokenizer*.json", "*vocab*.json", "special_tokens_map.json", "added_tokens.json", "merges*.json")


def stale_counts(path: Path, counts: set[int]) -> list[str]:
    """`key=value` of every expert-count key in the JSON file `path` whose integer value is
    not one of `counts` (a file that is not a JSON object, or a vocabulary, has none)."""
    if any(fnmatch.fnmatchcase(path.name, p) for p in VOCAB_PATTERNS):
        return []
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return []
    keys = expert_count_keys()
    found = []

    def visit(node, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                at = f"{where}.{k}" if where else k
                if k in keys:
                    values = v if isinstance(v, list) else [v]
                    if any(isinstance(x, int) and not isinstance(x, bool) and x not in counts for x in values):
                        found.append(f"{at}={v}")
                visit(v, at)
        elif isinstance(node, list):
            for v in node:
                visit(v, where)

    visit(data, "")
    return found


# --- derived weight sets (gpt-oss `original/`) -------------------------------------------------


def _derived_problem(root: Path, d: DerivedSet, info, plan) -> str:
    """Why the derived set in `root` cannot be pruned consistently ('' when it can)."""
    try:
        derived_layout(root, d, info, plan)
    except ShardcutError as exc:
        return str(exc)
    return ""


def derived_layout(root: Path, d: DerivedSet, info, plan) -> tuple[dict[str, list[OutTensor]], dict, dict]:
    """The pruned derived set: {weight file: its output tensors}, their headers' metadata, and
    the folder's config with the expert count set to the kept count. Without a plan (checking
    only), every expert stays. Raises ShardcutError saying why the set does not fit."""

    folder = root / d.folder
    cfg_path = folder / d.config
    if not cfg_path.is_file():
        raise ShardcutError(f"{d.folder}/{d.config} is missing")
    config = read_json_object(cfg_path)
    count = config.get(d.count_key)
    if count != info.num_experts:
        raise ShardcutError(f"{d.folder}/{d.config} has {d.count_key}={count}, the model {info.num_experts}")
    keep = (
        {k: list(v) for k, v in plan.keep.items()}
        if plan is not None
        else {layer.key: list(range(layer.num_experts)) for layer in info.layers}
    )
    layer_re = re.compile(d.layer)
    seen_layers: set[str] = set()
    tensors: dict[str, list[OutTensor]] = {}
    metadata: dict = {}
    for wname in d.weights:
        path = folder / wname
        if not path.is_file():
            raise ShardcutError(
                f"{d.folder}/{wname} is not on disk (a streamed prune never downloads it: "
                "prune without streaming to keep it, pruned)"
            )
        header = read_header(path)
        metadata[wname] = header.metadata
        out = []
        for t in header.tensors.values():
            m = layer_re.match(t.name)
            suffix = t.name[m.end() :] if m else ""
            if m and suffix in d.expert_rows:
                key = m.group(1)
                if key not in keep:
                    raise ShardcutError(f"{t.name!r}: layer {key} is not a MoE layer of the main checkpoint")
                if not t.shape or t.shape[0] != count:
                    raise ShardcutError(f"{t.name!r} {list(t.shape)}: dim 0 is not {d.count_key}={count}")
                seen_layers.add(key)
                out.append(slice_expert_axis(path, t, 0, count, keep[key]))
            else:
                out.append(OutTensor(t.name, t.dtype, t.shape, [Piece(path, t.start, t.nbytes)]))
        tensors[wname] = out
    missing = set(keep) - seen_layers
    if missing:
        raise ShardcutError(f"holds no expert tensors for MoE layer {min(missing, key=str)}")
    kept = {len(v) for v in keep.values()}
    if len(kept) != 1:
        raise ShardcutError("the plan keeps different counts per layer; the folder's config holds one")
    new_config = dict(config)
    new_config[d.count_key] = kept.pop()
    return tensors, metadata, new_config


# --- writing --------------------------------------------------------------------------------


def write_side_files(dest: Path, ckpt: Checkpoint, info, plan, files: list[SideFile], quant_side: dict | None) -> None:
    """Write every side file that travels into `dest`: copies, rewrites and pruned derived sets;
    each keeps its source's permission bits, is fsynced, and so is each folder written to."""
    folders: set[Path] = set()
    done_sets: set[str] = set()
    for f in files:
        if f.action == LEAVE:
            continue
        target = dest / f.rel
        _make_parents(dest, ckpt.root, Path(f.rel).parent)
        folders.add(target.parent)
        if f.action == COPY:
            copy_file(ckpt.root / f.rel, target, expected=f.st)
        elif f.derived is not None:
            d = f.derived
            if d.folder in done_sets:
                continue
            done_sets.add(d.folder)
            tensors, metadata, config = derived_layout(ckpt.root, d, info, plan)
            for wname, out in tensors.items():
                src = ckpt.root / d.folder / wname
                path = dest / d.folder / wname
                write_shard(path, out, metadata[wname])
                set_mode(path, output_mode(os.stat(src).st_mode))
            cfg_src = ckpt.root / d.folder / d.config
            atomic_write_text(
                dest / d.folder / d.config,
                json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                output_mode(os.stat(cfg_src).st_mode),
            )
        elif f.rel == HF_QUANT_NAME and quant_side is not None:
            atomic_write_text(target, json.dumps(quant_side, indent=2, ensure_ascii=False) + "\n", output_mode(f.mode))
        else:
            copy_file(ckpt.root / f.rel, target, expected=f.st)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(folder)


def _make_parents(dest: Path, src_root: Path, rel_dir: Path) -> None:
    """Create `dest/rel_dir` folder by folder, each with its source folder's permission bits."""
    at = dest
    src = src_root
    for part in rel_dir.parts:
        at, src = at / part, src / part
        if not at.is_dir():
            at.mkdir()
            os.chmod(at, (os.stat(src).st_mode & 0o777) | 0o700)


def copy_file(src: Path, dest: Path, expected: os.stat_result | None = None) -> None:
    """Copy the regular file `src` to the new file `dest`, keeping its permission bits, fsynced.

    The source is resolved (inside MODEL, checked by `walk`), stat'ed and only then opened with
    O_NOFOLLOW | O_NONBLOCK, and the open file must be the regular file stat'ed: a FIFO or a
    symlink swapped in meanwhile is refused, never read or waited on.
    """
    real = Path(src).resolve()
    st = os.stat(real)
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError("not a regular file (a FIFO, socket or device): refusing it", src)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        raise CheckpointError(f"cannot open ({exc.strerror or exc})", src) from None
    try:
        now = os.fstat(fd)
        want = expected or st
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (want.st_dev, want.st_ino):
            raise CheckpointError("changed while being copied (replaced by another file): refusing it", src)
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.fchmod(out, output_mode(now.st_mode))
            while True:
                buf = os.read(fd, _COPY_CHUNK)
                if not buf:
                    break
                view = memoryview(buf)
                while view:
                    view = view[os.write(out, view) :]
            os.fsync(out)
        finally:
            os.close(out)
    finally:
        os.close(fd)


def set_mode(path: Path, mode: int) -> None:
    """chmod `path` and fsync it, so the permission bits are as durable as the data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def download_ignore_patterns() -> list[str]:
    """fnmatch patterns of repo files a `--stream` prune never needs locally: everything the
    table leaves out whatever the model (the README stays: its card metadata is recorded)."""
    keep_readme = {"README.md"}
    pats = [p for r in SIDE_RULES if r.action == LEAVE for p in r.patterns if p not in keep_readme]
    return [p for p in pats if not p.startswith("original/")]
