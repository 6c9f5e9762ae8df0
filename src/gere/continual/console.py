"""What a continual run shows on the console, and what it keeps in its log file.

Quiet (the default): one progress bar per task with its loss parts, one line per stage with its accuracies,
general score and perplexities, then the caller's table. The Trainer's per-step log lines go to the run
folder's ``train_log.jsonl`` (one JSON object per logged step, as the Trainer logged it). Verbose
(``gere -v``, or `set_verbose`): the Trainer's own output as well, and INFO logging. Errors and warnings
reach the console either way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from gere.io_utils import atomic_write_text
from gere.parts import LOSS_PARTS, WEIGHTS

#: The Trainer's per-step log lines, one JSON object each, in the run folder.
TRAIN_LOG = "train_log.jsonl"

_VERBOSE = False


def set_verbose(verbose: bool) -> None:
    """Keep the Trainer's own per-step console output (``gere -v``); quiet otherwise."""
    global _VERBOSE
    _VERBOSE = bool(verbose)


class TaskProgress(TrainerCallback):
    """A progress bar for one task's training, its postfix the last logged loss parts; every log entry is
    appended to the run's ``train_log.jsonl``."""

    def __init__(self, label: str, log_file: Path, show: bool):
        self.label, self.log_file, self.show = label, log_file, show
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            drop_lines_of(self.log_file, self.label)
        if self.show and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, desc=self.label, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "a", encoding="utf-8") as stream:
            stream.write(json.dumps({"task": self.label, "step": state.global_step, **logs}) + "\n")
        if self.bar is not None:
            shown = {k: f"{logs[k]:.3g}" for k in ("loss", *LOSS_PARTS, *WEIGHTS) if isinstance(logs.get(k), float)}
            if shown:
                self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def drop_lines_of(log_file: Path, label: str) -> None:
    """Remove from ``log_file`` the lines of a stage that starts again (``label`` names one stage of one run),
    so that a stage interrupted and resumed is logged once. The file is rewritten whole, atomically."""
    if not log_file.is_file():
        return
    lines = log_file.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _task_of(line) != label]
    if len(kept) != len(lines):
        atomic_write_text(log_file, "".join(kept))


def _task_of(line: str) -> str | None:
    try:
        entry = json.loads(line)
    except ValueError:  # a line cut short by a kill: not this stage's to judge
        return None
    return entry.get("task") if isinstance(entry, dict) else None


def quiet_trainer(trainer, label: str, log_file: Path, show: bool):
    """Put ``trainer``'s console output in the quiet form (unless verbose): its own bar and per-step prints
    replaced by a `TaskProgress`; the log entries go to ``log_file`` either way."""
    if not _VERBOSE:
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    trainer.add_callback(TaskProgress(label, log_file, show and not _VERBOSE))
    return trainer


def stage_line(stage: str, tasks: list[str], accuracies: list[float], general: dict[str, Any]) -> str:
    """One line for a finished stage: each evaluated task's accuracy, the probe or lm-eval score, the
    perplexities (a task or general part the schedule left out is not shown)."""
    parts = [f"{t} {100 * a:.1f}" for t, a in zip(tasks, accuracies, strict=True) if a is not None]
    if general.get("mc_accuracy") is not None:
        parts.append(f"probe {100 * general['mc_accuracy']:.1f}")
    for name, value in (general.get("lm_eval") or {}).items():
        parts.append(f"{name} {100 * value:.1f}")
    if general.get("suite_score") is not None:
        parts.append(f"suite {100 * general['suite_score']:.1f}")
    parts += [f"ppl {k} {v:.1f}" for k, v in (general.get("perplexity") or {}).items()]
    return f"{stage}: " + " | ".join(parts)
