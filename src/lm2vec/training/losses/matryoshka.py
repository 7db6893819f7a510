"""Matryoshka: a contrastive loss summed over leading slices of the embeddings, so that truncated vectors keep
their quality (``encode(..., truncate_dim=64)``).

Computes: ``sum(loss(queries[:, :d], candidates[:, :d]) for d in dims)`` with equal weights, as
sentence-transformers' ``MatryoshkaLoss`` does by default; the loss's cosine renormalizes each slice.

Inputs: ``loss``, any function of ``(queries, candidates, *args)`` such as
:func:`~lm2vec.training.losses.info_nce.info_nce` (also inside GradCache's
:func:`~lm2vec.training.losses.cached_info_nce.cached_info_nce`, which takes the loss to cache); ``dims``, the
slice widths, each at most the embedding size (include the full size to keep training it).

Reference: Kusupati et al. 2022, "Matryoshka Representation Learning"; sentence-transformers' MatryoshkaLoss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Loss = Callable[..., torch.Tensor]


def matryoshka(loss: Loss, dims: Sequence[int] | None) -> Loss:
    """``loss`` summed over the leading ``dims`` columns of both sides (``loss`` itself for None)."""
    if dims is None:
        return loss
    if not dims or any(not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"matryoshka dims must be positive integers, got {dims!r}")

    def summed(queries: torch.Tensor, candidates: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if max(dims) > queries.shape[-1]:
            raise ValueError(f"matryoshka dims {list(dims)} exceed the embedding size {queries.shape[-1]}")
        losses = [loss(queries[:, :d], candidates[:, :d], *args, **kwargs) for d in dims]
        return torch.stack(losses).sum()

    return summed
