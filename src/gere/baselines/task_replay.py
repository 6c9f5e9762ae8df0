"""Experience replay of earlier tasks: a buffer of N training examples per finished task.

After each task, ``per_task`` of its training examples join the buffer, chosen ``first`` (the first N) or
by ``reservoir`` sampling (Algorithm R over the task's training examples in order, seeded by the run's
task-replay seed and the task's position). While later tasks train, the buffer's examples, each formatted
with its own task's prompt, join training in one of the three ways the general replay set can
(`gere.baselines.settings.TASK_REPLAY_MIXINGS`):

- ``concat``: appended to the new task's training examples and shuffled with them;
- ``interpolate``: exactly ``per_batch`` buffered examples inside every global batch, the rest task
  examples (`interpolating_sampler`, the batch-interpolation sampler of the general replay set);
- ``batch``: a separate batch of ``batch_size`` buffered examples with every micro-batch, its
  cross-entropy added to the loss as the part ``task_replay_ce`` (`SeparateBufferBatches`).

The buffer is a list of (task, example) positions, saved with every checkpoint (``task_replay.json``), so
``--resume`` trains on exactly the buffer it stopped with.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch

from gere.baselines.base import Baseline, Stage
from gere.baselines.settings import TaskReplaySettings
from gere.batching import model_device
from gere.config import global_batch_size
from gere.errors import GeReError
from gere.io_utils import atomic_write_json
from gere.reading import read_json
from gere.replay.batches import SeparateReplayBatches
from gere.replay.sampler import BatchInterpolationSampler

FILE = "task_replay.json"


def select(count: int, n: int, selection: str, seed: int) -> list[int]:
    """Positions of the ``n`` examples (of ``count``) that join the buffer, in ascending order; ``selection``:
    ``first`` or ``reservoir`` (checked by `TaskReplaySettings`)."""
    if selection == "first" or n >= count:
        return list(range(min(n, count)))
    rng = random.Random(seed)
    reservoir = list(range(n))
    for i in range(n, count):  # Algorithm R: item i replaces a random slot with probability n / (i + 1)
        j = rng.randint(0, i)
        if j < n:
            reservoir[j] = i
    return sorted(reservoir)


class TaskReplayBuffer:
    """The (task position, example position) pairs replayed into later tasks."""

    def __init__(self, per_task: int, selection: str = "reservoir", seed: int = 0):
        TaskReplaySettings(per_task=per_task, selection=selection, seed=seed)  # its rules, written once
        if per_task < 1:
            raise GeReError(f"task_replay.per_task must be 1 or more (got {per_task}); leave it 0 to turn replay off")
        self.per_task, self.selection, self.seed = per_task, selection, seed
        self.entries: list[tuple[int, int]] = []

    def add_task(self, task: int, count: int) -> None:
        """Add the chosen examples of finished task ``task`` (which has ``count`` training examples)."""
        seed = self.seed * 1_000_003 + task
        self.entries += [(task, i) for i in select(count, self.per_task, self.selection, seed)]

    def examples(self, train_sets: Sequence[Sequence]) -> list[tuple[int, object]]:
        """``(task position, example)`` for every buffered example, given each task's training examples."""
        return [(t, train_sets[t][i]) for t, i in self.entries]

    def save(self, folder: Path) -> None:
        atomic_write_json(Path(folder) / FILE, {"per_task": self.per_task, "selection": self.selection,
                                                "seed": self.seed, "entries": self.entries})  # fmt: skip

    def load(self, folder: Path) -> None:
        path = Path(folder) / FILE
        if not path.exists():
            raise GeReError(f"{path} is missing: this checkpoint was written without task replay; start over with --overwrite")
        self.entries = [tuple(e) for e in read_json(path, what="task-replay buffer")["entries"]]


def stage_seed(seed: int, task: int) -> int:
    """The seed of the buffer's draws while task ``task`` (0-based) trains."""
    return seed * 1_000_003 + 7 * task + 1


def interpolating_sampler(num_task: int, num_buffered: int, per_batch: int, per_device: int, accumulation: int,
                          seed: int, world_size: int | None = None):  # fmt: skip
    """Indices of ``[task rows..., buffered rows...]`` with exactly ``per_batch`` buffered rows in every global
    batch (at random positions), for a dataset that lists the task's rows, then the buffer's. The global
    batch counts every process (`gere.config.global_batch_size`; ``world_size`` defaults to the
    launched processes), as the Trainer's data loader hands each process its share of it."""
    global_batch = global_batch_size(per_device, accumulation, world_size)
    return BatchInterpolationSampler(num_task, num_buffered, per_batch, global_batch, seed=seed, placement="random")


class SeparateBufferBatches:
    """A loss part (`gere.trainer.GeReMixin` ``penalties=``): the cross-entropy of a batch of ``batch_size``
    buffered rows, drawn afresh with every micro-batch from one seeded order (each row once before any
    repeats), collated by ``collator``."""

    name = "task_replay_ce"

    def __init__(self, rows: Sequence[dict], batch_size: int, collator, seed: int):
        if not rows:
            raise GeReError("the task-replay buffer is empty: there is nothing to draw a separate batch from")
        TaskReplaySettings(batch_size=batch_size)  # its rules, written once
        self.rows, self.collator = list(rows), collator
        self._draws = SeparateReplayBatches(len(self.rows), batch_size, seed)

    def __call__(self, model) -> torch.Tensor:
        batch = self.collator([self.rows[i] for i in self._draws.next()])
        device = model_device(model)
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        return model(**inputs, use_cache=False).loss


class TaskReplay(Baseline):
    """Task replay in a continual run (the ``task_replay:`` section): each later task's training gets the
    buffer's examples, in their own tasks' prompts, mixed in as ``mixing`` says; after each task its chosen
    examples join the buffer, which every checkpoint holds."""

    def __init__(self, settings):
        self.settings = settings
        self.buffer = TaskReplayBuffer(settings.per_task, settings.selection, settings.seed)
        self._buffered: list[dict] = []
        self._num_task = 0

    settings_class = TaskReplaySettings

    @classmethod
    def from_settings(cls, settings: TaskReplaySettings, cfg) -> TaskReplay:
        return cls(settings)

    def train_rows(self, stage: Stage) -> list[dict]:
        self._buffered = []
        for t, example in self.buffer.examples(stage.train_sets):
            self._buffered += stage.features(t, [example])
        self._num_task = len(stage.rows)
        if self._buffered and self.settings.mixing in ("concat", "interpolate"):
            return stage.rows + self._buffered
        return stage.rows

    def train_sampler(self, stage: Stage):
        s, t = self.settings, stage.training
        if not self._buffered or s.mixing != "interpolate":
            return None
        return interpolating_sampler(self._num_task, len(self._buffered), s.per_batch, t.per_device_train_batch_size,
                                     t.gradient_accumulation_steps, stage_seed(s.seed, stage.index))  # fmt: skip

    def loss_parts(self, stage: Stage) -> list:
        s = self.settings
        if not self._buffered or s.mixing != "batch":
            return []
        return [SeparateBufferBatches(self._buffered, s.batch_size, stage.collator, stage_seed(s.seed, stage.index))]

    def after_task(self, stage: Stage) -> list[dict]:
        self.buffer.add_task(stage.index, len(stage.train_sets[stage.index]))
        return []

    def save(self, folder: Path) -> None:
        self.buffer.save(folder)

    def load(self, folder: Path) -> None:
        self.buffer.load(folder)
