"""Run reports: ``results.json``, ``report.md`` and plots for one continual run, and a comparison of runs.

The runner fills a *results* dict with raw data and calls `build_results` (which adds ``stages`` and
``metrics``) and then `write_report`. The schema (accuracies and scores are fractions in [0, 1])::

    {
      "name": str,                      # run name
      "method": str,                    # e.g. "ce", "ce+tm"
      "config": {...},                  # the resolved run config
      "tasks": [str],                   # T task names in training order
      "test_sizes": [int],              # T test-set sizes
      "accuracy_matrix": [[float]],     # (T+1) x T; row 0 base model, row i after task i
      "stages": [str],                  # T+1 names: "base", "after <task 1>", ...
      "general": [                      # T+1 entries, one per stage
        {"stage": str, "mc_accuracy": float | None, "mc_per_category": {str: float},
         "perplexity": {"<held-out set name>": float}}
      ],
      "metrics": {...},                 # gere.metrics.compute_metrics output
      "loss_history": [
        {"step": int, "task": str, "loss": float, "task_ce": float, "replay_ce": float | None,
         "replay_margin": float | None, "margin_weight": float | None}
      ],
      "timing": {"total_s": float, "per_task_s": [float], "eval_s": float}
    }

Plots use matplotlib's Agg canvas directly (no pyplot state), and every file is written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gere.errors import GeReError
from gere.io_utils import atomic_path, atomic_write_json, atomic_write_text
from gere.metrics import check_matrix, compute_metrics

LOSS_PARTS = ("loss", "task_ce", "replay_ce", "replay_margin", "margin_weight")
REPORT_FILES = (
    "results.json",
    "report.md",
    "accuracy_matrix.png",
    "task_accuracy.png",
    "general.png",
    "loss_parts.png",
)


def stage_names(tasks: Sequence[str]) -> list[str]:
    return ["base"] + [f"after {t}" for t in tasks]


def build_results(
    name: str,
    method: str,
    config: dict[str, Any],
    tasks: Sequence[str],
    test_sizes: Sequence[int],
    accuracy_matrix: Sequence[Sequence[float]],
    general: Sequence[dict[str, Any]] | None = None,
    loss_history: Sequence[dict[str, Any]] | None = None,
    timing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a results dict in the module's schema, computing ``stages`` and ``metrics``."""
    matrix = check_matrix(accuracy_matrix)
    if len(tasks) != len(matrix) - 1:
        raise GeReError(
            f"{len(tasks)} task names for an accuracy matrix of {len(matrix) - 1} tasks; pass one per column"
        )
    general = list(general or [])
    if general and len(general) != len(matrix):
        raise GeReError(
            f"{len(general)} general-ability entries for {len(matrix)} stages; give one per stage (base first)"
        )
    return {
        "name": name,
        "method": method,
        "config": config,
        "tasks": list(tasks),
        "test_sizes": list(test_sizes),
        "accuracy_matrix": matrix,
        "stages": stage_names(tasks),
        "general": general,
        "metrics": compute_metrics(matrix, test_sizes, general),
        "loss_history": list(loss_history or []),
        "timing": dict(timing or {}),
    }


