"""The names users choose from: pooling modes and precisions.

Light on purpose (no torch, no transformers): the CLI offers them in its arguments and its help before anything
heavy is imported. What each name does lives in :mod:`lm2vec.pooling` and :mod:`lm2vec.loading.dtype`.
"""

from __future__ import annotations

from enum import StrEnum


class PoolingMode(StrEnum):
    MEAN = "mean"
    WEIGHTED_MEAN = "weighted_mean"
    LAST_TOKEN = "last_token"
    FIRST_TOKEN = "first_token"


def parse_pooling(mode: str | PoolingMode) -> PoolingMode:
    try:
        return PoolingMode(mode)
    except ValueError:
        known = ", ".join(m.value for m in PoolingMode)
        raise ValueError(f"unknown pooling mode {mode!r}; choose one of: {known}") from None


# What ``load(dtype=...)`` takes besides torch dtypes and their short names (:mod:`lm2vec.loading.dtype`).
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "int8", "float16")
DEFAULT_DTYPE = "auto"
