"""The library's modules form layers, each importing only its own layer and those below, and no
import cycle exists (function-level imports count: a cycle hidden inside a function is still a
cycle). The folders of shardcut/ are the layers, lowest first; a new module goes in one of them.

    format   safetensors containers, checkpoints (local and Hub), durable writes, errors
    moe      the architecture table and what it says about a checkpoint: roles, counts, parameters
    plans    the plan and score formats, criteria and selection, score importers
    rewrite  the writer: layout, side files, the crash-safe output folder, --stream
    ops      what users call (inspect, plan, prune's helpers, verify, push, calibrate, eval, demo)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "shardcut"

# The folders of shardcut/, lowest first; `shardcut/__init__.py` (the public API) sits above all.
LAYERS = ("format", "moe", "plans", "rewrite", "ops", "shardcut")
RANK = {name: i for i, name in enumerate(LAYERS)}


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target not in (name, "shardcut"):
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def layer_of(module: str) -> str:
    """`shardcut.moe.model` is in layer `moe`; `shardcut` itself is the public API above them all."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_module_has_a_layer():
    missing = sorted(m for m in graph() if layer_of(m) not in RANK)
    assert not missing, f"put these modules in one of the layer folders {LAYERS[:-1]}: {missing}"


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{m} ({layer_of(m)}: layer {RANK[layer_of(m)]}) imports {t} (layer {RANK[layer_of(t)]})"
        for m, targets in graph().items()
        for t in targets
        if layer_of(m) in RANK and layer_of(t) in RANK and RANK[layer_of(t)] > RANK[layer_of(m)]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    g = graph()
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(g[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)
