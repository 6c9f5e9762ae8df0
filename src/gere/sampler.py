"""Batch interpolation (BI): exactly k replay samples inside every global batch.

The training dataset is laid out as ``[task samples..., replay samples...]``. The sampler yields indices
in blocks of one global batch (``per_device_batch x gradient_accumulation x processes``): each block holds
``k`` replay indices and ``global_batch - k`` task indices, so over an epoch every task sample is seen
exactly once and the replay set is cycled through in a shuffled order. The last block holds the remaining
task samples plus k replay samples.

Replay indices are spread evenly across each block, so with gradient accumulation or several processes
they land in different micro-batches rather than all in the first. The Trainer's data loader (through
accelerate) hands process ``p`` the micro-batches ``p, p + P, ...`` of this stream, so a block is exactly
one optimisation step across all processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from gere.errors import GeReError


class BatchInterpolationSampler(Sampler[int]):
    def __init__(
        self, num_task: int, num_replay: int, k: int, global_batch: int, seed: int = 0, shuffle: bool = True
    ):
        if num_replay < 1:
            raise GeReError("batch interpolation needs at least one replay sample")
        if not 1 <= k < global_batch:
            raise GeReError(
                f"num_interpolate_per_batch = {k} must be between 1 and the global batch size minus 1 "
                f"({global_batch - 1}: per-device batch x gradient accumulation x processes)"
            )
        self.num_task, self.num_replay, self.k = num_task, num_replay, k
        self.global_batch, self.seed, self.shuffle = global_batch, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def task_per_block(self) -> int:
        return self.global_batch - self.k

    def __len__(self) -> int:
        blocks = -(-self.num_task // self.task_per_block)
        return self.num_task + blocks * self.k

    def slots(self, block_size: int) -> list[int]:
        """Positions of the k replay samples in a block of ``block_size`` (evenly spread)."""
        return sorted({(i * block_size) // self.k for i in range(self.k)})

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        task = (
            torch.randperm(self.num_task, generator=g).tolist()
            if self.shuffle
            else list(range(self.num_task))
        )
        # Replay order continues across epochs so that all replay samples get their turn.
        cursor = self.epoch * (-(-self.num_task // self.task_per_block)) * self.k
        replay_perm: list[int] = []
        replay_round = -1

        def replay_at(position: int) -> int:
            nonlocal replay_perm, replay_round
            round_no, offset = divmod(position, self.num_replay)
            if round_no != replay_round:
                rg = torch.Generator().manual_seed(self.seed * 1_000_003 + round_no)
                replay_perm = torch.randperm(self.num_replay, generator=rg).tolist()
                replay_round = round_no
            return self.num_task + replay_perm[offset]

        for start in range(0, self.num_task, self.task_per_block):
            chunk = task[start : start + self.task_per_block]
            size = len(chunk) + self.k
            slots = set(self.slots(size))
            it = iter(chunk)
            for position in range(size):
                if position in slots:
                    yield replay_at(cursor)
                    cursor += 1
                else:
                    yield next(it)
