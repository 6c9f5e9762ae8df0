"""How replay samples travel to the model: interpolated datasets, collators, and padded replay batches.

Batch interpolation (``num_interpolate_per_batch = k``) lays the training data out as ``[task samples...,
replay placeholders...]`` and lets `gere.replay.sampler.BatchInterpolationSampler` put exactly k replay
placeholders in every global batch; the collator passes their indices on, and the trainer turns them into
a padded replay batch (`replay_batch`). Without interpolation, `SeparateReplayBatches` draws a replay batch
to go with every micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from gere.batching import IGNORE_INDEX, pad_batch
from gere.replay.sampler import BatchInterpolationSampler, ReplayOrder

REPLAY_INDEX = "gere_replay_index"


class InterpolatedDataset(Dataset):
    """Task samples followed by replay placeholders (``{"gere_replay_index": i}``)."""

    def __init__(self, task_dataset, num_replay: int):
        self.task_dataset, self.num_task, self.num_replay = task_dataset, len(task_dataset), num_replay

    def __len__(self) -> int:
        return self.num_task + self.num_replay

    def __getitem__(self, index: int):
        if index < self.num_task:
            return self.task_dataset[index]
        return {REPLAY_INDEX: index - self.num_task}


class InterpolatingCollator:
    """Collates task rows with the user's collator and passes replay rows on as indices."""

    def __init__(self, task_collator):
        self.task_collator = task_collator

    def __call__(self, features):
        task = [f for f in features if REPLAY_INDEX not in f]
        replay = [int(f[REPLAY_INDEX]) for f in features if REPLAY_INDEX in f]
        batch = dict(self.task_collator(task)) if task else {}
        batch[REPLAY_INDEX] = torch.tensor(replay, dtype=torch.long)
        return batch


class EvenLastBlock(Sampler[int]):
    """Pads the batch-interpolation stream to a multiple of ``per-device batch x processes``.

    With several processes, accelerate deals the stream's micro-batches out round-robin and, when the
    epoch's last (partial) global batch does not fill every process, tops it up with samples from the
    epoch's start, replay samples included. Padding the stream with task samples from the epoch's start
    instead keeps exactly k replay samples in that last global batch too (the repeated task samples are
    what a DistributedSampler would repeat). A single process needs no padding.
    """

    def __init__(self, inner: BatchInterpolationSampler, multiple: int):
        self.inner, self.multiple = inner, multiple

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-len(self.inner) // self.multiple) * self.multiple

    def __iter__(self) -> Iterator[int]:
        first_task: list[int] = []
        count = 0
        for index in self.inner:
            if index < self.inner.num_task and len(first_task) < self.multiple:
                first_task.append(index)
            count += 1
            yield index
        for i in range(len(self) - count):
            yield first_task[i % len(first_task)]


class SeparateReplayBatches:
    """A replay batch of ``size`` samples per process with every micro-batch, read from one `ReplayOrder`.

    Micro-batch d of process p takes stream positions ``((d * processes + p) * size, ... + size)``, so the
    processes never repeat each other within a draw, and a resumed run (``restart`` at the micro-batches
    already done) draws what the uninterrupted run would have.
    """

    def __init__(self, num_replay: int, size: int, seed: int, processes: int = 1, rank: int = 0):
        self.order, self.size, self.processes, self.rank = ReplayOrder(num_replay, seed), size, processes, rank
        self.draw = 0

    def restart(self, micro_batches_done: int) -> None:
        self.draw = micro_batches_done

    def next(self) -> list[int]:
        start = (self.draw * self.processes + self.rank) * self.size
        self.draw += 1
        return self.order.take(start, self.size)


def replay_batch(token_lists, indices: list[int], pad_id: int, device):
    """Right-padded ``(input_ids, attention_mask, labels)`` of replay samples ``indices``; the labels
    ignore padding."""
    ids, mask, _, _ = pad_batch([token_lists[i] for i in indices], pad_id, "right", device)
    return ids, mask, ids.masked_fill(mask == 0, IGNORE_INDEX)
