"""Evaluation with MTEB's metrics on local datasets (``lm2vec.data.data_dir()``) or through ``mteb``."""

from .base import Instructions, TaskResult, TextEncoder
from .sts import STSPairs, correlations, cosine_rows, evaluate_sts, load_sts

__all__ = [
    "Instructions",
    "STSPairs",
    "TaskResult",
    "TextEncoder",
    "correlations",
    "cosine_rows",
    "evaluate_sts",
    "load_sts",
]
