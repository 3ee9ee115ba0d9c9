"""Shared fixtures: every family's tiny checkpoint, built and pruned once per test session."""

from __future__ import annotations

import pytest
from fixtures.families import LOGIT_DIFFS, Built, family, prepare


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """`families(name)` -> Built: the family's source checkpoint, its pruned copy, the original model."""
    pytest.importorskip("transformers")
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            cache[name] = prepare(family(name), tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def pytest_terminal_summary(terminalreporter) -> None:
    if LOGIT_DIFFS:
        name = max(LOGIT_DIFFS, key=LOGIT_DIFFS.get)
        terminalreporter.write_line(
            f"shardcut oracle: largest |pruned - masked original| logit difference over "
            f"{len(LOGIT_DIFFS)} families: {LOGIT_DIFFS[name]:.3e} ({name})"
        )
