"""Experience replay of earlier tasks: selection, the buffer in training, checkpoints and resume."""

from types import SimpleNamespace

import pytest
import torch

import gere.continual.runner as runner
from gere.baselines.task_replay import FILE, TaskReplayBuffer, select
from gere.continual.run_config import load_run_config
from gere.errors import GeReError

from tiny_runs import run, whole_and_resumed


def test_selection_first_and_reservoir():
    assert select(10, 3, "first", 0) == [0, 1, 2]
    assert select(2, 5, "reservoir", 0) == [0, 1], "a task smaller than N is kept whole"
    picks = select(100, 5, "reservoir", 7)
    assert len(set(picks)) == 5 and picks == sorted(picks) and all(0 <= i < 100 for i in picks)
    assert picks == select(100, 5, "reservoir", 7) and picks != select(100, 5, "reservoir", 8)
    # Algorithm R draws uniformly: every position is about equally likely over many seeds.
    counts = [0] * 20
    for seed in range(4000):
        for i in select(20, 4, "reservoir", seed):
            counts[i] += 1
    assert min(counts) > 0.8 * 800 and max(counts) < 1.2 * 800
    with pytest.raises(GeReError, match="selection = 'last' is not valid: it must be one of"):
        TaskReplayBuffer(2, "last")


def test_buffer_grows_per_task_and_round_trips(tmp_path):
    buffer = TaskReplayBuffer(per_task=2, selection="first")
    buffer.add_task(0, 5)
    buffer.add_task(1, 1)
    assert buffer.entries == [(0, 0), (0, 1), (1, 0)]
    assert buffer.examples([["a", "b", "c"], ["x"]]) == [(0, "a"), (0, "b"), (1, "x")]
    buffer.save(tmp_path)
    again = TaskReplayBuffer(per_task=2, selection="first")
    again.load(tmp_path)
    assert again.entries == buffer.entries
    with pytest.raises(GeReError, match="1 or more"):
        TaskReplayBuffer(per_task=0)


def test_the_second_task_trains_on_the_first_tasks_examples_too(setup, tmp_path, monkeypatch):
    sizes = []
    real = runner._stage_trainer

    def spy(run_, index):
        trainer, stage = real(run_, index)
        sizes.append(len(trainer.train_dataset))
        return trainer, stage

    monkeypatch.setattr(runner, "_stage_trainer", spy)
    result = run(setup, tmp_path / "tr", "gere.objective=ce+tm", "task_replay.per_task=3")
    assert sizes == [16, 16 + 3], "the first task's 3 buffered examples join the second task's 16"
    assert result["method"] == "ce+tm+task-replay"
    assert (tmp_path / "tr" / "checkpoints" / "stage-2" / FILE).exists()


def test_resume_after_a_crash_gives_the_same_metrics(setup, tmp_path, monkeypatch):
    args = ("gere.objective=none", "task_replay.per_task=4", "task_replay.seed=3")
    whole, resumed = whole_and_resumed(setup, tmp_path, monkeypatch, *args)
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"] and resumed["metrics"] == whole["metrics"]
    assert [r["loss"] for r in resumed["loss_history"]] == [r["loss"] for r in whole["loss_history"]]


def spy_trainers(monkeypatch) -> list:
    trainers = []
    real = runner._stage_trainer

    def spy(run_, index):
        trainer, stage = real(run_, index)
        trainers.append(trainer)
        return trainer, stage

    monkeypatch.setattr(runner, "_stage_trainer", spy)
    return trainers


def test_interpolate_puts_exactly_k_buffered_examples_in_every_batch(setup, tmp_path, monkeypatch):
    trainers = spy_trainers(monkeypatch)
    run(setup, tmp_path / "bi", "gere.objective=ce+tm", "task_replay.per_task=3", "task_replay.mixing=interpolate",
        "task_replay.per_batch=1", "lwf.weight=1", "lwf.topk=4")  # fmt: skip
    # LwF's index column names each row: the task's 16 rows are 0-15, the buffered ones 16-18.
    second = trainers[1]
    assert len(second.train_dataset) == 16 + 3
    batches = [b["gere_example_index"].tolist() for b in second.get_train_dataloader()]
    assert all(sum(i >= 16 for i in b) == 1 for b in batches), batches  # the last batch: 1 task row + 1
    assert all(len(b) == 4 for b in batches[:-1]), batches
    assert sorted(i for b in batches for i in b if i < 16) == list(range(16)), "every task row once per epoch"
    assert second._train_sampler is not None and trainers[0]._train_sampler is None


