"""The embedding cache: identical vectors, no recomputation, and resumption after an interruption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lm2vec import PoolingMode
from lm2vec.evaluation.cache import CachedEncoder
from tests.support import random_texts, tiny_encoder

TEXTS = random_texts(40, seed=3)


class Counting:
    """A real encoder that counts the texts it is asked to embed, and can be made to fail mid-run."""

    def __init__(self, encoder, fail_after_calls: int | None = None):
        self.encoder, self.texts, self.calls, self.fail_after_calls = encoder, 0, 0, fail_after_calls
        self.dim = encoder.dim

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode(self, sentences, **kwargs):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt
        self.calls += 1
        self.texts += len(sentences)
        return self.encoder.encode(sentences, **kwargs)


def test_cached_vectors_equal_direct_ones_and_are_not_recomputed(tmp_path: Path):
    enc = tiny_encoder()
    counting = Counting(enc)
    cache = CachedEncoder(counting, tmp_path, chunk_size=8)
    first = cache.encode(TEXTS + TEXTS[:5], instruction="w5 ")  # duplicates embedded once
    assert counting.texts == len(set(TEXTS))
    np.testing.assert_allclose(first, enc.encode(TEXTS + TEXTS[:5], instruction="w5 "), atol=1e-6)
    again = CachedEncoder(counting, tmp_path, chunk_size=8).encode(TEXTS, instruction="w5 ")
    assert counting.texts == len(set(TEXTS))  # a new process (new connection) reads the file
    np.testing.assert_array_equal(again, first[: len(TEXTS)])
    cache.encode(TEXTS[:3])  # another instruction is another key
    assert counting.texts == len(set(TEXTS)) + 3
    assert cache.encode([]).shape == (0, enc.dim)


def test_interrupted_run_resumes_from_the_last_chunk(tmp_path: Path):
    enc = tiny_encoder()
    with pytest.raises(KeyboardInterrupt):
        CachedEncoder(Counting(enc, fail_after_calls=3), tmp_path, chunk_size=8).encode(TEXTS)
    resumed = Counting(enc)
    cache = CachedEncoder(resumed, tmp_path, chunk_size=8)
    assert len(cache) == 3 * 8
    out = cache.encode(TEXTS)
    assert resumed.texts == len(set(TEXTS)) - 3 * 8
    np.testing.assert_allclose(out, enc.encode(TEXTS), atol=1e-6)


def test_fingerprint_tracks_weights_and_settings():
    enc = tiny_encoder()
    base = enc.fingerprint()
    assert tiny_encoder().fingerprint() == base  # same seed, same weights
    enc.pooling = PoolingMode.WEIGHTED_MEAN
    assert enc.fingerprint() != base
    other = tiny_encoder()
    with torch.no_grad():
        next(other.model.parameters()).add_(1e-3)
    assert other.fingerprint() != base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_fingerprint_sums_weights_in_parts_as_a_whole(dtype):
    """Summed a part at a time (no float64 copy of a whole matrix), a weight gives the whole tensor's sum and norm."""
    from lm2vec.encoder import _sum_and_norm

    weight = (torch.randn(301, 17, generator=torch.Generator().manual_seed(0)) * 50).to(dtype)
    whole = weight.double()
    total, norm = _sum_and_norm(weight, part=64)
    assert total == pytest.approx(whole.sum().item(), rel=1e-12, abs=1e-9)
    assert norm == pytest.approx(whole.norm().item(), rel=1e-12)
