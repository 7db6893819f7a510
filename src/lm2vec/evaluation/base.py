"""What every evaluation task shares: the encoder it calls, its instructions, its samples and its result.

The ``evaluate_*`` functions take the same options under the same names: ``data`` (the data directory, default
:func:`lm2vec.datafiles.data_dir`), ``instructions``, ``batch_size``, ``seed`` and ``show_progress_bar``.
``max_samples`` caps, for CPU budgets, the items a task is scored on with a seeded sample: classification's test
texts, pair classification's pairs and word probing's test sentences (:func:`sample_indices`), clustering's documents
(drawn as MTEB draws them), retrieval's corpus (the judged documents plus random others). STS keeps the first N pairs
instead, as training's dev scoring takes them. A second population has a cap of its own: retrieval's ``max_queries``,
word probing's ``max_train_samples``. None (the default) scores everything, as MTEB does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch


class TextEncoder(Protocol):
    """An :class:`lm2vec.Encoder`, the embedding cache in front of one, or a test double.

    A tensor is allowed back because :meth:`lm2vec.Encoder.encode` can return one; :func:`embed` makes it numpy.
    """

    def encode(
        self,
        sentences: list[str],
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray | torch.Tensor: ...


def embed(
    encoder: TextEncoder,
    texts: list[str],
    instruction: str | None,
    batch_size: int = 32,
    show_progress_bar: bool | None = None,
) -> np.ndarray:
    """One encoder call on ``texts`` as they are, as a numpy array (rows in ``texts`` order)."""
    return np.asarray(
        encoder.encode(texts, instruction=instruction, batch_size=batch_size, show_progress_bar=show_progress_bar)
    )


def embed_unique(
    encoder: TextEncoder,
    texts: Sequence[str],
    instruction: str | None,
    batch_size: int = 32,
    show_progress_bar: bool | None = None,
) -> np.ndarray:
    """Embeddings aligned with ``texts``, from one encoder call on each distinct text once, in first-seen order.

    Tasks repeat texts (a sentence in several pairs, a candidate under several queries): this embeds each once.
    """
    unique = list(dict.fromkeys(texts))
    row = {text: i for i, text in enumerate(unique)}
    return embed(encoder, unique, instruction, batch_size, show_progress_bar)[[row[text] for text in texts]]


def sample_indices(n: int, max_samples: int | None, seed: int) -> np.ndarray:
    """Ascending indices of a seeded random sample of ``max_samples`` of ``n`` items; all of them when uncapped."""
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"sample limits must be positive, got {max_samples}")
    if max_samples is None or max_samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))


@dataclass(frozen=True)
class Instructions:
    """Instructions for the two sides of a task; a symmetric task uses the same one on both sides."""

    query: str | None = None
    document: str | None = None

    @classmethod
    def symmetric(cls, instruction: str | None) -> Instructions:
        return cls(instruction, instruction)


@dataclass
class TaskResult:
    """Scores are x100, as MTEB reports them; ``samples`` says how much data was actually evaluated."""

    task: str
    type: str
    main_metric: str
    scores: dict[str, float]
    samples: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def main_score(self) -> float:
        return self.scores[self.main_metric]

    def to_dict(self) -> dict:
        return asdict(self) | {"main_score": self.main_score}

    @classmethod
    def from_dict(cls, data: dict) -> TaskResult:
        return cls(**{k: v for k, v in data.items() if k != "main_score"})


NO_INSTRUCTIONS = Instructions()
