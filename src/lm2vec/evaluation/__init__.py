"""Evaluation on the local datasets (``lm2vec.data.data_dir()``), with MTEB's metrics."""

from .sts import STSPairs, STSResult, correlations, cosine_rows, evaluate_sts, load_sts

__all__ = ["STSPairs", "STSResult", "correlations", "cosine_rows", "evaluate_sts", "load_sts"]
