from collections import Counter

import pytest

from gere.errors import GeReError
from gere.replay.sampler import BatchInterpolationSampler


@pytest.mark.parametrize(
    "num_task,num_replay,k,global_batch", [(50, 7, 2, 8), (64, 100, 3, 16), (5, 3, 1, 4)]
)
@pytest.mark.parametrize("placement", ["even", "random"])
def test_every_global_batch_has_k_replay_and_task_seen_once(num_task, num_replay, k, global_batch, placement):
    sampler = BatchInterpolationSampler(num_task, num_replay, k, global_batch, seed=3, placement=placement)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler)
        blocks = [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
        for block in blocks:
            assert sum(i >= num_task for i in block) == k
        task = Counter(i for i in order if i < num_task)
        assert sorted(task) == list(range(num_task)) and set(task.values()) == {1}


def test_replay_spread_over_micro_batches_and_cycled():
    sampler = BatchInterpolationSampler(num_task=60, num_replay=10, replay_per_batch=4, global_batch=16, seed=0)
    order = list(sampler)
    first_block = order[:16]
    micro = [first_block[i : i + 4] for i in range(0, 16, 4)]  # 4 processes x per-device batch 4
    assert [sum(i >= 60 for i in m) for m in micro] == [1, 1, 1, 1]
    replay = [i - 60 for i in order if i >= 60]
    assert sorted(replay[:10]) == list(range(10))  # a full pass over the replay set before repeats


def test_epochs_differ_and_are_reproducible():
    s = BatchInterpolationSampler(30, 5, 2, 8, seed=1)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1
    s.set_epoch(0)
    assert list(s) == e0


def test_bad_k():
    with pytest.raises(GeReError, match="num_interpolate_per_batch"):
        BatchInterpolationSampler(10, 5, 8, 8)


def test_random_placement_moves_replay_but_keeps_the_task_and_replay_order():
    even = list(BatchInterpolationSampler(60, 10, 4, 16, seed=0))
    rand = list(BatchInterpolationSampler(60, 10, 4, 16, seed=0, placement="random"))
    assert [i for i in rand if i < 60] == [i for i in even if i < 60]
    assert [i for i in rand if i >= 60] == [i for i in even if i >= 60]
    blocks = [rand[i : i + 16] for i in range(0, len(rand), 16)]
    per_micro = [[sum(i >= 60 for i in b[m : m + 4]) for m in range(0, 16, 4)] for b in blocks]
    assert any(counts != [1, 1, 1, 1] for counts in per_micro)  # some micro-batches get 2+ replay, some none
    assert rand == list(BatchInterpolationSampler(60, 10, 4, 16, seed=0, placement="random"))  # seeded
