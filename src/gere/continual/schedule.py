"""Which evaluations a continual run makes after each stage (``evaluation.schedule``).

Stages are numbered as the accuracy matrix's rows (`gere.continual.metrics`): stage 0 is the base model,
stage s (1..T) the model after training task s (1-based), so with 0-based column j, stage j is "just before
training task j" and stage j + 1 "just after".

* ``full``: every task and the general score after every stage, the whole (T+1) x T matrix: (T+1) T task
  evaluations and T+1 general ones. The default: it is what the metrics were defined on (forgetting's max
  over every stage in particular), an old run resumes unchanged, and a short sequence costs little.
* ``needed``: only the cells the headline metrics read, and None in the others:

  - stage 0 (base model): every task (FWT's R[0][j] for every j, and the column before task 1 trains);
  - stage s, 1 <= s < T: task s - 1 (just after its own training: BWT, learned accuracy) and task s (just
    before its own training: FWT);
  - stage T: every task (AP, BWT's final row, F1 Avg).

  That is 4T - 2 task evaluations instead of (T+1) T (54 instead of 210 for 14 tasks), and the general
  score (with its perplexities) at the base model, after the middle task (stage ceil(T/2)) and at the end:
  3 general evaluations instead of T+1.

AP, BWT, FWT, the learned accuracy, F1 Avg and the not-learned warning read only these cells, so they are
the same under both schedules (the same seed trains the same weights). Forgetting takes each task's best
accuracy over the stages evaluated after its training and before the last: under ``needed`` that is only the
stage just after its training, so forgetting equals -BWT there, a lower bound of the full matrix's value
(a task that rose after its own training and then fell shows its whole fall only under ``full``).
"""

from __future__ import annotations

SCHEDULES = ("full", "needed")


def tasks_at(schedule: str, stage: int, num_tasks: int) -> list[int]:
    """The 0-based task columns that ``schedule`` evaluates at ``stage`` (0 = base, s = after task s)."""
    _check(schedule, stage, num_tasks)
    if schedule == "full" or stage in (0, num_tasks):
        return list(range(num_tasks))
    return [stage - 1, stage]


def general_at(schedule: str, stage: int, num_tasks: int) -> bool:
    """Whether ``schedule`` evaluates general ability (probe, lm-eval, suite, perplexities) at ``stage``."""
    _check(schedule, stage, num_tasks)
    return schedule == "full" or stage in general_stages(num_tasks)


def general_stages(num_tasks: int) -> tuple[int, ...]:
    """``needed``'s general stages: the base model, after the middle task (ceil(T/2)) and after the last."""
    return tuple(sorted({0, (num_tasks + 1) // 2, num_tasks}))


def counts(schedule: str, num_tasks: int) -> dict[str, int]:
    """How many task and general evaluations a whole run of ``num_tasks`` tasks makes under ``schedule``."""
    stages = range(num_tasks + 1)
    return {
        "task_evaluations": sum(len(tasks_at(schedule, s, num_tasks)) for s in stages),
        "general_evaluations": sum(general_at(schedule, s, num_tasks) for s in stages),
    }


def _check(schedule: str, stage: int, num_tasks: int) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {SCHEDULES}")
    if num_tasks < 1 or not 0 <= stage <= num_tasks:
        raise ValueError(f"stage {stage} is outside 0..{num_tasks} for {num_tasks} tasks")