# -------------------------------------------------------------------------------------------- formatting


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _perplexity_sets(results: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for entry in results.get("general", []):
        for key in entry.get("perplexity") or {}:
            if key not in names:
                names.append(key)
    return names


def render_markdown(results: dict[str, Any]) -> str:
    """The text of report.md: accuracy matrix, metrics, general ability per stage, timing."""
    tasks, matrix, m = results["tasks"], results["accuracy_matrix"], results["metrics"]
    stages = results.get("stages") or stage_names(tasks)
    parts = [f"# {results.get('name', 'run')} ({results.get('method', '?')})", ""]
    parts += [
        "## Accuracy matrix (%)",
        "",
        "Row = stage (model after training that task), column = task.",
        "",
    ]
    parts.append(
        _table(["stage", *tasks], [[s, *map(_pct, row)] for s, row in zip(stages, matrix, strict=True)])
    )
    parts += ["", "## Metrics (%)", ""]
    metric_rows = [
        ("AP (mean final accuracy)", m.get("ap")),
        ("AP, sample-weighted", m.get("ap_weighted")),
        ("BWT", m.get("bwt")),
        ("FWT", m.get("fwt")),
        ("Forgetting", m.get("forgetting")),
        ("General score (final)", m.get("general_final")),
        ("F1 Avg (general, AP)", m.get("f1_avg")),
    ]
    parts.append(_table(["metric", "value"], [[k, _pct(v)] for k, v in metric_rows]))
    general = results.get("general") or []
    if general:
        ppl_sets = _perplexity_sets(results)
        categories = sorted({c for e in general for c in (e.get("mc_per_category") or {})})
        header = [
            "stage",
            "MC accuracy (%)",
            *[f"{c} (%)" for c in categories],
            *[f"ppl {p}" for p in ppl_sets],
        ]
        rows = []
        for entry in general:
            per_cat = entry.get("mc_per_category") or {}
            ppl = entry.get("perplexity") or {}
            rows.append(
                [
                    entry.get("stage", ""),
                    _pct(entry.get("mc_accuracy")),
                    *[_pct(per_cat.get(c)) for c in categories],
                    *[_num(ppl.get(p)) for p in ppl_sets],
                ]
            )
        parts += ["", "## General ability per stage", "", _table(header, rows)]
    timing = results.get("timing") or {}
    if timing:
        per_task = timing.get("per_task_s") or []
        rows = [["total", _num(timing.get("total_s"), 1)], ["evaluation", _num(timing.get("eval_s"), 1)]]
        rows += [[f"train {t}", _num(s, 1)] for t, s in zip(tasks, per_task, strict=False)]
        parts += ["", "## Timing (s)", "", _table(["part", "seconds"], rows)]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_accuracy_matrix(results: dict[str, Any], path: Path) -> Path:
    tasks, matrix = results["tasks"], results["accuracy_matrix"]
    stages = results.get("stages") or stage_names(tasks)
    fig = _new_figure(max(5.0, 0.7 * len(tasks) + 2), max(4.0, 0.45 * len(stages) + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(stages)), stages)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
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
    return _save(fig, path)


def plot_task_accuracy(results: dict[str, Any], path: Path) -> Path:
    tasks, matrix = results["tasks"], results["accuracy_matrix"]
    stages = results.get("stages") or stage_names(tasks)
    fig = _new_figure(max(6.0, 0.5 * len(stages) + 3), 4.5)
    ax = fig.add_subplot()
    for j, task in enumerate(tasks):
        ax.plot(range(len(stages)), [row[j] for row in matrix], marker="o", label=task)
    ax.set_xticks(range(len(stages)), stages, rotation=45, ha="right")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title("Task accuracy across stages")
    ax.legend(fontsize=7, ncol=max(1, len(tasks) // 8))
    return _save(fig, path)


def plot_general(results: dict[str, Any], path: Path) -> Path:
    general = results.get("general") or []
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    if not general:
        ax.text(0.5, 0.5, "no general-ability evaluation", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, path)
    x = list(range(len(general)))
    scores = [e.get("mc_accuracy") for e in general]
    ax.plot(
        x,
        [float("nan") if s is None else s for s in scores],
        marker="o",
        color="tab:blue",
        label="general score",
    )
    ax.set_ylabel("general score (MC accuracy)", color="tab:blue")
    ax.set_xticks(x, [e.get("stage", str(i)) for i, e in enumerate(general)], rotation=45, ha="right")
    ppl_sets = _perplexity_sets(results)
    if ppl_sets:
        ax2 = ax.twinx()
        for k, name in enumerate(ppl_sets):
            values = [(e.get("perplexity") or {}).get(name, float("nan")) for e in general]
            ax2.plot(x, values, marker="s", linestyle="--", color=f"C{k + 1}", label=f"ppl {name}")
        ax2.set_ylabel("held-out perplexity")
        ax2.legend(loc="upper right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title("General ability across stages")
    return _save(fig, path)


def plot_loss_parts(results: dict[str, Any], path: Path) -> Path:
    history = results.get("loss_history") or []
    parts = [p for p in LOSS_PARTS if any(h.get(p) is not None for h in history)]
    fig = _new_figure(8.0, max(3.0, 2.2 * max(1, len(parts))))
    if not parts:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no losses logged", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, path)
    # Where the task changes, draw a line so forgetting spikes can be matched to task boundaries.
    boundaries = [
        h["step"] for prev, h in zip(history, history[1:], strict=False) if h.get("task") != prev.get("task")
    ]
    first = None
    for k, part in enumerate(parts):
        ax = fig.add_subplot(len(parts), 1, k + 1, sharex=first)
        first = first or ax
        points = [(h["step"], h[part]) for h in history if h.get(part) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1)
        for step in boundaries:
            ax.axvline(step, color="grey", linestyle=":", linewidth=0.8)
        ax.set_ylabel(part)
        if k == len(parts) - 1:
            ax.set_xlabel("step")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- entry points


def write_report(run_dir: str | Path, results: dict[str, Any]) -> list[Path]:
    """Write results.json, report.md and the four PNGs into `run_dir`; return their paths.

    `metrics` and `stages` are computed when missing, so a dict with the raw fields is enough.
    """
    run_dir = Path(run_dir)
    missing = [k for k in ("tasks", "accuracy_matrix") if k not in results]
    if missing:
        raise GeReError(
            f"results lack {missing}; fill them (see gere.report's schema) before writing a report"
        )
    results = dict(results)
    results["accuracy_matrix"] = check_matrix(results["accuracy_matrix"])
    results.setdefault("stages", stage_names(results["tasks"]))
    if not results.get("metrics"):
        results["metrics"] = compute_metrics(
            results["accuracy_matrix"], results.get("test_sizes"), results.get("general")
        )
    paths = [run_dir / name for name in REPORT_FILES]
    atomic_write_json(paths[0], results)
    atomic_write_text(paths[1], render_markdown(results))
    plot_accuracy_matrix(results, paths[2])
    plot_task_accuracy(results, paths[3])
    plot_general(results, paths[4])
    plot_loss_parts(results, paths[5])
    return paths


def _final_perplexity(results: dict[str, Any]) -> float | None:
    general = results.get("general") or []
    ppl = (general[-1].get("perplexity") or {}) if general else {}
    return sum(ppl.values()) / len(ppl) if ppl else None


COMPARE_COLUMNS = ("AP", "AP weighted", "BWT", "FWT", "forgetting", "general score", "F1 Avg")


def compare_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Read each run's results.json and write ``comparison.md`` and ``comparison.png`` to `out_dir`.

    The table has one row per run: method, AP, AP weighted, BWT, FWT, forgetting, general score (all in
    %), final perplexity (mean over held-out sets), F1 Avg (%) and wall time (s).
    """
    if not run_dirs:
        raise GeReError("compare_runs needs at least one run folder; pass the folders holding results.json")
    runs = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "results.json"
        if not path.is_file():
            raise GeReError(f"{path} does not exist; pass run folders written by write_report")
        try:
            runs.append(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise GeReError(f"{path} is not valid JSON ({e}); rerun write_report for that run") from e
    header = [
        "method",
        "run",
        "AP",
        "AP weighted",
        "BWT",
        "FWT",
        "forgetting",
        "general score",
        "perplexity",
        "F1 Avg",
        "wall time (s)",
    ]
    rows, values = [], []
    for r in runs:
        m = r.get("metrics") or compute_metrics(r["accuracy_matrix"], r.get("test_sizes"), r.get("general"))
        numbers = [
            m.get("ap"),
            m.get("ap_weighted"),
            m.get("bwt"),
            m.get("fwt"),
            m.get("forgetting"),
            m.get("general_final"),
            m.get("f1_avg"),
        ]
        values.append(numbers)
        rows.append(
            [
                str(r.get("method", "?")),
                str(r.get("name", "")),
                *map(_pct, numbers[:6]),
                _num(_final_perplexity(r)),
                _pct(numbers[6]),
                _num((r.get("timing") or {}).get("total_s"), 1),
            ]
        )
    out_dir = Path(out_dir)
    md_path, png_path = out_dir / "comparison.md", out_dir / "comparison.png"
    text = "# Comparison of runs\n\nAll metrics in %, except perplexity (final stage) and wall time.\n\n"
    atomic_write_text(md_path, text + _table(header, rows) + "\n")

    fig = _new_figure(max(7.0, 1.2 * len(COMPARE_COLUMNS) + 0.4 * len(runs)), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    for k, (r, numbers) in enumerate(zip(runs, values, strict=True)):
        xs = [c + (k - (len(runs) - 1) / 2) * width for c in range(len(COMPARE_COLUMNS))]
        ax.bar(
            xs,
            [0.0 if v is None else 100 * v for v in numbers],
            width,
            label=f"{r.get('method', '?')} ({r.get('name', '')})",
        )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(COMPARE_COLUMNS)), COMPARE_COLUMNS, rotation=20)
    ax.set_ylabel("%")
    ax.set_title("Methods compared")
    ax.legend(fontsize=7)
    _save(fig, png_path)
    return [md_path, png_path]
