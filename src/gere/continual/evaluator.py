"""Evaluation of a continual run after every stage: every task's accuracy and general ability (multiple
choice, the general suite, lm-evaluation-harness tasks, held-out perplexity), with the sets read once per run."""

from __future__ import annotations

import logging
from typing import Any

from tqdm.auto import tqdm

from gere.continual.doubts import input_doubts
from gere.continual.evaluation import evaluate_task, perplexity
from gere.continual.general_suite import evaluate_suite, load_suite
from gere.continual.lm_eval_general import LmEvalGeneral
from gere.continual.multiple_choice import evaluate_multiple_choice, load_multiple_choice
from gere.continual.run_config import RunConfig
from gere.continual.tasks import TaskData
from gere.errors import GeReError, shown
from gere.faults import maybe_fail
from gere.replay.replay_set import bounded_text, load_replay_records

logger = logging.getLogger(__name__)


def _perplexity_texts(name: str, path: str, limit: int | None) -> list[str]:
    """The texts of one held-out set; a set that yields none is an error naming it and its file."""
    texts = [text for _, text in load_replay_records(
        path, what=f"evaluation.perplexity_sets.{name}: perplexity set {shown(name)}",
        field_fix=f"evaluation.perplexity_sets.{name} reads each text from the field 'text'; write them there")]  # fmt: skip
    texts = texts[:limit] if limit else texts
    if not any(t.strip() for t in texts):
        raise GeReError(f"evaluation.perplexity_sets.{name}: {path} holds no texts, so its perplexity would be "
                        "empty; add texts or remove the set")  # fmt: skip
    return texts


class Evaluator:
    """Evaluates every task and general ability; built once per run."""

    def __init__(self, cfg: RunConfig, tasks: list[TaskData]):
        self.cfg, self.tasks = cfg, tasks
        ev = cfg.evaluation
        self.mc = load_multiple_choice(ev.general_mc, limit=ev.mc_limit) if ev.general_mc else None
        self.mc_dev = load_multiple_choice(ev.mc_dev) if ev.mc_dev else None
        lm_tasks = ev.lm_eval_task_names
        batch_size = ev.batch_size if ev.lm_eval_batch_size is None else ev.lm_eval_batch_size
        self.lm_eval = lm_tasks and LmEvalGeneral(lm_tasks, ev.lm_eval_include_path, ev.lm_eval_metric,
                                                  ev.lm_eval_num_fewshot, ev.lm_eval_limit, batch_size)  # fmt: skip
        if self.lm_eval:
            self.lm_eval.check_tasks()  # a missing task is found now, before the store is extracted
        if self.mc is not None and not self.mc:
            raise GeReError(f"evaluation.general_mc: {ev.general_mc} holds no questions, so the general score would "
                            "be empty; add questions or leave general_mc unset")  # fmt: skip
        if ev.mc_shots and self.mc is not None and not self.mc_dev:
            raise GeReError(f"evaluation.mc_shots = {ev.mc_shots} needs solved examples: set evaluation.mc_dev to a "
                            "file holding some (or mc_shots: 0)")  # fmt: skip
        # The suite's questions, read and sampled once (the same at every stage); a missing file stops now.
        self.suite = (load_suite(ev.general_suite_names, ev.suite_dir(), ev.suite_limits(), ev.general_suite_seed)
                      if ev.general_suite_names else None)  # fmt: skip
        self.ppl_sets = {name: _perplexity_texts(name, path, ev.perplexity_limit)
                         for name, path in ev.perplexity_sets.items()}  # fmt: skip
        # Inputs that work but are probably not meant: logged when the run starts, listed in report.md.
        self.doubts = input_doubts(cfg, tasks, self.mc)
        for line in self.doubts:
            logger.warning("%s: %s", cfg.name, line)

    def check(self, tokenizer) -> None:
        """Refuse, before any work, a perplexity set with no text of two tokens or more (the first token of a
        text is context only, so shorter texts have nothing to score)."""
        ev = self.cfg.evaluation
        for name, texts in self.ppl_sets.items():
            usable = sum(len(tokenizer(bounded_text(t, ev.perplexity_max_length))["input_ids"]) >= 2 for t in texts)
            if not usable:
                raise GeReError(
                    f"evaluation.perplexity_sets.{name} ({ev.perplexity_sets[name]}): none of its {len(texts)} "
                    "text(s) is two tokens or longer, so there is nothing to score; give longer texts or remove the set"
                )

    def __call__(self, model, tokenizer, stage: str, progress: bool, only: list[int] | None = None,
                 general_part: bool = True) -> dict[str, Any]:  # fmt: skip
        """Each task's accuracy (None for a task index not in ``only``, when given) and the general part (only
        ``{"stage", "evaluated": False}`` without ``general_part``); `gere.continual.schedule` picks both."""
        ev = self.cfg.evaluation
        accuracies: list[float | None] = []
        chosen = set(range(len(self.tasks)) if only is None else only)
        bar = tqdm(total=len(chosen), desc=f"evaluate {stage}", disable=not progress, leave=False)
        for index, task in enumerate(self.tasks):
            if index not in chosen:
                accuracies.append(None)
                continue
            bar.update()
            examples = task.test[: ev.test_limit] if ev.test_limit else task.test
            result = evaluate_task(
                model, tokenizer, task.spec, examples, method=ev.method, batch_size=ev.batch_size, max_length=ev.max_length
            )
            accuracies.append(result["accuracy"])
            maybe_fail("evaluate_task")  # crash tests (gere.faults); a no-op unless GERE_FAULT is set
        bar.close()
        if not general_part:
            return {"accuracies": accuracies, "general": {"stage": stage, "evaluated": False}}
        general: dict[str, Any] = {"stage": stage, "mc_accuracy": None, "mc_per_category": {}, "perplexity": {}}
        if self.mc:
            mc = evaluate_multiple_choice(
                model, tokenizer, self.mc, shots=ev.mc_shots, dev_questions=self.mc_dev, batch_size=ev.batch_size,
                mc_format=ev.mc_format,
            )  # fmt: skip
            general["mc_accuracy"], general["mc_per_category"] = mc["accuracy"], mc["per_category"]
            if "accuracy_sum" in mc:  # cloze: the summed log-likelihood's pick, beside the per-character one
                general["mc_accuracy_sum"] = mc["accuracy_sum"]
        if self.lm_eval:
            general.update(self.lm_eval(model, tokenizer))
        if self.suite:
            general.update(evaluate_suite(model, tokenizer, self.suite, batch_size=ev.batch_size,
                                          max_length=ev.general_suite_max_length))  # fmt: skip
        for name, texts in self.ppl_sets.items():
            general["perplexity"][name] = perplexity(
                model, tokenizer, texts, max_length=ev.perplexity_max_length, batch_size=ev.batch_size
            )
        return {"accuracies": accuracies, "general": general}
