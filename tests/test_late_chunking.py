"""Late chunking: chunk vectors pooled from the whole document's token states (tiny random models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.support import WORDS, tiny_encoder


def words(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n))


def spans_of(document: str, sizes: list[int]) -> list[tuple[int, int]]:
    """Character spans of consecutive runs of ``sizes`` words."""
    tokens = document.split(" ")
    starts = np.cumsum([0] + [len(t) + 1 for t in tokens])
    bounds = np.cumsum([0, *sizes])
    return [(int(starts[a]), int(starts[b] - 1)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@pytest.mark.parametrize("bos", [False, True])
def test_one_chunk_equals_plain_pooling(bos: bool):
    encoder = tiny_encoder(bos=bos)
    document = words(20, seed=0)
    (chunks,) = encoder.late_chunks([document], spans=[[(0, len(document))]])
    assert chunks.spans == [(0, len(document))]
    np.testing.assert_allclose(chunks.embeddings[0], encoder.encode(document), atol=1e-5)
    (by_tokens,) = encoder.late_chunks([document], chunk_tokens=100)
    np.testing.assert_allclose(by_tokens.embeddings, chunks.embeddings, atol=1e-6)


@pytest.mark.parametrize("bos", [False, True])
def test_instructions_are_taken_as_encode_takes_them(bos: bool):
    """The default prompt, a named one or an explicit instruction precedes the document, unpooled, as in encode()."""
    encoder = tiny_encoder(bos=bos, prompts={"document": "w5 w6 w7 "}, default_prompt_name="document")
    document = words(20, seed=4)
    whole = [[(0, len(document))]]
    (default,) = encoder.late_chunks([document], spans=whole)
    np.testing.assert_allclose(default.embeddings[0], encoder.encode(document), atol=1e-5)
    (plain,) = encoder.late_chunks([document], spans=whole, prompt="")
    np.testing.assert_allclose(plain.embeddings[0], encoder.encode(document, prompt=""), atol=1e-5)
    assert not np.allclose(plain.embeddings[0], default.embeddings[0], atol=1e-4)  # the instruction counts
    (other,) = encoder.late_chunks([document], spans=whole, instruction="w9 ")
    np.testing.assert_allclose(other.embeddings[0], encoder.encode(document, instruction="w9 "), atol=1e-5)
    (runs,) = encoder.late_chunks([document], chunk_tokens=5)
    assert runs.spans == encoder.late_chunks([document], chunk_tokens=5, prompt="")[0].spans  # document offsets
    assert runs.spans[0][0] == 0 and runs.spans[-1][1] == len(document)


def test_long_documents_repeat_the_instruction_in_every_window():
    encoder = tiny_encoder(bos=True, prompts={"query": "w5 w6 "})  # BOS + 2 instruction tokens open each window
    document = words(150, seed=5)
    (chunks,) = encoder.late_chunks([document], chunk_tokens=30, overlap=16, prompt_name="query")
    head = " ".join(document.split()[:61])  # BOS + instruction + 61 words = max_length (64)
    (alone,) = encoder.late_chunks([head], spans=[[chunks.spans[0]]], prompt_name="query")
    np.testing.assert_allclose(chunks.embeddings[0], alone.embeddings[0], atol=1e-5)
    (plain,) = encoder.late_chunks([document], chunk_tokens=30, overlap=16)
    assert plain.spans == chunks.spans  # in the document's characters either way
    assert not np.allclose(plain.embeddings[-1], chunks.embeddings[-1], atol=1e-4)  # the last window has it too
    long_instruction = " ".join(["w7"] * 50)  # leaves 13 tokens a window: an overlap of 16 cannot fit
    with pytest.raises(ValueError, match="overlap=16 must be smaller"):
        encoder.late_chunks([document], chunk_tokens=30, overlap=16, instruction=long_instruction)


def test_a_chunk_depends_on_the_text_outside_it():
    """Bidirectional: changing the second chunk moves the first; a causal model's first chunk stays put."""
    first, second, other = words(8, 1), words(8, 2), words(8, 3)
    for bidirectional, moves in ((True, True), (False, False)):
        encoder = tiny_encoder(bidirectional=bidirectional)
        a, b = (f"{first} {tail}" for tail in (second, other))
        spans = [spans_of(a, [8, 8]), spans_of(b, [8, 8])]
        one, two = encoder.late_chunks([a, b], spans=spans)
        moved = not np.allclose(one.embeddings[0], two.embeddings[0], atol=1e-6)
        assert moved is moves, bidirectional
        alone = encoder.encode(first)
        assert np.allclose(one.embeddings[0], alone, atol=1e-5) is not bidirectional  # context changes it


