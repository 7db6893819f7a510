"""InfoNCE: each query's positive against in-batch, hard and (under DDP) other devices' negatives.

Computes: the cross-entropy of each query's positive among all candidates, on scaled cosine similarities
(scale = 1 / temperature); the loss of SimCSE and of supervised LLM2Vec.

Inputs: ``queries`` (n, dim); ``candidates`` (m, dim), m >= n: row i is query i's positive, rows past n are
hard negatives. With ``gather_across_devices`` under DDP every rank's candidates are scored, and gradients
flow back through the all-gather to the rank that computed each row.

Reference: van den Oord et al. 2018 (CPC); Gao et al. 2021 (SimCSE); BehnamGhader et al. 2024 (LLM2Vec);
sentence-transformers' MultipleNegativesRankingLoss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside ``torchrun`` / ``accelerate launch``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, concatenated in rank order; gradients flow back to the rank that made each row."""
    _, size = world()
    if size == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()))


def similarities(
    queries: torch.Tensor, candidates: torch.Tensor, scale: float, gather_across_devices: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled cosine similarities of this rank's queries with every candidate, and the positives' columns.

    ``candidates`` holds this rank's positives first (row i is query i's), then any hard negatives. With
    ``gather_across_devices`` under DDP the candidates of all ranks are scored: more negatives for free.
    """
    rank, size = world()
    if gather_across_devices and size > 1:
        candidates, offset = gather_with_grad(candidates), rank * candidates.shape[0]
    else:
        offset = 0
    scores = F.normalize(queries.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T * scale
    return scores, torch.arange(queries.shape[0], device=queries.device) + offset


def info_nce(
    queries: torch.Tensor, candidates: torch.Tensor, scale: float, gather_across_devices: bool = True
) -> torch.Tensor:
    """Cross-entropy of each query's positive against all candidates (SimCSE, supervised LLM2Vec)."""
    scores, labels = similarities(queries, candidates, scale, gather_across_devices)
    return F.cross_entropy(scores, labels)
