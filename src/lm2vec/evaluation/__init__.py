"""Evaluation with MTEB's metrics on local datasets (``lm2vec.datafiles.data_dir()``) or through ``mteb``.

``run_tasks`` runs registered tasks through the embedding cache; each ``evaluate_*`` function scores one task
type; ``mteb_adapter.MTEBEncoder`` plugs an encoder into the real ``mteb`` package (imported only there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_attributes

if TYPE_CHECKING:
    from .base import Instructions, TaskResult, TextEncoder
    from .cache import CachedEncoder
    from .classification import evaluate_classification
    from .clustering import evaluate_clustering
    from .pair_classification import evaluate_pair_classification
    from .report import load_results, write_report
    from .reranking import evaluate_reranking
    from .retrieval import evaluate_retrieval
    from .sts import STSPairs, correlations, cosine_rows, evaluate_sts, load_sts, sts_by_dimension
    from .tasks import DEFAULT_TASKS, TASKS, load_instructions, run_tasks
    from .word_probing import evaluate_word_probing

# Imported on first use: a task type's dependencies (scikit-learn, ...) load with it, not with `lm2vec.evaluation.sts`.
__getattr__ = lazy_attributes(
    __name__,
    {
        "Instructions": "base",
        "TaskResult": "base",
        "TextEncoder": "base",
        "CachedEncoder": "cache",
        "evaluate_classification": "classification",
        "evaluate_clustering": "clustering",
        "evaluate_pair_classification": "pair_classification",
        "load_results": "report",
        "write_report": "report",
        "evaluate_reranking": "reranking",
        "evaluate_retrieval": "retrieval",
        "STSPairs": "sts",
        "correlations": "sts",
        "cosine_rows": "sts",
        "evaluate_sts": "sts",
        "load_sts": "sts",
        "sts_by_dimension": "sts",
        "DEFAULT_TASKS": "tasks",
        "TASKS": "tasks",
        "load_instructions": "tasks",
        "run_tasks": "tasks",
        "evaluate_word_probing": "word_probing",
    },
)

__all__ = [
    "DEFAULT_TASKS",
    "TASKS",
    "CachedEncoder",
    "Instructions",
    "STSPairs",
    "TaskResult",
    "TextEncoder",
    "correlations",
    "cosine_rows",
    "evaluate_classification",
    "evaluate_clustering",
    "evaluate_pair_classification",
    "evaluate_reranking",
    "evaluate_retrieval",
    "evaluate_sts",
    "evaluate_word_probing",
    "load_instructions",
    "load_results",
    "load_sts",
    "run_tasks",
    "sts_by_dimension",
    "write_report",
]
