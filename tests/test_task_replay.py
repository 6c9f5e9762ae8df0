"""Experience replay of earlier tasks: selection, the buffer in training, checkpoints and resume."""

import pytest
from test_runner import run, setup, whole_and_resumed  # noqa: F401 (the tiny two-task run files, shared)

import gere.continual.runner as runner
from gere.baselines.task_replay import FILE, TaskReplayBuffer, select
from gere.continual.run_config import load_run_config
from gere.errors import GeReError


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
    with pytest.raises(GeReError, match="not one of first, reservoir"):
        select(10, 2, "last", 0)


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


def test_the_second_task_trains_on_the_first_tasks_examples_too(setup, tmp_path, monkeypatch):  # noqa: F811
    sizes = []
    real = runner._stage_trainer

    def spy(run_, index):
        trainer = real(run_, index)
        sizes.append(len(trainer.train_dataset))
        return trainer

    monkeypatch.setattr(runner, "_stage_trainer", spy)
    result = run(setup, tmp_path / "tr", "gere.objective=ce+tm", "task_replay.per_task=3")
    assert sizes == [16, 16 + 3], "the first task's 3 buffered examples join the second task's 16"
    assert result["method"] == "ce+tm+task-replay"
    assert (tmp_path / "tr" / "checkpoints" / "stage-2" / FILE).exists()


def test_resume_after_a_crash_gives_the_same_metrics(setup, tmp_path, monkeypatch):  # noqa: F811
    args = ("gere.objective=none", "task_replay.per_task=4", "task_replay.seed=3")
    whole, resumed = whole_and_resumed(setup, tmp_path, monkeypatch, *args)
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"] and resumed["metrics"] == whole["metrics"]
    assert [r["loss"] for r in resumed["loss_history"]] == [r["loss"] for r in whole["loss_history"]]


def test_settings_are_checked(setup):  # noqa: F811
    for bad, words in (("task_replay.per_task=-1", "task_replay.per_task"),
                       ("task_replay.selection=last", "task_replay.selection")):  # fmt: skip
        with pytest.raises(GeReError, match=words):
            load_run_config(setup / "run.yaml", [bad])
