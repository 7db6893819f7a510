"""What the tasks share: embedding each distinct text once, seeded samples, one data-file error."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lm2vec.evaluation.base import embed_unique, sample_indices
from lm2vec.evaluation.classification import load_classification
from lm2vec.evaluation.clustering import load_clustering
from lm2vec.evaluation.pair_classification import load_pair_classification
from lm2vec.evaluation.reranking import load_reranking
from lm2vec.evaluation.retrieval import load_retrieval
from lm2vec.evaluation.sts import load_sts
from lm2vec.evaluation.word_probing import evaluate_word_probing
from tests.support import TableEncoder, tiny_encoder


def test_embed_unique_embeds_each_distinct_text_once_in_first_seen_order():
    table = {text: np.array([i, -i], dtype=np.float32) for i, text in enumerate(["a", "b", "c"])}
    encoder = TableEncoder(table)
    texts = ["b", "a", "b", "c", "a"]
    rows = embed_unique(encoder, texts, "instr", batch_size=4, show_progress_bar=False)
    assert encoder.calls == [(["b", "a", "c"], "instr")]  # one call, duplicates dropped, order kept
    np.testing.assert_array_equal(rows, np.array([table[t] for t in texts]))
    assert embed_unique(TableEncoder(table), [], None).shape[0] == 0


def test_sample_indices_is_seeded_sorted_and_uncapped_by_default():
    assert sample_indices(5, None, seed=1).tolist() == [0, 1, 2, 3, 4]
    assert sample_indices(5, 9, seed=1).tolist() == [0, 1, 2, 3, 4]
    drawn = sample_indices(100, 10, seed=3)
    expected = np.sort(np.random.default_rng(3).choice(100, size=10, replace=False))
    assert drawn.tolist() == expected.tolist() and len(set(drawn)) == 10
    with pytest.raises(ValueError, match="must be positive"):
        sample_indices(5, 0, seed=1)


@pytest.mark.parametrize(
    ("load", "missing"),
    [
        (lambda root: load_sts("stsb", "dev", root), "sts/stsb/dev.jsonl"),
        (lambda root: load_classification("toy", root), "classification/toy/train.jsonl"),
        (lambda root: load_clustering("toy", root), "clustering/toy/test.jsonl"),
        (lambda root: load_pair_classification("toy", root), "pair_classification/toy/test.jsonl"),
        (lambda root: load_reranking("toy", "test", root), "reranking/toy/test.jsonl"),
        (lambda root: load_retrieval("toy", "test", root), "retrieval/toy/corpus.jsonl"),
        (lambda root: evaluate_word_probing(tiny_encoder(), root), "word/conll2003/train.conll"),
    ],
)
def test_every_loader_says_how_to_point_at_the_data(tmp_path, load, missing):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / missing)) + ".*LM2VEC_DATA"):
        load(tmp_path)
