"""An on-disk embedding cache, so re-runs are instant and interrupted evaluations resume.

Embeddings are keyed by (model fingerprint, instruction, text) in one SQLite file per model. New texts are
encoded in chunks and each chunk is committed as soon as it is done: an interrupted run loses at most
one chunk.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..cache import cache_key
from ..encoder import Encoder
from .base import embed

VERSION = 2  # of what a text's embedding is, beyond the model (2: an instruction's tokens counted in each row)


class CachedEncoder:
    """Wraps an :class:`~lm2vec.Encoder`; ``encode`` returns cached rows and computes only the missing ones."""

    def __init__(self, encoder: Encoder, directory: str | os.PathLike, chunk_size: int = 256):
        self.encoder = encoder
        self.chunk_size = chunk_size
        self.path = Path(directory) / f"{encoder.fingerprint(VERSION)}.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.execute("CREATE TABLE IF NOT EXISTS embeddings (key TEXT PRIMARY KEY, vector BLOB NOT NULL)")
        self.db.commit()

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]

    def close(self) -> None:
        self.db.close()

    def _lookup(self, keys: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(keys), 500):
            part = keys[start : start + 500]
            rows = self.db.execute(
                f"SELECT key, vector FROM embeddings WHERE key IN ({','.join('?' * len(part))})", part
            )
            found.update((key, np.frombuffer(blob, dtype=np.float32)) for key, blob in rows)
        return found

    def encode(
        self,
        sentences: list[str],
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """Embeddings of ``sentences`` (raw, not normalized), shape (n, dim)."""
        keys = [cache_key(instruction or "", text) for text in sentences]
        found = self._lookup(list(dict.fromkeys(keys)))
        missing = list({key: text for key, text in zip(keys, sentences, strict=True) if key not in found}.items())
        with tqdm(
            total=len(missing), desc="Encoding", unit="text", disable=not missing or show_progress_bar is False
        ) as bar:
            for start in range(0, len(missing), self.chunk_size):
                chunk = missing[start : start + self.chunk_size]
                texts = [text for _, text in chunk]
                vectors = embed(self.encoder, texts, instruction, batch_size, False).astype(np.float32)
                with self.db:  # one transaction per chunk: committed, or not at all
                    self.db.executemany(
                        "INSERT OR REPLACE INTO embeddings VALUES (?, ?)",
                        [(key, vector.tobytes()) for (key, _), vector in zip(chunk, vectors, strict=True)],
                    )
                found.update((key, vector) for (key, _), vector in zip(chunk, vectors, strict=True))
                bar.update(len(chunk))
        if not keys:
            return np.empty((0, self.encoder.dim), dtype=np.float32)
        return np.stack([found[key] for key in keys])
