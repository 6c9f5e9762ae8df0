"""The order in which replay samples are drawn, and batch interpolation (BI).

`ReplayOrder` is the one stream of replay indices: round r is a permutation of the replay set seeded with
``(seed, r)``, and position p of the stream is element ``p mod n`` of round ``p div n``. Batch interpolation
and the separate replay batch both read it.

Batch interpolation: exactly k replay samples inside every global batch.

The training dataset is laid out as ``[task samples..., replay samples...]``. The sampler yields indices
in blocks of one global batch (``per_device_batch x gradient_accumulation x processes``): each block holds
``k`` replay indices and ``global_batch - k`` task indices, so over an epoch every task sample is seen
exactly once and the replay set is cycled through in a shuffled order. The last block holds the remaining
task samples plus k replay samples.

Replay indices are spread evenly across each block (``placement="even"``), so with gradient accumulation or
several processes they land in different micro-batches rather than all in the first; or they take random
positions of the block (``"random"``, as the reference implementation does), so that a micro-batch may hold
several replay samples or none. The Trainer's data loader (through
accelerate) hands process ``p`` the micro-batches ``p, p + P, ...`` of this stream, so a block is exactly
one optimisation step across all processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from gere.errors import GeReError
from gere.replay import PLACEMENTS

# Rounds of the replay order are seeded with seed * _ROUND_STRIDE + round, so that nearby seeds do not
# share rounds (a large prime keeps seed s round r and seed s' round r' apart for any realistic r).
_ROUND_STRIDE = 1_000_003


class ReplayOrder:
    """Replay index at each position of an endless, seeded stream of permutations of ``range(n)``."""

    def __init__(self, num_replay: int, seed: int = 0):
        if num_replay < 1:
            raise GeReError("replay needs at least one replay sample")
        self.num_replay, self.seed = num_replay, seed
        self._round, self._perm = -1, []

    def __getitem__(self, position: int) -> int:
        round_no, offset = divmod(position, self.num_replay)
        if round_no != self._round:
            g = torch.Generator().manual_seed(self.seed * _ROUND_STRIDE + round_no)
            self._round, self._perm = round_no, torch.randperm(self.num_replay, generator=g).tolist()
        return self._perm[offset]

    def take(self, start: int, count: int) -> list[int]:
        """The replay indices at positions ``start .. start + count - 1``."""
        return [self[p] for p in range(start, start + count)]


class BatchInterpolationSampler(Sampler[int]):
    """Indices of ``[task samples..., replay samples...]``: ``replay_per_batch`` replay samples in every
    block of ``global_batch`` indices (one optimisation step across all processes)."""

    def __init__(
        self,
        num_task: int,
        num_replay: int,
        replay_per_batch: int,
        global_batch: int,
        seed: int = 0,
        shuffle: bool = True,
        placement: str = "even",
    ):
        if num_replay < 1:
            raise GeReError("batch interpolation needs at least one replay sample")
        if not 1 <= replay_per_batch < global_batch:
            raise GeReError(
                f"num_interpolate_per_batch = {replay_per_batch} must be between 1 and the global batch size "
                f"minus 1 ({global_batch - 1}: per-device batch x gradient accumulation x processes)"
            )
        self.num_task, self.num_replay = num_task, num_replay
        if placement not in PLACEMENTS:
            raise GeReError(f"interpolation_placement {placement!r} is not one of {', '.join(PLACEMENTS)}")
        self.replay_per_batch = replay_per_batch
        self.global_batch, self.seed, self.shuffle, self.placement = global_batch, seed, shuffle, placement
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def task_per_block(self) -> int:
        return self.global_batch - self.replay_per_batch

    def __len__(self) -> int:
        blocks = -(-self.num_task // self.task_per_block)
        return self.num_task + blocks * self.replay_per_batch

    def slots(self, block_size: int, generator: torch.Generator | None = None) -> list[int]:
        """Positions of the replay samples in a block of ``block_size``: evenly spread, or (``random``
        placement) distinct positions drawn with ``generator``."""
        if self.placement == "random":
            return sorted(torch.randperm(block_size, generator=generator)[: self.replay_per_batch].tolist())
        return sorted({(i * block_size) // self.replay_per_batch for i in range(self.replay_per_batch)})

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        task = (
            torch.randperm(self.num_task, generator=g).tolist()
            if self.shuffle
            else list(range(self.num_task))
        )
        # Replay order continues across epochs so that all replay samples get their turn.
        cursor = self.epoch * (-(-self.num_task // self.task_per_block)) * self.replay_per_batch
        order = ReplayOrder(self.num_replay, self.seed)
        # Placement draws have their own stream, so the task order is the same for either placement.
        positions = torch.Generator().manual_seed(self.seed * _ROUND_STRIDE + 7919 + self.epoch)

        for start in range(0, self.num_task, self.task_per_block):
            chunk = task[start : start + self.task_per_block]
            size = len(chunk) + self.replay_per_batch
            slots = set(self.slots(size, positions))
            it = iter(chunk)
            for position in range(size):
                if position in slots:
                    yield self.num_task + order[cursor]
                    cursor += 1
                else:
                    yield next(it)
