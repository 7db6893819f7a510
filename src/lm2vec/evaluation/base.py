"""What every evaluation task shares: the encoder it calls, its instructions, and the result it returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np


class TextEncoder(Protocol):
    """An :class:`lm2vec.Encoder`, or the embedding cache in front of one."""

    def encode(
        self,
        sentences: list[str],
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray: ...


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
