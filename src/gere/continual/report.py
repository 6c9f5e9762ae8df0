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
         "perplexity": {"<held-out set name>": float},
         "lm_eval": {"<task>": float}, "lm_eval_score": float,   # with evaluation.general: lm_eval:...
         "suite": {"<benchmark>": {"n", "metric", "score", "score_stderr", "acc", ...}},
         "suite_score": float, "suite_stderr": float}             # with evaluation.general: suite
      ],
      "input_warnings": [str],          # doubts about the inputs (gere.continual.doubts), in report.md
      "metrics": {...},                 # gere.continual.metrics.compute_metrics output
      "loss_history": [                 # one row per logged step; keys gere.parts.LOGGED
        {"step": int, "task": str, "loss": float, "task_ce": float, "replay_ce": float | None,
         "replay_margin": float | None, "margin_weight": float | None, "replay_kl": ..., ...}
      ],
      "timing": {"total_s": float, "per_task_s": [float], "eval_s": float},
      "evaluations": {"schedule": "full" | "needed", "task_evaluations": int, "task_cells": int,
                      "general_evaluations": int, "stages": int}   # written by the runner
    }

A cell of ``accuracy_matrix`` is None where the run's ``evaluation.schedule`` left it out
(`gere.continual.schedule`), and so is a metric that needs it; such a stage's ``general`` entry is
``{"stage": str, "evaluated": false}``.

