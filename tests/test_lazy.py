"""Light package imports: names and submodules load on first use, as an eager package would give them."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lm2vec


def test_the_package_imports_without_torch_and_gives_its_names_and_submodules_on_first_use():
    code = """
import sys, lm2vec
light = 'torch' not in sys.modules
names = lm2vec.Encoder, lm2vec.loading.resolve_source, lm2vec.evaluation.cosine_rows
print(light, *(name.__module__ for name in names))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "lm2vec.encoder", "lm2vec.loading.source", "lm2vec.evaluation.sts"]


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'lm2vec' has no attribute 'encodr'"):
        lm2vec.encodr  # noqa: B018
    assert not hasattr(lm2vec.training, "_private")
