"""The task registry and the runner behind ``lm2vec evaluate``.

Each task names its data under the data directory, its type's evaluator, and the sample sizes that keep a
CPU run of the built-in model within minutes (``full=True`` evaluates everything, as MTEB does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from .. import evaluation  # the evaluators, imported when a task runs: naming the tasks needs no torch
from ..datafiles import data_dir
from .base import NO_INSTRUCTIONS, Instructions, TaskResult, TextEncoder

if TYPE_CHECKING:
    from ..encoder import Encoder


@dataclass(frozen=True)
class RunContext:
    """What a task needs: the encoder (token-level tasks), the cached embedder, the data and the budget."""

    encoder: Encoder
    embedder: TextEncoder
    data: Path
    full: bool
    batch_size: int
    show_progress_bar: bool | None

    def max_samples(self, n: int) -> int | None:
        """A CPU-budget sample size, or None (everything) for full runs."""
        return None if self.full else n


TaskRunner = Callable[[RunContext, Instructions], list[TaskResult]]


@dataclass(frozen=True)
class Task:
    name: str
    type: str
    description: str
    run: TaskRunner


def _common(ctx: RunContext, instructions: Instructions) -> dict:
    return {
        "data": ctx.data,
        "instructions": instructions,
        "batch_size": ctx.batch_size,
        "show_progress_bar": ctx.show_progress_bar,
    }


def _sts(split: str) -> TaskRunner:
    return lambda ctx, ins: [evaluation.evaluate_sts(ctx.embedder, split, **_common(ctx, ins))]


TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task("stsb", "sts", "STS Benchmark test, 1,379 pairs (Spearman of cosine)", _sts("test")),
        Task("stsb-dev", "sts", "STS Benchmark dev, 1,500 pairs: for choosing settings", _sts("dev")),
        Task(
            "scifact",
            "retrieval",
            "SciFact, 300 test claims; CPU budget: judged documents + random others, 500 in all (nDCG@10)",
            lambda ctx, ins: [
                evaluation.evaluate_retrieval(
                    ctx.embedder, **_common(ctx, ins), name="scifact", max_samples=ctx.max_samples(500)
                )
            ],
        ),
        Task(
            "banking77",
            "classification",
            "Banking77, 77 intents, 10 experiments x 8 examples per label; CPU budget: 1,000 test texts (accuracy)",
            lambda ctx, ins: [
                evaluation.evaluate_classification(
                    ctx.embedder, **_common(ctx, ins), name="banking77", max_samples=ctx.max_samples(1000)
                )
            ],
        ),
        Task(
            "twentynewsgroups",
            "clustering",
            "20 Newsgroups subject lines, 20 groups; CPU budget: 2,000 documents (V-measure)",
            lambda ctx, ins: [
                evaluation.evaluate_clustering(
                    ctx.embedder, **_common(ctx, ins), name="twentynewsgroups", max_samples=ctx.max_samples(2000)
                )
            ],
        ),
        Task(
            "snli",
            "pair_classification",
            "SNLI test, entailment vs contradiction; CPU budget: 1,000 pairs (average precision of cosine)",
            lambda ctx, ins: [
                evaluation.evaluate_pair_classification(
                    ctx.embedder, **_common(ctx, ins), name="snli", max_samples=ctx.max_samples(1000)
                )
            ],
        ),
        Task(
            "conll2003",
            "word_probing",
            "CoNLL-2003 POS, chunk and NER linear probes; CPU budget: 1,000 train / 500 test sentences (accuracy)",
            lambda ctx, _: evaluation.evaluate_word_probing(
                ctx.encoder,
                ctx.data,
                max_train_samples=ctx.max_samples(1000),
                max_samples=ctx.max_samples(500),
                batch_size=ctx.batch_size,
                show_progress_bar=ctx.show_progress_bar,
            ),
        ),
    ]
}
DEFAULT_TASKS = ("stsb", "scifact", "banking77", "twentynewsgroups", "snli", "conll2003")


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def load_instructions(path: str | os.PathLike | None = None) -> dict[str, Instructions]:
    """Instructions per task from a JSON file like the packaged ``instructions.json`` (its default)."""
    if path is None:
        text = resources.files(__package__).joinpath("instructions.json").read_text()
    else:
        text = Path(path).read_text()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path or 'instructions.json'} is not valid JSON: {err}") from err
    return {
        task: Instructions(entry.get("query"), entry.get("document"))
        for task, entry in raw.items()
        if not task.startswith("_")
    }


def run_tasks(
    encoder: Encoder,
    tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
    *,
    data: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    instructions: dict[str, Instructions] | None = None,
    full: bool = False,
    batch_size: int = 32,
    show_progress_bar: bool | None = None,
) -> list[TaskResult]:
    """Run ``tasks`` on ``encoder``; sentence embeddings go through the on-disk cache when ``cache_dir`` is set.

    ``instructions`` None uses the packaged instructions; pass ``{}`` for none.
    """
    selected = [get_task(name) for name in tasks]  # unknown names fail before any work
    instructions = load_instructions() if instructions is None else instructions
    embedder = evaluation.CachedEncoder(encoder, cache_dir) if cache_dir is not None else encoder
    ctx = RunContext(
        encoder, embedder, Path(data) if data is not None else data_dir(), full, batch_size, show_progress_bar
    )
    results: list[TaskResult] = []
    try:
        for task in tqdm(selected, desc="Tasks", unit="task", disable=show_progress_bar is False):
            results.extend(task.run(ctx, instructions.get(task.name.removesuffix("-dev"), NO_INSTRUCTIONS)))
    finally:
        if isinstance(embedder, evaluation.CachedEncoder):
            embedder.close()
    return results
