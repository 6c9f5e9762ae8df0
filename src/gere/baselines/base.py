"""The one interface of a continual-learning baseline, and what a continual run shows it of each task.

A baseline is a module of `gere.baselines` with a subclass of `Baseline` that names its run-config section's
settings (`Baseline.settings_class`, in `gere.baselines.settings`: the section, its label in method names, its loss
parts and its "on" rule), registered in `gere.baselines.registry.BASELINES`. A continual run
(`gere.continual.runner`) builds the run's baselines with `Baseline.from_config` (``None``: off in this run)
and, for every task, calls each of them in registration order:

1. `train_rows`: the task's training rows, changed or added to (earlier tasks' examples, an index column);
2. `before_task`: set-up on the model and the final rows (a new adapter, the previous stage's targets);
3. `train_sampler` (at most one baseline gives one) and `loss_parts`, handed to `gere.trainer.GeReTrainer`
   (``train_sampler=``, ``penalties=``); a loss part that reads batch columns of its own names them in
   ``columns``, and the trainer carries them past its collator;
4. after training, `after_task`, then `save` into the stage's checkpoint folder.

When a run resumes, `resume` runs before the checkpoint's weights load (to shape the model for them) and
`load` after. `before_task` and `after_task` may return report rows: mappings the run keeps, per stage,
under ``baselines`` in its results. Adding a baseline: its module (its class with ``settings_class``
and `from_settings`), its settings (in `gere.baselines.settings`, listed in ``BASELINE_SETTINGS``, and a section in
`gere.continual.run_config.RunConfig`), and its class in `BASELINES`; docs/baselines.md shows one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar


@dataclass
class Stage:
    """One task of a continual run, as the baselines' hooks see it."""

    index: int  # the task's position in the sequence, 0-based
    num_tasks: int
    cfg: Any  # the run's `gere.continual.run_config.RunConfig`
    model: Any
    tokenizer: Any
    train_sets: Sequence[Sequence]  # every task's training examples, in task order
    collator: Callable  # batches the task's training rows
    features: Callable[
        [int, list], list[dict]
    ]  # (task position, examples) -> training rows in that task's prompt
    training: Any  # this task's `gere.continual.training_settings.TrainingSettings`
    rows: list[dict]  # the training rows as they stand (after `train_rows`: what the trainer trains on)


class Baseline:
    """A continual-learning method beside GeRe replay; every hook does nothing unless a baseline says so."""

    #: Its run-config section's settings class (`gere.baselines.settings`): the section, label, parts, "on" rule.
    settings_class: ClassVar[type]

    @classmethod
    def from_config(cls, cfg) -> Baseline | None:
        """The baseline as run config ``cfg`` (a `RunConfig`, its settings checked) sets it up; ``None`` if its
        section's `on` rule says it is off."""
        settings = getattr(cfg, cls.settings_class.section)
        return cls.from_settings(settings, cfg) if settings.on(cfg) else None

    @classmethod
    def from_settings(cls, settings, cfg) -> Baseline:
        """The baseline built from its section's ``settings`` (on) and, where it needs more, run config ``cfg``."""
        raise NotImplementedError

    def resume(self, model, stages_done: int) -> None:
        """Before the weights of the checkpoint after ``stages_done`` tasks load into ``model``."""

    def train_rows(self, stage: Stage) -> list[dict]:
        """The rows task ``stage.index`` trains on, given ``stage.rows``."""
        return stage.rows

    def before_task(self, stage: Stage) -> list[dict]:
        """Set-up before the task trains on ``stage.rows``; report rows."""
        return []

    def train_sampler(self, stage: Stage):
        """A `torch.utils.data.Sampler` over ``stage.rows`` replacing the Trainer's shuffling, or ``None``."""
        return None

    def loss_parts(self, stage: Stage) -> list[Callable]:
        """Loss parts added while the task trains (see `gere.trainer.GeReMixin`, ``penalties=``)."""
        return []

    def after_task(self, stage: Stage) -> list[dict]:
        """After the task trained on ``stage.rows`` (the model is trained); report rows."""
        return []

    def save(self, folder: Path) -> None:
        """Write the state a resumed run needs into a stage's checkpoint folder."""

    def load(self, folder: Path) -> None:
        """Read what `save` wrote."""
