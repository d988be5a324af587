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


def _panels(results: dict) -> dict[str, list[tuple[str, str]]]:
    """Chart panels: title -> [(bar label, metric key)]. ``file/metric`` keys get one panel per metric."""
    panels: dict[str, list[tuple[str, str]]] = {}
    for task, metric in metric_rows(results):
        subject, _, name = metric.rpartition("/")
        title = f"{task}: {name}" if subject else f"{task} ({results['tasks'][task]['kind']})"
        panels.setdefault(title, []).append((subject or name, metric))
    return panels


def write_chart(path: Path, results: dict) -> None:
    """A bar chart, one panel per task (or per task metric), models side by side, values on the bars."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    models = list(results["results"])
    panels = _panels(results)
    cols = 2 if len(panels) > 1 else 1
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 3 * nrows), squeeze=False)
    width = 0.8 / len(models)
    for ax, (title, bars) in zip(axes.flat, panels.items()):
        task = title.split(":")[0].split(" (")[0]
        for k, model in enumerate(models):
            res = results["results"][model].get(task, {})
            values = [res.get(key) or 0.0 for _, key in bars]
            drawn = ax.bar([i + k * width for i in range(len(bars))], values, width, label=model)
            ax.bar_label(drawn, fmt="%.3g", fontsize=6)
        ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(bars))])
        ax.set_xticklabels([label.replace("_", " ") for label, _ in bars], fontsize=7, rotation=15)
        ax.set_title(title, fontsize=9)
        ax.margins(y=0.15)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
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
