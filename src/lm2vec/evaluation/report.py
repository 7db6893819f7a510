"""Results files: JSON per run, and a Markdown table and PNG chart comparing runs (models or training stages)."""

from __future__ import annotations

import json
from pathlib import Path

from .base import TaskResult

Runs = dict[str, list[TaskResult]]  # run name (model or stage) -> its task results


def save_results(path: Path, runs: Runs, meta: dict | None = None) -> None:
    payload = {"meta": meta or {}, "runs": {name: [r.to_dict() for r in results] for name, results in runs.items()}}
    path.write_text(json.dumps(payload, indent=2) + "\n")


def load_results(path: str | Path) -> Runs:
    """Runs from a results JSON written by :func:`save_results` (to compare with new ones)."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
        return {name: [TaskResult.from_dict(r) for r in results] for name, results in payload["runs"].items()}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not an lm2vec results file: {err}") from err


def _tasks(runs: Runs) -> list[tuple[str, str]]:
    """(task, main metric) in first-seen order across runs."""
    seen: dict[str, str] = {}
    for results in runs.values():
        for r in results:
            seen.setdefault(r.task, r.main_metric)
    return list(seen.items())


def markdown_table(runs: Runs) -> str:
    """One row per task (main score x100), one column per run, and the average of the tasks all runs share."""
    tasks = _tasks(runs)
    scores = {name: {r.task: r.main_score for r in results} for name, results in runs.items()}
    lines = [
        "| task | metric | " + " | ".join(runs) + " |",
        "|---|---|" + "---:|" * len(runs),
    ]
    for task, metric in tasks:
        cells = [f"{scores[name][task]:.1f}" if task in scores[name] else "" for name in runs]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    shared = [task for task, _ in tasks if all(task in s for s in scores.values())]
    if len(shared) > 1:
        averages = [sum(scores[name][t] for t in shared) / len(shared) for name in runs]
        lines.append(f"| **average** ({len(shared)} tasks) | | " + " | ".join(f"**{a:.1f}**" for a in averages) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(runs: Runs, path: Path) -> None:
    """Grouped bars: tasks on the x axis, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    tasks = [task for task, _ in _tasks(runs)]
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) * max(1, len(runs) / 2)), 4))
    for i, (name, results) in enumerate(runs.items()):
        by_task = {r.task: r.main_score for r in results}
        xs = [t + i * width for t, task in enumerate(tasks) if task in by_task]
        ax.bar(xs, [by_task[task] for task in tasks if task in by_task], width, label=name)
    ax.set_xticks([t + width * (len(runs) - 1) / 2 for t in range(len(tasks))], tasks, rotation=30, ha="right")
    ax.set_ylabel("main score (x100)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(output: Path, runs: Runs, meta: dict | None = None) -> dict[str, Path]:
    """Write results.json, results.md and results.png into ``output``; return their paths."""
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / "results.json", "markdown": output / "results.md", "chart": output / "results.png"}
    save_results(paths["json"], runs, meta)
    paths["markdown"].write_text(markdown_table(runs))
    bar_chart(runs, paths["chart"])
    return paths
