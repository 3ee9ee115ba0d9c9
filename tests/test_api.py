"""The public API is what the README says: its snippet runs verbatim, and every exported name
is the function or class it names, before and after every submodule is imported."""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

from shardcut.ops.synthetic import SyntheticSpec, write_synthetic_checkpoint
from shardcut.plans.plan import Plan

ROOT = Path(__file__).resolve().parents[1]


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    snippet = next(b for b in blocks if "import shardcut" in b and "shardcut.prune(" in b)
    return snippet


def test_readme_snippet_runs_verbatim(tmp_path):
    snippet = readme_snippet()
    model = re.search(r'inspect_model\("([^"]+)"\)', snippet).group(1)
    write_synthetic_checkpoint(tmp_path / model, SyntheticSpec(layers=3, experts=8, top_k=2))
    keep = {str(layer): [0, 2, 4, 6] for layer in (1, 2)}
    Plan(keep).save(tmp_path / "plan.json")
    run = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / f"{model}-pruned" / "model.safetensors.index.json").is_file()


_CHECK = """
import importlib, pkgutil, shardcut
def check(when):
    for name in shardcut.__all__:
        value = getattr(shardcut, name)
        if name == "__version__":
            assert isinstance(value, str)
            continue
        assert callable(value) and not isinstance(value, type(shardcut)), (when, name, value)
check("fresh")
for m in pkgutil.walk_packages(shardcut.__path__, "shardcut."):
    importlib.import_module(m.name)
check("after every submodule")
import shardcut as again
check("re-imported")
print("ok")
"""


def test_exports_are_callables_before_and_after_submodule_imports():
    run = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_no_export_is_also_a_submodule_name():
    import shardcut

    submodules = {m.name.rsplit(".", 1)[-1] for m in pkgutil.iter_modules(shardcut.__path__)}
    assert not submodules & set(shardcut.__all__)
    assert (Path(shardcut.__file__).parent / "py.typed").is_file()