Every file is written atomically; the plots are `gere.continual.plots`, a comparison of runs is
`gere.continual.compare`. The names of the logged loss parts come from `gere.parts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gere.continual.metrics import LEARNED_MARGIN, METRICS, check_matrix, compute_metrics, not_learned
from gere.continual.plots import (
    grad_share_series,
    perplexity_sets,
    plot_accuracy_matrix,
    plot_general,
    plot_grad_share,
    plot_loss_parts,
    plot_task_accuracy,
    stage_names,
)
from gere.errors import GeReError
from gere.io_utils import atomic_write_json, atomic_write_text

REPORT_FILES = (
    "results.json",
    "report.md",
    "accuracy_matrix.png",
    "task_accuracy.png",
    "general.png",
    "loss_parts.png",
)


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


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def learning_warnings(results: dict[str, Any]) -> list[str]:
    """One line per task that its own training did not teach (see `gere.continual.metrics.not_learned`), and
    one when the replay set is smaller than asked for."""
    tasks, matrix = results["tasks"], results["accuracy_matrix"]
    lines = []
    replay = results.get("replay_set") or {}
    if replay and replay["used"] < replay["requested"]:
        lines.append(f"the replay source held {replay['used']} texts, fewer than the {replay['requested']} asked for "
                     "(num_replay_samples); all of them were replayed")  # fmt: skip
    for j in not_learned(matrix):
        lines.append(
            f"task {tasks[j]!r} was not learned: {pct(matrix[j][j])}% before its training, "
            f"{pct(matrix[j + 1][j])}% after (less than {100 * LEARNED_MARGIN:.0f} points gained); AP, BWT "
            "and forgetting then say little about it. Train it longer or with a higher learning rate"
        )
    return lines


def _schedule_note(results: dict[str, Any]) -> list[str]:
    """What a matrix with cells left out holds (``evaluation.schedule: needed``, `gere.continual.schedule`)."""
    made = results.get("evaluations") or {}
    if not any(v is None for row in results["accuracy_matrix"] for v in row):
        return []
    counted = (f" {made['task_evaluations']} of {made['task_cells']} cells and the general score at "
               f"{made['general_evaluations']} of {made['stages']} stages were evaluated"
               f" (evaluation.schedule: {made['schedule']})." if made else "")  # fmt: skip
    return ["", "`-`: not evaluated at that stage." + counted + " Forgetting is taken over the stages evaluated; "
            "with only the stage after each task's own training it equals -BWT."]  # fmt: skip


def _general_section(results: dict[str, Any]) -> list[str]:
    """The report's table of general ability per stage (lm-eval tasks, multiple choice, perplexities)."""
    general = results.get("general") or []
    if not general:
        return []
    ppl_sets = perplexity_sets(results)
    categories = sorted({c for e in general for c in (e.get("mc_per_category") or {})})
    lm_tasks = list(dict.fromkeys(t for e in general for t in (e.get("lm_eval") or {})))
    suite = list(dict.fromkeys(b for e in general for b in (e.get("suite") or {})))
    with_mc = any(e.get("mc_accuracy") is not None for e in general) or not suite
    header = ["stage", *[f"lm-eval {t} (%)" for t in lm_tasks],
              *(["suite mean (%)", *[f"{b} (%)" for b in suite]] if suite else []),
              *(["MC accuracy (%)", *[f"{c} (%)" for c in categories]] if with_mc else []),
              *[f"ppl {p}" for p in ppl_sets]]  # fmt: skip
    rows = []
    for entry in general:
        per_cat, ppl, lm = entry.get("mc_per_category") or {}, entry.get("perplexity") or {}, entry.get("lm_eval") or {}
        rows.append([entry.get("stage", ""), *[pct(lm.get(t)) for t in lm_tasks], *_suite_cells(entry, suite),
                     *([pct(entry.get("mc_accuracy")), *[pct(per_cat.get(c)) for c in categories]] if with_mc else []),
                     *[num(ppl.get(p)) for p in ppl_sets]])  # fmt: skip
    return ["", "## General ability per stage", "", table(header, rows), *_suite_note(general, suite)]


def _suite_cells(entry: dict[str, Any], suite: list[str]) -> list[str]:
    """A stage's suite cells: the mean and each benchmark's score, in % with its standard error."""
    if not suite:
        return []
    scores = entry.get("suite") or {}
    if "suite_score" not in entry:
        return ["-"] * (len(suite) + 1)
    mean = f"{pct(entry['suite_score'])} ± {100 * entry['suite_stderr']:.1f}"
    return [mean, *[f"{pct(scores[b]['score'])} ± {100 * scores[b]['score_stderr']:.1f}" if b in scores else "-"
                    for b in suite]]  # fmt: skip


def _suite_note(general: list[dict[str, Any]], suite: list[str]) -> list[str]:
    """What the suite's numbers are: each benchmark's metric and question count (docs/general_suite.md)."""
    if not suite:
        return []
    last = next(e["suite"] for e in reversed(general) if e.get("suite"))
    each = ", ".join(f"{b} {last[b]['metric']} on {last[b]['n']}" for b in suite if b in last)
    return ["", f"Suite: {each} questions, scored as lm-eval 0.4.13 scores them; ± one standard error (binomial); "
            "the mean weighs benchmarks equally. LAMBADA's perplexity per stage is in results.json."]  # fmt: skip


def _grad_share_section(results: dict[str, Any]) -> list[str]:
    """Per task and loss part: the median gradient norm and cosine with the total over the measured steps,
    and the norm at the task's first measured step (where a dynamic weight is largest)."""
    series = grad_share_series(results)
    if not series["norm"]:
        return []
    task_of = {h["step"]: h.get("task") for h in results.get("loss_history") or []}
    rows = []
    for task in results["tasks"]:
        for part, points in series["norm"].items():
            norms = [v for s, v in points if task_of.get(s) == task]
            cosines = [v for s, v in series["cos"].get(part, []) if task_of.get(s) == task]
            if norms:
                rows.append([task, part, num(median(norms), 3), num(median(cosines), 3) if cosines else "-",
                             num(norms[0], 3)])  # fmt: skip
    return ["", "## Gradient share (diagnostic)", "",
            "Each weighted loss part's gradient norm on the trainable parameters and its cosine with the total "
            "gradient, over the measured steps (`grad_share.png` plots every step).", "",
            table(["task", "part", "median norm", "median cosine", "first measured norm"], rows)]  # fmt: skip


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def render_markdown(results: dict[str, Any]) -> str:
    """The text of report.md: accuracy matrix, metrics, general ability per stage, timing."""
    tasks, matrix, m = results["tasks"], results["accuracy_matrix"], results["metrics"]
    stages = results.get("stages") or stage_names(tasks)
    parts = [f"# {results.get('name', 'run')} ({results.get('method', '?')})", ""]
    warnings = [*(results.get("input_warnings") or []), *learning_warnings(results)]
    if warnings:
        parts += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    parts += [
        "## Accuracy matrix (%)",
        "",
        "Row = stage (model after training that task), column = task.",
        "",
    ]
    parts.append(
        table(["stage", *tasks], [[s, *map(pct, row)] for s, row in zip(stages, matrix, strict=True)])
    )
    parts += _schedule_note(results)
    parts += ["", "## Metrics (%)", ""]
    parts.append(table(["metric", "value"], [[info.described, pct(m.get(info.key))] for info in METRICS]))
    parts += _general_section(results)
    parts += _grad_share_section(results)
    timing = results.get("timing") or {}
    if timing:
        per_task = timing.get("per_task_s") or []
        rows = [["total", num(timing.get("total_s"), 1)], ["evaluation", num(timing.get("eval_s"), 1)]]
        rows += [[f"train {t}", num(s, 1)] for t, s in zip(tasks, per_task, strict=False)]
        parts += ["", "## Timing (s)", "", table(["part", "seconds"], rows)]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------- entry points


def write_report(run_dir: str | Path, results: dict[str, Any]) -> list[Path]:
    """Write the four PNGs, report.md and then results.json into `run_dir`; return their paths
    (`REPORT_FILES`' order).

    `metrics` and `stages` are computed when missing, so a dict with the raw fields is enough.
    """
    run_dir = Path(run_dir)
    missing = [k for k in ("tasks", "accuracy_matrix") if k not in results]
    if missing:
        raise GeReError(
            f"results lack {missing}; fill them (see gere.continual.report's schema) before writing a report"
        )
    results = dict(results)
    results["accuracy_matrix"] = check_matrix(results["accuracy_matrix"])
    results.setdefault("stages", stage_names(results["tasks"]))
    if not results.get("metrics"):
        results["metrics"] = compute_metrics(
            results["accuracy_matrix"], results.get("test_sizes"), results.get("general")
        )
    paths = [run_dir / name for name in REPORT_FILES]
    # results.json last: it marks the run finished (a sweep skips such a run), so it must vouch for the
    # report and the plots written before it. A kill in between leaves no results.json: the run is redone.
    plot_accuracy_matrix(results, paths[2])
    plot_task_accuracy(results, paths[3])
    plot_general(results, paths[4])
    plot_loss_parts(results, paths[5])
    extra = plot_grad_share(results, run_dir / "grad_share.png")
    atomic_write_text(paths[1], render_markdown(results))
    atomic_write_json(paths[0], results)
    return paths + ([extra] if extra else [])
