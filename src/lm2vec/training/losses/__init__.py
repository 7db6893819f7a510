"""Contrastive losses, one a module (as in sentence-transformers): what each computes, its inputs, its source."""

from .cached_info_nce import cached_info_nce
from .info_nce import gather_with_grad, info_nce, similarities, world
from .matryoshka import matryoshka

__all__ = ["cached_info_nce", "gather_with_grad", "info_nce", "matryoshka", "similarities", "world"]
