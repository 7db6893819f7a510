"""Embed corpora beyond one machine with Ray Data: one encoder per worker, Parquet out.

Each worker loads the encoder once (a stateful ``map_batches`` class) and embeds the blocks Ray hands it;
every input column is kept and an ``embedding`` column added. Locally this starts a Ray instance with
``workers`` CPU workers; with ``address`` (``ray://host:10001`` or ``auto``) the same code runs on a cluster.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

READERS = {".txt": "read_text", ".jsonl": "read_json", ".json": "read_json", ".parquet": "read_parquet"}


class EmbedBatch:
    """The per-worker state: an encoder loaded once, applied to each block of rows."""

    def __init__(self, model: str | None, text_column: str, batch_size: int, dtype: str | None, threads: int):
        import torch

        import lm2vec

        torch.set_num_threads(threads)
        self.encoder = lm2vec.load(model, dtype=dtype)
        self.text_column, self.batch_size = text_column, batch_size

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.text_column not in rows:
            raise KeyError(f"no column {self.text_column!r} in the input (columns: {sorted(rows)})")
        texts = [str(text) for text in rows[self.text_column]]
        vectors = self.encoder.encode(texts, batch_size=self.batch_size, show_progress_bar=False)
        return {**rows, "embedding": np.asarray(vectors, dtype=np.float32)}


def embed_corpus(
    inputs: str | os.PathLike | list[str | os.PathLike],
    output: str | os.PathLike,
    model: str | None = None,
    *,
    text_column: str = "text",
    workers: int = 2,
    threads_per_worker: int = 1,
    batch_size: int = 32,
    block_rows: int = 256,
    dtype: str | None = None,
    address: str | None = None,
) -> int:
    """Embed the rows of ``inputs`` (.txt: one text per line; .jsonl; .parquet) into Parquet files under ``output``.

    Returns the number of rows written (local ``output``). ``model`` must be loadable by every worker (a path
    they all see, or a hub id).
    """
    import ray

    paths = [str(p) for p in (inputs if isinstance(inputs, list) else [inputs])]
    suffixes = {Path(p).suffix for p in paths}
    if len(suffixes) != 1 or next(iter(suffixes)) not in READERS:
        raise ValueError(f"inputs must all be one of {', '.join(READERS)} files, got {paths}")
    for path in paths:
        if not Path(path).exists() and "://" not in path:
            raise FileNotFoundError(f"{path}: no such file")
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else workers * threads_per_worker, include_dashboard=False)
    reader = getattr(ray.data, READERS[next(iter(suffixes))])
    light = {"num_cpus": 0}  # reading and writing must not wait for CPUs the encoder workers hold
    dataset = reader(paths, **light)
    columns = dataset.columns()  # from the files' schema: a wrong column fails here, not in every worker after loading
    if text_column not in columns:
        named = paths[0] + (" ..." if len(paths) > 1 else "")
        raise ValueError(f"no column {text_column!r} in {named} (columns: {columns})")
    embedded = dataset.map_batches(
        EmbedBatch,
        fn_constructor_kwargs={
            "model": model,
            "text_column": text_column,
            "batch_size": batch_size,
            "dtype": dtype,
            "threads": threads_per_worker,
        },
        batch_size=block_rows,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=threads_per_worker,
    )
    embedded.write_parquet(str(output), ray_remote_args=light)
    return count_rows(output)


def count_rows(folder: str | os.PathLike) -> int:
    """Rows in the Parquet files of a local output folder (from their footers, without reading the data)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(path).metadata.num_rows for path in Path(folder).glob("*.parquet"))
