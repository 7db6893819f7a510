"""The whole recipe in one call: run the stages in order, score STS-B after each, save the final encoder.

Each stage writes ``output_dir/N-stage/`` (checkpoints, ``log.jsonl``, ``encoder/``); a finished stage is
reused on ``resume``, an interrupted one continues from its last checkpoint. ``results.json`` and
``results.md`` hold one row per model: STS-B dev and test Spearman, wall time and peak memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..blocks import blocks
from ..calibration import float_kind
from ..choices import PoolingMode
from ..encoder import Encoder
from ..evaluation.sts import evaluate_sts
from ..hardware import describe_machine
from ..loading import load
from ..loading.source import resolve_source
from ..quantization import ONEDNN, linear_layers, lowered
from .config import STAGES, MNTPConfig, Recipe, StageConfig, load_recipe
from .data import check_data
from .mntp import mntp_inputs
from .stage import ENCODER_DIR, TRAINING_DTYPE, Source, claim_for_model, claim_stage_dir, saved_encoder

CAUSAL_BASELINE = "causal, weighted mean (baseline)"


@dataclass
class Row:
    model: str
    dev: float | None
    test: float | None
    seconds: float
    peak_memory_gb: float  # the process's resident memory at most, so far
    gpu_peak_memory_gb: float | None = None  # torch's CUDA allocations at most, so far, where training used a GPU


def peak_memory_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def gpu_peak_memory_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else None


def score(
    encoder: Encoder, data_root: str | os.PathLike | None, splits=("dev", "test"), max_samples: int | None = None
) -> dict[str, float]:
    """STS-B Spearman x100 (no instruction) on each split, in float32 as fast as this machine runs it.

    Meanwhile the float32 products skip their fixed row blocks (batch invariance off: faster on short texts) and
    run on oneDNN's kernels where those beat torch's BLAS (AMD CPUs: 1.1x on a Zen 4, 2.2x on a Zen 5); the
    summation order that changes (<3e-4) does not move a rank.
    """
    with encoder.batch_variant(), fastest_float32(encoder):
        results = {
            split: evaluate_sts(encoder, split, data=data_root, max_samples=max_samples, batch_size=64)
            for split in splits
        }
    return {split: result.scores["spearman"] for split, result in results.items()}


def fastest_float32(encoder: Encoder) -> contextlib.AbstractContextManager:
    """A float32 CPU model's linear layers on oneDNN while inside (:func:`~lm2vec.quantization.lowered`), where
    this machine runs oneDNN's float32 faster (:func:`~lm2vec.calibration.float_kind`); otherwise as they are."""
    model = encoder.model
    float_cpu = encoder.device.type == "cpu" and next(model.parameters()).dtype == torch.float32
    if not float_cpu or not blocks(model) or not linear_layers(model) or float_kind() != ONEDNN:
        return contextlib.nullcontext()
    return lowered(model, ONEDNN)


class Results:
    """The results table, one row per model: each row is logged and the table rewritten as it comes."""

    def __init__(
        self,
        output_dir: Path,
        recipe: Recipe,
        data_root: str | os.PathLike | None,
        evaluate: bool,
        log: Callable[[str], None],
        resume: bool = False,
    ) -> None:
        self.output_dir, self.recipe, self.data_root = output_dir, recipe, data_root
        self.evaluate, self.log = evaluate, log
        self.rows: list[Row] = []
        self.earlier = earlier_rows(output_dir) if resume else {}

    def record(self, name: str, encoder: Encoder, start: float, reused: bool = False) -> None:
        """Score ``encoder`` as row ``name``; a ``reused`` model keeps the earlier run's row, so the table shows
        the time its training took rather than the time to re-read it."""
        earlier = self.earlier.get(name) if reused else None
        if earlier is not None and (earlier.dev is not None or not self.evaluate):  # (scored if scores are wanted)
            row, note = earlier, " (the earlier run's)"
        else:
            scores = score(encoder, self.data_root) if self.evaluate else {}
            seconds = time.perf_counter() - start
            row = Row(name, scores.get("dev"), scores.get("test"), seconds, peak_memory_gb(), gpu_peak_memory_gb())
            note = ""
        self.rows.append(row)
        self.log(f"{name}: STS-B dev {fmt(row.dev)}, test {fmt(row.test)} ({row.seconds:.0f} s){note}")
        write_results(self.output_dir, self.recipe, self.rows)


