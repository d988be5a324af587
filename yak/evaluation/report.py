"""The report: results.json, a side-by-side Markdown table, a PNG chart, and per-example predictions."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from yak.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

# Bookkeeping numbers shown in JSON but not as table rows or bars.
_NOT_METRICS = {"n", "truncated", "skipped", "seconds", "stride", "max_length", "chance"}
_COUNTS = ("/texts", "/bytes", "/syllables", "/tokens", "/reference_tokens")  # tokenizer section's counts
_LOWER_IS_BETTER = ("bits_per_byte", "bits_per_char", "tokens_per_byte", "tokens_per_syllable")


def metric_rows(results: dict) -> list[tuple[str, str]]:
    """``(task, metric)`` pairs in task order, union over models."""
    rows: list[tuple[str, str]] = []
    for per_task in results["results"].values():
        for task, res in per_task.items():
            for metric, value in res.items():
                if (
                    metric not in _NOT_METRICS
                    and not metric.endswith(_COUNTS)
                    and isinstance(value, (int, float))
                    and (task, metric) not in rows
                ):
                    rows.append((task, metric))
    order = list(results["tasks"])
    return sorted(rows, key=lambda r: order.index(r[0]))  # stable: metrics keep their order within a task


def markdown_table(results: dict) -> str:
    """One row per task metric, one column per model; ``n`` and the chance level help read accuracies."""
    models = list(results["results"])
    lines = ["| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---:|" * len(models)]
    for task, metric in metric_rows(results):
        cells = []
        for m in models:
            v = results["results"][m].get(task, {}).get(metric)
            cells.append("" if v is None else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}")
        first = results["results"][models[0]].get(task, {})
        note = (
            f" (n={first['n']}" + (f", chance {first['chance']:.0f}" if "chance" in first else "") + ")"
            if "n" in first
            else ""
        )
        arrow = " ↓" if metric.endswith(_LOWER_IS_BETTER) else ""
        lines.append(f"| {task}{note} | {metric}{arrow} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_chart(path: Path, results: dict) -> None:
    """A bar chart, one panel per task, models side by side for each metric."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    models = list(results["results"])
    rows = metric_rows(results)
    tasks = list(dict.fromkeys(t for t, _ in rows))
    fig, axes = plt.subplots(len(tasks), 1, figsize=(10, 2.6 * len(tasks)), squeeze=False)
    width = 0.8 / len(models)
    for ax, task in zip(axes[:, 0], tasks):
        names = [m for t, m in rows if t == task]
        for k, model in enumerate(models):
            res = results["results"][model].get(task, {})
            xs = [i + k * width for i in range(len(names))]
            ax.bar(xs, [res.get(n, 0.0) for n in names], width, label=model)
        ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels([n.replace("/", "\n") for n in names], fontsize=7)
        ax.set_title(f"{task} ({results['tasks'][task]['kind']})", fontsize=9)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(folder: Path, results: dict, predictions: dict[str, dict[str, list[dict]]]) -> None:
    """Write every report file into ``folder`` (the caller makes the folder appear atomically)."""
    folder = Path(folder)
    atomic_write_json(folder / "results.json", results)
    table = markdown_table(results)
    atomic_write_text(folder / "results.md", "# Evaluation\n\n" + table)
    write_chart(folder / "results.png", results)
    for model, per_task in predictions.items():
        for task, rows in per_task.items():
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            atomic_write_text(folder / "predictions" / model / f"{task}.jsonl", text)
    logger.info("results:\n%s", table)
