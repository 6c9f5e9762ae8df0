"""Continual-learning metrics on an accuracy matrix (pure functions, no I/O).

The accuracy matrix ``R`` has shape (T+1) x T for a sequence of T tasks:

* row 0 is the base model before any training, row i (1..T) the model after training task i;
* column j (0-based, in sequence order) is the accuracy on task j.

So, with 0-based column j, row ``j + 1`` is "just after training task j" and row ``j`` is "just before".
A cell may be None: not evaluated at that stage (``evaluation.schedule: needed``, `gere.continual.schedule`).
A metric that needs a missing cell is None, never filled in; forgetting takes its max over the cells present.
Accuracies are fractions in [0, 1]; every metric below is in the same units (differences of fractions),
and so is the general score and F1 Avg. Multiply by 100 for the percentages papers print.

GeRe (arXiv 2508.04676, Sec. 5) reports AP, BWT and forgetting of the task sequence, general ability,
and F1 Avg, the harmonic mean of the final general score and AP, to weigh both kinds of forgetting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gere.errors import GeReError


def check_matrix(matrix: Sequence[Sequence[float | None]]) -> list[list[float | None]]:
    """Validate a (T+1) x T accuracy matrix and return it as a list of lists of floats (None where a cell
    was not evaluated)."""
    rows = [[None if v is None else float(v) for v in row] for row in matrix]
    if len(rows) < 2:
        raise GeReError(
            f"the accuracy matrix has {len(rows)} row(s); it needs T+1 rows (the base model, then one per task)"
        )
    n_tasks = len(rows) - 1
    for i, row in enumerate(rows):
        if len(row) != n_tasks:
            raise GeReError(
                f"accuracy matrix row {i} has {len(row)} values but there are {n_tasks} tasks; give each row one "
                "accuracy per task (shape (T+1) x T)"
            )
        if not all(v is None or math.isfinite(v) for v in row):
            raise GeReError(
                f"accuracy matrix row {i} holds a non-finite value {row}; evaluate every task per stage"
            )
    return rows


def average_performance(matrix: Sequence[Sequence[float | None]], weights: Sequence[float] | None = None) -> float | None:
    """AP = mean_j R[T][j], the final accuracy averaged over tasks (the headline number).

    With `weights` (e.g. test sizes) it is ``sum_j w_j R[T][j] / sum_j w_j``, the accuracy over all test
    samples pooled. None when a final cell is missing.
    """
    rows = check_matrix(matrix)
    final = rows[-1]
    if None in final:
        return None  # a task not evaluated at the end: no mean over all tasks to give
    if weights is None:
        return sum(final) / len(final)
    if len(weights) != len(final) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise GeReError(
            f"weights {list(weights)} must be {len(final)} non-negative numbers with a positive sum"
        )
    return sum(w * a for w, a in zip(weights, final, strict=True)) / sum(weights)


def backward_transfer(matrix: Sequence[Sequence[float | None]]) -> float | None:
    """BWT = mean over j < T-1 of (R[T][j] - R[j+1][j]): final minus just-learned accuracy of each task
    but the last. Negative means forgetting. None when T = 1 or a cell it needs is missing."""
    rows = check_matrix(matrix)
    t = len(rows) - 1
    return _mean_of_differences([(rows[t][j], rows[j + 1][j]) for j in range(t - 1)])


def forward_transfer(matrix: Sequence[Sequence[float | None]]) -> float | None:
    """FWT = mean over j >= 1 of (R[j][j] - R[0][j]): accuracy on task j just before training it minus
    the base model's. None when T = 1 or a cell it needs is missing."""
    rows = check_matrix(matrix)
    t = len(rows) - 1
    return _mean_of_differences([(rows[j][j], rows[0][j]) for j in range(1, t)])


def _mean_of_differences(pairs: list[tuple[float | None, float | None]]) -> float | None:
    """mean(a - b) over ``pairs``; None when there are none or a value is missing."""
    if not pairs or any(a is None or b is None for a, b in pairs):
        return None
    return sum(a - b for a, b in pairs) / len(pairs)


def forgetting(matrix: Sequence[Sequence[float | None]]) -> float | None:
    """Forgetting = mean over j < T-1 of (max_{i in j+1..T-1} R[i][j] - R[T][j]): how far each task but
    the last fell from its best accuracy after it was learned (rows of the base model and of the final
    stage excluded from the max). None when T = 1.

    The max runs over the stages evaluated (cells not None): under ``evaluation.schedule: needed`` only
    R[j+1][j] is, so forgetting is -BWT there (`gere.continual.schedule`). None when a task has no such
    cell or no final one."""
    rows = check_matrix(matrix)
    t = len(rows) - 1
    best = [[rows[i][j] for i in range(j + 1, t) if rows[i][j] is not None] for j in range(t - 1)]
    return _mean_of_differences([(max(b) if b else None, rows[t][j]) for j, b in enumerate(best)])


def f1_average(general_score: float | None, ap: float | None) -> float | None:
    """F1 Avg = 2 g a / (g + a), the harmonic mean of the final general score g and AP a (same units).

    0 when either is 0; None when either is missing."""
    if general_score is None or ap is None:
        return None
    if general_score <= 0 or ap <= 0:
        return 0.0
    return 2 * general_score * ap / (general_score + ap)