def earlier_rows(output_dir: Path) -> dict[str, Row]:
    """The rows of an earlier run's ``results.json`` in ``output_dir``, by model name (none if it has none)."""
    path = output_dir / "results.json"
    if not path.is_file():
        return {}
    return {row["model"]: Row(**row) for row in json.loads(path.read_text())["rows"]}


def convert(
    source: str | os.PathLike | None,
    recipe: str | os.PathLike | Recipe,
    output_dir: str | os.PathLike,
    *,
    data_root: str | os.PathLike | None = None,
    resume: bool = False,
    evaluate: bool = True,
    baselines: bool = True,
    causal: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[Encoder, list[Row]]:
    """Convert ``source`` with ``recipe``; return the final encoder and the results table.

    ``causal`` runs the ablation the paper's readers ask about: the same contrastive stages on the causal
    model with weighted-mean pooling (MNTP, which exists to adapt to bidirectional attention, is skipped).
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    for _, config in recipe.stages:
        check_data(config.data, data_root)
    output_dir = Path(output_dir)
    stages = [(s, c) for s, c in recipe.stages if not (causal and s == "mntp")]
    if not stages:
        raise ValueError(f"recipe {recipe.name} has no stage but MNTP, which the causal ablation skips")
    for i, (stage, config) in enumerate(stages, start=1):  # before anything runs: an edited recipe fails here
        claim_stage_dir(output_dir / f"{i}-{stage}", config, resume)
        if isinstance(config, MNTPConfig):  # and a model MNTP cannot train, not after the baselines' scores
            mntp_inputs(resolve_source(source), config)
    claim_for_model(output_dir, source, resume)  # and another model's run
    (output_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    results = Results(output_dir, recipe, data_root, evaluate, log, resume)
    current = starting_point(source, causal, results if baselines and evaluate else None, first_stage=stages[0][0])
    chain = "causal (weighted mean)" if causal else "bidirectional"
    for i, (stage, config) in enumerate(stages, start=1):
        release_freed_memory()  # what the stages, scoring and seeds before freed: else it sits under this peak
        start = time.perf_counter()
        stage_dir = output_dir / f"{i}-{stage}"
        current, reused = run_or_reuse(i, stage, config, current, stage_dir, data_root, resume, log)
        chain += f" + {stage}"
        results.record(chain, current, start, reused)
    final = current if isinstance(current, Encoder) else load(current, dtype=TRAINING_DTYPE)
    final.save(output_dir / ENCODER_DIR, training=training_card(recipe, stages, results.rows))
    return final, results.rows


def convert_seeds(
    source: str | os.PathLike | None,
    recipe: str | os.PathLike | Recipe,
    output_dir: str | os.PathLike,
    seeds: list[int],
    **options,
) -> list[SeedRow]:
    """:func:`convert` once per seed into ``output_dir/seed-N`` (``--resume`` reuses finished seeds and stages), then
    ``output_dir/results.md``: each row's mean and standard deviation over the seeds. Training runs on a CPU spread
    by several STS-B points between seeds (more than some differences worth reporting), so compare means.
    The untrained baselines do not depend on the seed: scored with the first seed only."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    output_dir = Path(output_dir)
    runs = []
    for i, seed in enumerate(seeds):
        if i:
            options["baselines"] = False
        # Only the rows are kept: a name bound to this seed's encoder would hold it through the next seed's run.
        runs.append(convert(source, recipe.with_seed(seed), output_dir / f"seed-{seed}", **options)[1])
    summary = seed_summary(runs)
    lines = [
        f"Recipe `{recipe.name}` on {describe_machine()}, seeds {', '.join(map(str, seeds))}: STS-B Spearman x100, "
        "mean +- sd.",
        "",
    ]
    lines += ["| model | STS-B dev | STS-B test | wall time | seeds |", "|---|---|---|---|---|"]
    lines += [f"| {r.model} | {r.dev} | {r.test} | {r.minutes:.1f} min | {r.seeds} |" for r in summary]
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")
    return summary


def release_freed_memory() -> None:
    """Hand the memory freed by a finished stage or seed back to the system (glibc's ``malloc_trim``; a no-op
    without glibc): glibc keeps it otherwise, and the next run's peak came on top (a 3-step run: 5.9 against 4.7 GB
    for seed 2)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class SeedRow:
    model: str
    dev: str  # "mean +- sd"
    test: str
    minutes: float  # mean
    seeds: int


def seed_summary(runs: list[list[Row]]) -> list[SeedRow]:
    """One row per model over the runs that have it (in first-seen order): mean +- sample sd."""
    names = list(dict.fromkeys(row.model for rows in runs for row in rows))
    summary = []
    for name in names:
        rows = [row for rows in runs for row in rows if row.model == name]
        summary.append(
            SeedRow(
                name,
                _mean_sd([r.dev for r in rows]),
                _mean_sd([r.test for r in rows]),
                statistics.fmean(r.seconds for r in rows) / 60,
                len(rows),
            )
        )
    return summary


def _mean_sd(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    sd = statistics.stdev(known) if len(known) > 1 else 0.0
    return f"{statistics.fmean(known):.1f} +- {sd:.1f}"


def starting_point(
    source: str | os.PathLike | None, causal: bool, baselines: Results | None, first_stage: str
) -> Source:
    """What the first stage trains: the source, or its causal encoder for the ablation; the untrained models are
    scored into ``baselines`` if given. An MNTP first stage gets the source: it loads the causal LM itself, and an
    encoder handed to it would stay loaded beside that through its training. Other stages get the source loaded
    bidirectional, whatever attention a saved directory names (a causal encoder, a sentence-transformers model).
    """
    start = time.perf_counter()
    if causal:
        current = load(source, bidirectional=False, pooling=PoolingMode.WEIGHTED_MEAN, dtype=TRAINING_DTYPE)
        if baselines:
            baselines.record(CAUSAL_BASELINE, current, start, reused=True)
        return current
    if not baselines:
        return source if first_stage == "mntp" else load(source, bidirectional=True, dtype=TRAINING_DTYPE)
    baselines.record(
        CAUSAL_BASELINE,
        load(source, bidirectional=False, pooling=PoolingMode.WEIGHTED_MEAN, dtype=TRAINING_DTYPE),
        start,
        reused=True,  # the untrained models are the same in every run
    )
    start = time.perf_counter()
    untrained = load(source, bidirectional=True, dtype=TRAINING_DTYPE)
    baselines.record("bidirectional, untrained", untrained, start, reused=True)
    return source if first_stage == "mntp" else untrained


def run_or_reuse(
    i: int,
    stage: str,
    config: StageConfig,
    current: Source,
    stage_dir: Path,
    data_root: str | os.PathLike | None,
    resume: bool,
    log: Callable[[str], None],
) -> tuple[Encoder, bool]:
    """Stage ``i`` of the conversion on ``current``: trained, or (True) the encoder it saved when resuming a finished
    one."""
    done = saved_encoder(stage_dir) if resume else None
    if done is not None:
        log(f"stage {i} ({stage}): already finished in {stage_dir}, reusing it")
        return done, True
    log(f"stage {i} ({stage}): {config.steps} steps of {config.batch_size}, lr {config.learning_rate}")
    if stage == "mntp" and isinstance(current, Encoder):  # MNTP loads the causal LM, here from disk
        current = current.save(stage_dir / "input")
    return STAGES[stage].train(current, config, stage_dir, data_root=data_root, resume=resume), False


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def results_table(recipe: Recipe, rows: list[Row]) -> list[str]:
    """The STS-B scores of each stage, as markdown lines (results.md and the model card)."""
    lines = [
        f"Recipe `{recipe.name}` on {describe_machine()}. STS-B Spearman x100 (cosine, no instruction).",
        "",
        "| model | STS-B dev | STS-B test | wall time | peak memory |",
        "|---|---|---|---|---|",
    ]
    return lines + [
        f"| {r.model} | {fmt(r.dev)} | {fmt(r.test)} | {r.seconds / 60:.1f} min | {memory(r)} |" for r in rows
    ]


def memory(row: Row) -> str:
    gpu = "" if row.gpu_peak_memory_gb is None else f", GPU {row.gpu_peak_memory_gb:.1f} GB"
    return f"{row.peak_memory_gb:.1f} GB{gpu}"


def training_card(recipe: Recipe, stages: list[tuple[str, StageConfig]], rows: list[Row]) -> str:
    """The model card's training section: the recipe, its stages in order, and their scores."""
    lines = [recipe.description.strip(), "", "| stage | steps | batch | learning rate | data |", "|" + "---|" * 5]
    lines += [f"| {s} | {c.steps} | {c.batch_size} | {c.learning_rate:g} | {', '.join(c.data)} |" for s, c in stages]
    return "\n".join([*lines, "", *results_table(recipe, rows)])


def write_results(output_dir: Path, recipe: Recipe, rows: list[Row]) -> None:
    (output_dir / "results.json").write_text(
        json.dumps({"recipe": recipe.name, "rows": [asdict(r) for r in rows]}, indent=2) + "\n"
    )
    (output_dir / "results.md").write_text("\n".join(results_table(recipe, rows)) + "\n")
