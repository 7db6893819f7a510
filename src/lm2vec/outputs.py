"""What ``encode`` and the server hand back: Matryoshka truncation and compact precisions.

Semantics follow sentence-transformers: ``truncate_dim`` keeps the first dimensions (then, with
normalization, re-normalizes the shorter vector); ``precision`` quantizes with its ``quantize_embeddings``
(int8/uint8 ranges from the embeddings themselves unless ``ranges`` are given; binary packs sign bits
into bytes, 8 dimensions each).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Precision = Literal["float32", "int8", "uint8", "binary", "ubinary"]
PRECISIONS: tuple[str, ...] = ("float32", "int8", "uint8", "binary", "ubinary")


def check_output_options(dim: int, truncate_dim: int | None, precision: str) -> None:
    """Fail before any model work on options that cannot apply."""
    if truncate_dim is not None and (
        isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int) or not 1 <= truncate_dim <= dim
    ):
        raise ValueError(f"truncate_dim must be an integer from 1 to the model's dimension {dim}, got {truncate_dim!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")


def postprocess(
    embeddings: torch.Tensor,
    truncate_dim: int | None = None,
    normalize: bool = False,
    precision: Precision = "float32",
    ranges: np.ndarray | None = None,
) -> torch.Tensor | np.ndarray:
    """Truncate, normalize, quantize: float32 stays a tensor, other precisions come back as numpy arrays."""
    if truncate_dim is not None:
        embeddings = embeddings[..., :truncate_dim]
    if normalize:
        embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
    if precision == "float32":
        return embeddings
    if precision in ("int8", "uint8") and ranges is None and embeddings.shape[0] < 2:
        raise ValueError(f"{precision} needs ranges (shape (2, dim)) or at least two embeddings to take them from")
    from sentence_transformers.util.quantization import quantize_embeddings  # imported when used: ~250 MB

    return np.asarray(quantize_embeddings(embeddings.numpy(), precision, ranges=ranges))