@dataclass(frozen=True)
class MetricInfo:
    """One metric of a run, as every reader shows it: report.md, `gere compare`, sweeps' aggregates, the
    trackers' summary. A new metric is one entry of `METRICS` (and its value in `compute_metrics`)."""

    key: str  #: its key in results.json's ``metrics``
    label: str  #: its short name: table columns, plots, ``summary/<label>`` in the trackers, ``<label> %`` in sweeps
    described: str  #: its row in report.md
    higher_is_better: bool = True
    unit: str = "%"  #: fractions shown in percent; differences of two runs in percentage points


METRICS: tuple[MetricInfo, ...] = (
    MetricInfo("ap", "AP", "AP (mean final accuracy)"),
    MetricInfo("ap_weighted", "AP weighted", "AP, sample-weighted"),
    MetricInfo("bwt", "BWT", "BWT"),
    MetricInfo("fwt", "FWT", "FWT"),
    MetricInfo("forgetting", "forgetting", "Forgetting", higher_is_better=False),
    MetricInfo("general_final", "general", "General score (final)"),
    MetricInfo("f1_avg", "F1 Avg", "F1 Avg (general, AP)"),
)


#: A task whose accuracy right after its own training is less than this above the accuracy just before it
#: was not learned; its forgetting and transfer numbers then measure nothing.
LEARNED_MARGIN = 0.05


def not_learned(matrix: Sequence[Sequence[float | None]], margin: float = LEARNED_MARGIN) -> list[int]:
    """Columns j whose accuracy after training task j, R[j+1][j], is less than ``margin`` above R[j][j]
    (a column missing either cell is left out)."""
    rows = check_matrix(matrix)
    pairs = [(rows[j + 1][j], rows[j][j]) for j in range(len(rows) - 1)]
    return [j for j, (after, before) in enumerate(pairs)
            if after is not None and before is not None and after - before < margin]  # fmt: skip


def general_score(entry: dict[str, Any]) -> float | None:
    """One stage's general score (0-1, or None): the lm-eval score (`lm_eval_score`) when the run evaluates
    general ability with lm-evaluation-harness, the general suite's mean (`suite_score`) when it evaluates the
    suite, otherwise the multiple-choice accuracy (`mc_accuracy`)."""
    return next((entry[key] for key in GENERAL_SOURCES if key in entry), None)


#: Where a stage's general score comes from, by the key its entry holds, first found first taken.
GENERAL_SOURCES = ("lm_eval_score", "suite_score", "mc_accuracy")


def general_source(general: Sequence[dict[str, Any]] | None) -> str | None:
    """What a run's general score is, in words (``"suite: arc_easy, mmlu"``, ``"lm-eval: mmlu"``, ``"multiple
    choice"``), from the entries of its evaluated stages; None when it has none."""
    for entry in general or []:
        if "lm_eval_score" in entry:
            return "lm-eval: " + ", ".join(entry.get("lm_eval") or {})
        if "suite_score" in entry:
            return "suite: " + ", ".join(f"{n} ({s['n']})" for n, s in (entry.get("suite") or {}).items())
        if entry.get("mc_accuracy") is not None:
            return "multiple choice"
    return None


def general_scores(general: Sequence[dict[str, Any]] | None) -> list[float | None]:
    """The general score of each stage (`general_score`)."""
    return [general_score(entry) for entry in (general or [])]


def compute_metrics(
    matrix: Sequence[Sequence[float]],
    test_sizes: Sequence[int] | None = None,
    general: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """All metrics of a run as a JSON-ready dict.

    Args:
        matrix: (T+1) x T accuracy matrix, fractions in [0, 1].
        test_sizes: T test-set sizes, for the sample-weighted AP (None leaves it out).
        general: per-stage general-ability entries ``{"stage", "mc_accuracy", "perplexity": {...}}``.

    Returns ``{"units": "fraction", "num_tasks", "ap", "ap_weighted", "bwt", "fwt", "forgetting",
    "final_accuracy" [T], "learned_accuracy" [T] (R[j+1][j]), "not_learned" [column indices, see
    `not_learned`], "general_scores" [T+1 or 0], "general_final", "f1_avg"}``; undefined values are None.
    """
    rows = check_matrix(matrix)
    t = len(rows) - 1
    if test_sizes is not None and len(test_sizes) != t:
        raise GeReError(f"got {len(test_sizes)} test sizes for {t} tasks; give one test size per task")
    ap = average_performance(rows)
    scores = general_scores(general)
    general_final = scores[-1] if scores else None
    return {
        "units": "fraction",
        "num_tasks": t,
        "ap": ap,
        "ap_weighted": average_performance(rows, test_sizes) if test_sizes is not None else None,
        "bwt": backward_transfer(rows),
        "fwt": forward_transfer(rows),
        "forgetting": forgetting(rows),
        "final_accuracy": rows[t],
        "learned_accuracy": [rows[j + 1][j] for j in range(t)],
        "not_learned": not_learned(rows),
        "general_scores": scores,
        "general_final": general_final,
        "f1_avg": f1_average(general_final, ap),
    }
