"""Similarity functions by sentence-transformers' names, the ``similarity_fn_name`` a saved model declares.

A model trained to be compared by dot product (or distance) ranks by that, not by cosine; :meth:`lm2vec.Encoder.
similarity` and the MTEB adapter score with the function the encoder was saved with ("cosine" where none is named).
The distances come negated, as in sentence-transformers: higher is more similar for every function.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

Array = np.ndarray | torch.Tensor


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def _pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


# name -> (every row of a with every row of b, each row of a with the same row of b)
FUNCTIONS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...]] = {
    "cosine": (_cosine, _pairwise_cosine),
    "dot": (lambda a, b: a @ b.T, lambda a, b: (a * b).sum(-1)),
    "euclidean": (lambda a, b: -torch.cdist(a, b, p=2.0), lambda a, b: -(a - b).norm(dim=-1)),
    "manhattan": (lambda a, b: -torch.cdist(a, b, p=1.0), lambda a, b: -(a - b).abs().sum(-1)),
}


def check_similarity(name: object) -> str:
    """``name`` if it is one of :data:`FUNCTIONS`, else a ValueError naming them."""
    if name not in FUNCTIONS:
        raise ValueError(f"similarity_fn_name must be one of {', '.join(FUNCTIONS)}, got {name!r}")
    return str(name)


def similarity(a: Array, b: Array, name: str = "cosine") -> torch.Tensor:
    """(rows of ``a``, rows of ``b``) float32 scores; a single vector is one row."""
    return FUNCTIONS[check_similarity(name)][0](*_rows(a, b))


def similarity_pairwise(a: Array, b: Array, name: str = "cosine") -> torch.Tensor:
    """Scores of each row of ``a`` with the same row of ``b``."""
    x, y = _rows(a, b)
    if x.shape != y.shape:
        raise ValueError(f"pairwise similarity needs rows of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return FUNCTIONS[check_similarity(name)][1](x, y)


def _rows(a: Array, b: Array) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.atleast_2d(torch.as_tensor(a)).float(), torch.atleast_2d(torch.as_tensor(b)).float()
