"""General ability through lm-evaluation-harness, scored on the in-memory model after every stage.

``evaluation.general: lm_eval:mmlu`` (several tasks comma-separated) evaluates the model being trained,
LoRA adapters included, with lm-evaluation-harness (``pip install 'gere[eval]'``), so that the general
scores of a run are comparable with published ones. Task YAMLs in ``evaluation.lm_eval_include_path``
(``dataset_path: json`` with ``data_files``) run offline; hub tasks such as MMLU need the network or a warm
`datasets` cache. A stage's general score is the mean over the tasks of each task's
``evaluation.lm_eval_metric`` (default ``acc``); it becomes the general score of the run's metrics and
F1 Avg, while the built-in multiple-choice set and perplexities, when configured, are still reported.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gere.errors import GeReError, shown

PREFIX = "lm_eval:"


def lm_eval_tasks(general: str) -> list[str] | None:
    """The lm-eval task names of an ``evaluation.general`` value, or None for the built-in ``mc`` and the
    general ``suite``."""
    if general in ("mc", "suite"):
        return None
    if not general.startswith(PREFIX):
        raise GeReError(
            f"evaluation.general={shown(general)} is not 'mc', 'suite' or 'lm_eval:<task,...>'; for example "
            "general: lm_eval:mmlu, general: suite for the benchmarks of evaluation.general_suite, or general: mc "
            "for the built-in multiple-choice set (general_mc)"
        )
    tasks = [t.strip() for t in general[len(PREFIX) :].split(",") if t.strip()]
    if not tasks:
        raise GeReError(f"evaluation.general={shown(general)} names no task; write lm_eval:<task>[,<task>...]")
    return tasks


@contextmanager
def _kept_rng_state():
    """lm-eval may draw from (and, unless told otherwise, reseed) the global generators; training after an
    evaluation must see the same random state as without it."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


class LmEvalGeneral:
    """Runs lm-eval tasks on a model object; the task index is built once, on first use (seconds)."""

    def __init__(
        self,
        tasks: list[str],
        include_path: str | None = None,
        metric: str = "acc",
        num_fewshot: int | None = None,
        limit: int | None = None,
        batch_size: int | str = 16,
    ):
        try:
            import lm_eval  # noqa: F401
        except ImportError as err:
            raise GeReError(
                f"evaluation.general=lm_eval:{','.join(tasks)} needs lm-evaluation-harness; "
                "pip install 'gere[eval]' (or lm-eval[hf]), or set evaluation.general: mc"
            ) from err
        if include_path and not Path(include_path).expanduser().is_dir():
            raise GeReError(f"evaluation.lm_eval_include_path {include_path} is not a folder; point it at the folder "
                            "of your lm-eval task YAMLs (a relative path is read from the run config's folder)")  # fmt: skip
        self.tasks, self.include_path, self.metric = tasks, include_path, metric
        self.num_fewshot, self.limit, self.batch_size = num_fewshot, limit, batch_size
        self._manager = None

    def check_tasks(self) -> None:
        """Build lm-eval's task index now (seconds) and refuse task names it does not hold."""
        self._task_manager()

    def _task_manager(self):
        if self._manager is None:
            from lm_eval.tasks import TaskManager

            self._manager = TaskManager(include_path=self.include_path)
            known = set(self._manager.all_tasks)
            unknown = [t for t in self.tasks if t not in known]
            if unknown:
                where = f" or in {self.include_path}" if self.include_path else ""
                raise GeReError(
                    f"lm-eval task(s) {unknown} not found among lm-eval's tasks{where}; check the names, or "
                    "point evaluation.lm_eval_include_path at the folder of your task YAMLs"
                )
        return self._manager

    def __call__(self, model, tokenizer) -> dict[str, Any]:
        """``{"lm_eval": {task: score}, "lm_eval_score": mean}`` for the model as it is now."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        from gere.batching import eval_mode

        manager = self._task_manager()
        with eval_mode(model), _kept_rng_state():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
            out = lm_eval.simple_evaluate(
                model=lm, tasks=list(self.tasks), task_manager=manager, num_fewshot=self.num_fewshot,
                limit=self.limit, log_samples=False, bootstrap_iters=0,
                random_seed=None, numpy_random_seed=None, torch_random_seed=None,
            )  # fmt: skip
        scores = {}
        for task in self.tasks:
            row = out["results"].get(task) or {}
            key = f"{self.metric},none"
            if key not in row:
                have = sorted({k.split(",")[0] for k in row if "," in k and "stderr" not in k})
                raise GeReError(
                    f"lm-eval task {shown(task)} reports no {shown(self.metric)} (it reports {have}); set "
                    "evaluation.lm_eval_metric to one of those"
                )
            scores[task] = float(row[key])
        return {"lm_eval": scores, "lm_eval_score": sum(scores.values()) / len(scores)}