def test_batch_mode_adds_a_separate_buffered_batch_to_every_step(setup, tmp_path, monkeypatch):
    trainers = spy_trainers(monkeypatch)
    result = run(setup, tmp_path / "sep", "gere.objective=none", "task_replay.per_task=3", "task_replay.mixing=batch",
                 "task_replay.batch_size=2")  # fmt: skip
    assert [len(t.train_dataset) for t in trainers] == [16, 16], "the buffer is not in the task data"
    history = result["loss_history"]
    assert all(r["task_replay_ce"] is None for r in history if r["task"] == "mood")
    second = [r for r in history if r["task"] == "compass"]
    assert second and all(r["task_replay_ce"] > 0 for r in second)
    for r in second:
        assert r["loss"] == pytest.approx(r["task_ce"] + r["task_replay_ce"], rel=1e-4)


def test_separate_batches_draw_each_buffered_row_before_repeating(setup):
    from gere.baselines.task_replay import SeparateBufferBatches

    seen = []
    batches = SeparateBufferBatches([{"i": i} for i in range(5)], 2, collator=lambda rows: seen.append(rows) or {}, seed=1)
    model = torch.nn.Linear(1, 1)
    model.forward = lambda **kw: SimpleNamespace(loss=torch.zeros(()))  # only the draws are looked at here
    for _ in range(5):
        batches(model)
    drawn = [r["i"] for rows in seen for r in rows]
    # every row comes once before any row repeats
    assert sorted(drawn[:5]) == [0, 1, 2, 3, 4] and sorted(drawn[5:10]) == [0, 1, 2, 3, 4]
    with pytest.raises(GeReError, match="empty"):
        SeparateBufferBatches([], 2, None, 0)


def test_resume_in_batch_mode_gives_the_same_losses(setup, tmp_path, monkeypatch):
    args = ("gere.objective=none", "task_replay.per_task=4", "task_replay.mixing=batch", "task_replay.batch_size=2")
    whole, resumed = whole_and_resumed(setup, tmp_path, monkeypatch, *args)
    assert [r["loss"] for r in resumed["loss_history"]] == [r["loss"] for r in whole["loss_history"]]
    assert resumed["metrics"] == whole["metrics"]


def test_settings_are_checked(setup):
    for bad, words in (("task_replay.per_task=-1", "task_replay.per_task"),
                       ("task_replay.selection=last", "task_replay.selection"),
                       ("task_replay.mixing=mix", "task_replay.mixing"),
                       ("task_replay.per_batch=0", "task_replay.per_batch"),
                       ("task_replay.batch_size=0", "task_replay.batch_size")):  # fmt: skip
        with pytest.raises(GeReError, match=words):
            load_run_config(setup / "run.yaml", [bad])
    interpolate = ["task_replay.per_task=2", "task_replay.mixing=interpolate"]
    with pytest.raises(GeReError, match="leaves no task sample"):
        load_run_config(setup / "run.yaml", [*interpolate, "task_replay.per_batch=4"])
    with pytest.raises(GeReError, match="both place rows"):
        load_run_config(setup / "run.yaml", [*interpolate, "gere.objective=ce", "gere.num_interpolate_per_batch=1"])
    load_run_config(setup / "run.yaml", [*interpolate, "gere.objective=ce"])  # a separate general replay batch: fine


def test_interpolate_counts_the_global_batch_over_every_process(tmp_path):
    """Two processes (torchrun, gloo) with per-device batch 2 and one with accumulation 2: global batches of
    4 either way, and exactly ``per_batch`` = 1 buffered row in each, not one per process."""
    from launch import torchrun
    from task_replay_worker import NUM_BUFFERED, NUM_TASK, run_task_replay

    def per_step(micro_lists):
        steps: dict[int, list[int]] = {}
        for micro in micro_lists:
            for m in micro:
                steps.setdefault(m["step"], []).append(m["buffered"])
        return {step: sum(counts) for step, counts in steps.items()}

    two = per_step(torchrun("task_replay_worker.py", tmp_path))
    one = per_step([run_task_replay(tmp_path / "one", grad_accum=2)])
    assert two == one == {0: 1, 1: 1, 2: 1}
    assert sum(two.values()) == NUM_BUFFERED and 3 * 4 == NUM_TASK + NUM_BUFFERED
