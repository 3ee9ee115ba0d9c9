"""The lock (requirements.txt) pins every package the project asks for, the build backend and pip
included, so a fresh machine installs what CI tested rather than whatever was released last."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    """PEP 503 normalised distribution name of a requirement string."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"not an exact pin: {line!r}"
            pins[_name(name)] = version.strip()
    return pins


def test_every_requirement_of_the_project_is_pinned_exactly():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    asked = [*project["build-system"]["requires"], *project["project"]["dependencies"]]
    for extra in project["project"]["optional-dependencies"].values():
        asked += [r for r in extra if not r.startswith("shardcut")]
    missing = sorted({_name(r) for r in asked} - set(_pins()))
    assert missing == [], f"add them to requirements.txt (scripts/lock.sh): {missing}"


def test_setup_installs_pip_setuptools_and_torch_from_the_lock():
    pins = _pins()
    assert {"pip", "setuptools", "torch"} <= set(pins)
    assert pins["torch"] == "2.13.0"  # the on-disk CPU build; a plain `torch` would pull a CUDA build
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "--no-build-isolation" in setup  # otherwise the build backend is the newest setuptools
    installs = [line for line in setup.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert len(installs) == 3  # pip and setuptools, the lock, shardcut: each bound to the lock
    assert "-c requirements.txt pip setuptools" in installs[0]
    assert installs[1].rstrip().endswith("-r requirements.txt")  # every package at its locked version
    assert "--no-deps" in installs[2]  # shardcut itself resolves nothing beyond the lock
    assert "--upgrade" not in setup and "LOCK" not in setup  # no path that takes the newest releases


def test_the_build_backend_is_the_locked_one_even_in_an_isolated_build():
    """`pip install .` without setup.sh builds in an isolated environment from build-system.requires:
    that must name the lock's setuptools exactly, not "the newest"."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["build-system"]["requires"] == [f"setuptools=={_pins()['setuptools']}"]
