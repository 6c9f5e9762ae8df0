"""The plots of a run report: accuracy matrix, task accuracy across stages, general ability, loss parts,
and (when measured) the gradient share of each loss part.

Plots use matplotlib's Agg canvas directly (no pyplot state) and are written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gere.continual.metrics import general_scores
from gere.io_utils import atomic_path
from gere.parts import GRAD_COS, GRAD_NORM, LOGGED, LOSS_PARTS


def stage_names(tasks) -> list[str]:
    return ["base"] + [f"after {t}" for t in tasks]


def perplexity_sets(results: dict[str, Any]) -> list[str]:
    """Names of the held-out perplexity sets a run evaluated, in first-seen order."""
    names: list[str] = []
    for entry in results.get("general", []):
        for key in entry.get("perplexity") or {}:
            if key not in names:
                names.append(key)
    return names


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_accuracy_matrix(results: dict[str, Any], path: Path) -> Path:
    tasks, matrix = results["tasks"], results["accuracy_matrix"]
    stages = results.get("stages") or stage_names(tasks)
    fig = new_figure(max(5.0, 0.7 * len(tasks) + 2), max(4.0, 0.45 * len(stages) + 1.5))
    ax = fig.add_subplot()
    # A cell not evaluated (None) is masked: drawn in the axes' grey, with no number.
    cells = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in row] for row in matrix], float))
    ax.set_facecolor("0.85")
    image = ax.imshow(cells, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(stages)), stages)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value is None:
                continue
            ax.text(
                j,
                i,
                f"{100 * value:.0f}",
                ha="center",
                va="center",
                fontsize=7,
                color="black" if value > 0.6 else "white",
            )
    ax.set_title("Accuracy (%) per stage and task")
    return save_figure(fig, path)


def plot_task_accuracy(results: dict[str, Any], path: Path) -> Path:
    tasks, matrix = results["tasks"], results["accuracy_matrix"]
    stages = results.get("stages") or stage_names(tasks)
    fig = new_figure(max(6.0, 0.5 * len(stages) + 3), 4.5)
    ax = fig.add_subplot()
    for j, task in enumerate(tasks):
        points = [(i, row[j]) for i, row in enumerate(matrix) if row[j] is not None]  # the stages evaluated
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=task)
    ax.set_xticks(range(len(stages)), stages, rotation=45, ha="right")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title("Task accuracy across stages")
    ax.legend(fontsize=7, ncol=max(1, len(tasks) // 8))
    return save_figure(fig, path)


def plot_general(results: dict[str, Any], path: Path) -> Path:
    general = results.get("general") or []
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    if not general:
        ax.text(0.5, 0.5, "no general-ability evaluation", ha="center", va="center", transform=ax.transAxes)
        return save_figure(fig, path)
    x = list(range(len(general)))
    scores = general_scores(general)
    shown = [(i, s) for i, s in enumerate(scores) if s is not None]  # stages a schedule left out are skipped
    ax.plot(
        [p[0] for p in shown],
        [p[1] for p in shown],
        marker="o",
        color="tab:blue",
        label="general score",
    )
    source = "lm-eval" if any("lm_eval_score" in e for e in general) else "MC accuracy"
    ax.set_ylabel(f"general score ({source})", color="tab:blue")
    ax.set_xticks(x, [e.get("stage", str(i)) for i, e in enumerate(general)], rotation=45, ha="right")
    ppl_sets = perplexity_sets(results)
    if ppl_sets:
        ax2 = ax.twinx()
        for k, name in enumerate(ppl_sets):
            values = [(i, (e.get("perplexity") or {}).get(name)) for i, e in enumerate(general)]
            values = [v for v in values if v[1] is not None]
            ax2.plot([v[0] for v in values], [v[1] for v in values], marker="s", linestyle="--", color=f"C{k + 1}", label=f"ppl {name}")
        ax2.set_ylabel("held-out perplexity")
        ax2.legend(loc="upper right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title("General ability across stages")
    return save_figure(fig, path)


def loss_series(results: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """The loss plot's data: ``{logged name: [(step, value), ...]}`` for every name of `gere.parts.LOGGED`
    that the run logged at least once, in that order."""
    history = results.get("loss_history") or []
    series = {name: [(h["step"], h[name]) for h in history if h.get(name) is not None] for name in LOGGED}
    return {name: points for name, points in series.items() if points}


def plot_loss_parts(results: dict[str, Any], path: Path) -> Path:
    history = results.get("loss_history") or []
    series = loss_series(results)
    parts = list(series)
    fig = new_figure(8.0, max(3.0, 2.2 * max(1, len(parts))))
    if not parts:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no losses logged", ha="center", va="center", transform=ax.transAxes)
        return save_figure(fig, path)
    # Where the task changes, draw a line so forgetting spikes can be matched to task boundaries.
    boundaries = [
        h["step"] for prev, h in zip(history, history[1:], strict=False) if h.get("task") != prev.get("task")
    ]
    first = None
    for k, part in enumerate(parts):
        ax = fig.add_subplot(len(parts), 1, k + 1, sharex=first)
        first = first or ax
        points = series[part]
        ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1)
        for step in boundaries:
            ax.axvline(step, color="grey", linestyle=":", linewidth=0.8)
        ax.set_ylabel(part)
        if k == len(parts) - 1:
            ax.set_xlabel("step")
    return save_figure(fig, path)


def grad_share_series(results: dict[str, Any]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """The gradient-share diagnostic's data (`gere.diagnostics`): ``{"norm": {part: [(step, value)]},
    "cos": {...}}`` for every part the run measured; empty dicts when it measured none."""
    history = results.get("loss_history") or []
    out: dict[str, dict[str, list[tuple[int, float]]]] = {"norm": {}, "cos": {}}
    for kind, prefix in (("norm", GRAD_NORM), ("cos", GRAD_COS)):
        for part in LOSS_PARTS:
            points = [(h["step"], h[prefix + part]) for h in history if h.get(prefix + part) is not None]
            if points:
                out[kind][part] = points
    return out


def plot_grad_share(results: dict[str, Any], path: Path) -> Path | None:
    """Each loss part's gradient norm (log scale) and its cosine with the total gradient, per measured step;
    None (nothing written) when the run did not measure them."""
    series = grad_share_series(results)
    if not series["norm"]:
        return None
    history = results.get("loss_history") or []
    boundaries = [h["step"] for prev, h in zip(history, history[1:], strict=False) if h.get("task") != prev.get("task")]
    fig = new_figure(8.0, 5.5)
    top, bottom = fig.add_subplot(2, 1, 1), None
    bottom = fig.add_subplot(2, 1, 2, sharex=top)
    for k, (part, points) in enumerate(series["norm"].items()):
        top.plot([p[0] for p in points], [max(p[1], 1e-12) for p in points], label=part, color=f"C{k}", linewidth=1)
        cos = series["cos"].get(part, [])
        bottom.plot([p[0] for p in cos], [p[1] for p in cos], label=part, color=f"C{k}", linewidth=1)
    top.set_yscale("log")
    top.set_ylabel("gradient norm (weighted part)")
    bottom.set_ylabel("cosine with the total")
    bottom.set_ylim(-1.05, 1.05)
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        for step in boundaries:
            ax.axvline(step, color="grey", linestyle=":", linewidth=0.8)
    top.legend(fontsize=7)
    top.set_title("Gradient share of each loss part (trainable parameters, before clipping)")
    return save_figure(fig, path)
