"""embed-corpus on a real local Ray instance (2 CPU workers) over shared-data text: nothing lost, nothing doubled."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import lm2vec
from lm2vec.datafiles import data_dir
from tests.support import needs_data

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@needs_data("corpus/wiki1m_10k.txt")
def test_rows_equal_encode_and_none_lost_or_doubled(local_ray, tiny_dir: Path, tmp_path: Path):
    from lm2vec.corpus import embed_corpus

    lines = (data_dir() / "corpus" / "wiki1m_10k.txt").read_text().splitlines()[:300]
    lines = [line for line in lines if line.strip()] + lines[:5]  # five texts twice: duplicates must stay twice
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    # float32: bit-identical in any batch, so Ray's blocks must reproduce encode() exactly
    written = embed_corpus(corpus, tmp_path / "out", str(tiny_dir), workers=2, block_rows=64, dtype="float32")
    table = pq.read_table(tmp_path / "out").to_pydict()
    assert written == len(lines) == len(table["text"])
    assert Counter(table["text"]) == Counter(lines)
    expected = lm2vec.load(tiny_dir, dtype="float32").encode(table["text"])
    np.testing.assert_array_equal(np.array(table["embedding"], dtype=np.float32), expected)


def test_a_missing_text_column_is_named_before_any_worker_loads(local_ray, tmp_path: Path):
    from lm2vec.corpus import embed_corpus

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"title": "w4", "body": "w5 w6"}\n')
    with pytest.raises(ValueError, match=r"no column 'text' in .*rows.jsonl \(columns: \['title', 'body'\]\)"):
        embed_corpus(rows, tmp_path / "out", str(tmp_path / "no-model"))  # a worker would fail to load it
    assert not (tmp_path / "out").exists()


def test_bad_inputs(tmp_path: Path):
    from lm2vec.corpus import embed_corpus

    with pytest.raises(ValueError, match="must all be one of"):
        embed_corpus(tmp_path / "x.csv", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        embed_corpus(tmp_path / "missing.txt", tmp_path / "out")
