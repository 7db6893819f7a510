"""Shared fixtures: a saved tiny encoder directory and the real built-in SmolLM2 (loaded once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import lm2vec
from tests.support import tiny_encoder

# The suite's conversions, calibrations and kernel probes go to the checkout's ignored .cache/ (kept between runs),
# not to the user's ~/.cache/lm2vec; the CLI and server processes the tests start inherit it.
os.environ.setdefault("LM2VEC_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "tests"))


@pytest.fixture(scope="session")
def smollm2() -> lm2vec.Encoder:
    """The built-in model, fp32, bidirectional, mean pooling (loaded once per test session)."""
    return lm2vec.load(dtype="float32")


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A saved tiny encoder directory (sentence-transformers layout)."""
    return tiny_encoder().save(tmp_path / "tiny")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the real SmolLM2 is marked ``slow``: ``pytest -m "not slow"`` runs the rest in minutes."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
