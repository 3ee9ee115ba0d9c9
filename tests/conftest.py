"""Shared fixtures: every family's tiny checkpoint, and every quantization scheme's, built and
pruned once per test session."""

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


@pytest.fixture(scope="session")
def quantized(tmp_path_factory):
    """`quantized(scheme)` -> QuantBuilt: a family's float checkpoint, its quantized source in the
    scheme's real format, the pruned copy and the float model it was quantized from."""
    pytest.importorskip("transformers")
    from fixtures.quant_fixtures import build_quantized, scheme

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_quantized(scheme(name), tmp_path_factory.mktemp(f"q-{name}"))
        return cache[name]

    return get


def pytest_terminal_summary(terminalreporter) -> None:
    if LOGIT_DIFFS:
        name = max(LOGIT_DIFFS, key=LOGIT_DIFFS.get)
        terminalreporter.write_line(
            f"shardcut oracle: largest |pruned - masked original| logit difference over "
            f"{len(LOGIT_DIFFS)} families and schemes: {LOGIT_DIFFS[name]:.3e} ({name})"
        )