def test_chunk_tokens_cover_the_document_in_order():
    encoder = tiny_encoder()
    document = words(25, seed=4)
    (chunks,) = encoder.late_chunks([document], chunk_tokens=10, normalize_embeddings=True)
    assert len(chunks.spans) == 3 and chunks.embeddings.shape == (3, encoder.dim)
    assert chunks.spans[0][0] == 0 and chunks.spans[-1][1] == len(document)
    assert [document[a:b] for a, b in chunks.spans] == [" ".join(document.split()[i : i + 10]) for i in (0, 10, 20)]
    np.testing.assert_allclose(np.linalg.norm(chunks.embeddings, axis=1), 1.0, atol=1e-5)


def test_long_documents_run_in_overlapping_windows():
    """Beyond max_length (64 tokens): windows; a token's state comes from a window where it has context."""
    encoder = tiny_encoder(bos=True)
    document = words(150, seed=5)
    (chunks,) = encoder.late_chunks([document], chunk_tokens=30, overlap=16)
    assert chunks.embeddings.shape == (5, encoder.dim) and np.isfinite(chunks.embeddings).all()
    # A chunk inside the first window only: its vector equals late chunking of the first window's text alone.
    head = " ".join(document.split()[:63])  # BOS + 63 words = max_length
    (alone,) = encoder.late_chunks([head], spans=[[chunks.spans[0]]])
    (windowed,) = encoder.late_chunks([document], spans=[[chunks.spans[0]]], overlap=16)
    np.testing.assert_allclose(windowed.embeddings, alone.embeddings, atol=1e-5)
    # The last chunk sits in the last window: its text before the window is beyond its reach.
    far_change = " ".join(["w5"] * 10 + document.split()[10:])
    shift = len(far_change) - len(document)
    last = (chunks.spans[-1][0] + shift, chunks.spans[-1][1] + shift)
    (changed,) = encoder.late_chunks([far_change], spans=[[last]], overlap=16)
    np.testing.assert_allclose(changed.embeddings[0], chunks.embeddings[-1], atol=1e-5)


def test_bad_chunks_get_clear_errors():
    encoder = tiny_encoder()
    document = words(10, seed=6)
    with pytest.raises(ValueError, match="not within the text"):
        encoder.late_chunks([document], spans=[[(0, len(document) + 5)]])
    with pytest.raises(ValueError, match="not within the text"):
        encoder.late_chunks([document], spans=[[(4, 2)]])
    with pytest.raises(ValueError, match="covers no token"):
        encoder.late_chunks(["w4  w5"], spans=[[(2, 3)]])
    with pytest.raises(ValueError, match="either spans"):
        encoder.late_chunks([document])
    with pytest.raises(ValueError, match="2 entries for 1 documents"):
        encoder.late_chunks([document], spans=[[(0, 2)], [(0, 2)]])
    with pytest.raises(ValueError, match="overlap"):
        encoder.late_chunks([document], chunk_tokens=4, overlap=40)
    with pytest.raises(TypeError, match="document 0 is int"):
        encoder.late_chunks([3], chunk_tokens=4)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="document 1 is not valid Unicode"):
        encoder.late_chunks([document, "w4 \udcff"], chunk_tokens=4)


def test_late_chunks_keep_float32_states():
    encoder = tiny_encoder()
    (chunks,) = encoder.late_chunks([words(12, 7)], chunk_tokens=6)
    assert chunks.embeddings.dtype == np.float32 and torch.get_default_dtype() == torch.float32
