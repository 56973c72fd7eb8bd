"""Run directories -> plots: metric curves of several runs overlaid, one panel per metric.

    runs = {name: load_metrics(run_dir) for name, run_dir in ...}
    plot_metrics(runs, ["logps/chosen", "eval/rewards/accuracies"], "out.png")
"""

from __future__ import annotations

import json
import os


def load_metrics(run_dir: str) -> list[dict]:
    """The rows of `metrics.jsonl` (lenient: a torn last line from a killed run is skipped)."""
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_metrics(runs: dict[str, list[dict]], panels: list[tuple[str, list[str]]], path: str,
                 title: str | None = None) -> str:
    """One panel per (title, keys); each run is one colour, each key one line style. Saves a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(panels))
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.4 * cols, 3.6 * rows_n), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, (panel_title, keys) in zip(axes.flat, panels):
        for i, (name, rows) in enumerate(runs.items()):
            for j, key in enumerate(keys):
                x, y = series(rows, key)
                if x:
                    label = name if len(keys) == 1 else f"{name}: {key.split('/')[-1]}"
                    ax.plot(x, y, styles[j % len(styles)], color=colours[i % len(colours)], label=label, lw=1.6)
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
