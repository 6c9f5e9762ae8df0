"""evaluation.schedule: which cells a run evaluates, metrics over a matrix with cells left out, and a three-task
run under ``needed`` against the same run under ``full`` (same training, so the cells both have are equal)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import yaml

import gere.continual.evaluator as evaluator
from gere.continual import run_folder
from gere.continual.compare import compare_runs
from gere.continual.metrics import backward_transfer, compute_metrics, forgetting, forward_transfer
from gere.continual.run_config import load_run_config
from gere.continual.run_folder import config_digest
from gere.continual.schedule import counts, general_at, tasks_at
from gere.errors import GeReError

from tiny_runs import run, whole_and_resumed


def test_needed_evaluates_each_task_before_after_and_at_the_end():
    assert [tasks_at("needed", s, 3) for s in range(4)] == [[0, 1, 2], [0, 1], [1, 2], [0, 1, 2]]
    assert [general_at("needed", s, 3) for s in range(4)] == [True, False, True, True]
    assert [general_at("needed", s, 14) for s in range(15)].count(True) == 3 and general_at("needed", 7, 14)
    assert counts("needed", 14) == {"task_evaluations": 54, "general_evaluations": 3}
    assert counts("full", 14) == {"task_evaluations": 210, "general_evaluations": 15}
    assert counts("needed", 1) == counts("full", 1) == {"task_evaluations": 2, "general_evaluations": 2}
    with pytest.raises(ValueError, match="outside 0..3"):
        tasks_at("needed", 4, 3)


FULL = [[0.5, 0.4, 0.3], [0.9, 0.5, 0.4], [0.7, 0.95, 0.6], [0.8, 0.6, 0.9]]


def needed_cells(matrix):
    t = len(matrix) - 1
    return [[v if j in tasks_at("needed", i, t) else None for j, v in enumerate(row)] for i, row in enumerate(matrix)]


def test_metrics_of_the_needed_cells_equal_the_full_matrix_and_invent_nothing():
    needed = needed_cells(FULL)
    assert needed[1] == [0.9, 0.5, None] and needed[2] == [None, 0.95, 0.6]
    full, part = compute_metrics(FULL), compute_metrics(needed)
    for key in ("ap", "bwt", "fwt", "final_accuracy", "learned_accuracy", "not_learned"):
        assert part[key] == full[key], key
    # Forgetting over the stages evaluated: the full matrix's best of task 0 is 0.9 (stage 1) either way, but
    # task 1's best after its training is stage 2 only, so here both are the same; a task that rises later
    # shows the difference.
    assert part["forgetting"] == pytest.approx(-part["bwt"])
    rising = [row[:] for row in FULL]
    rising[2][0] = 0.99  # task 0 rose after task 1 trained, then fell
    assert forgetting(rising) > forgetting(needed_cells(rising)) == pytest.approx(-backward_transfer(rising))
    # A missing cell a metric needs makes it None, never a number.
    holed = [row[:] for row in FULL]
    holed[3][1] = None
    assert compute_metrics(holed)["ap"] is None and backward_transfer(holed) is None
    holed = [row[:] for row in FULL]
    holed[0][2] = None
    assert forward_transfer(holed) is None and compute_metrics(holed)["f1_avg"] is None
    with pytest.raises(GeReError, match="non-finite"):
        compute_metrics([[0.5, float("nan")], [0.5, 0.5], [0.5, 0.5]])


@pytest.fixture(scope="module")
def three(setup, tmp_path_factory):
    """The tiny run with a third task (side: east / west), its ``run.yaml`` in a folder of its own."""
    folder = setup / "side"
    if not folder.exists():
        shutil.copytree(setup / "compass", folder)
        for split in ("train", "test"):
            path = folder / f"{split}.jsonl"
            path.write_text(path.read_text().replace("north", "east").replace("south", "west"))
        (folder / "task.json").write_text(json.dumps({"name": "side", "instruction": "pick one",
                                                      "labels": ["east", "west"]}))  # fmt: skip
    config = yaml.safe_load((setup / "run.yaml").read_text())
    config["tasks"].append({"source": str(folder)})
    root = tmp_path_factory.mktemp("three")
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root


class Counting:
    """Counts the task evaluations (by task name) and the probe evaluations a run makes."""

    def __init__(self, monkeypatch):
        self.tasks: list[str] = []
        self.probes = 0
        task, probe = evaluator.evaluate_task, evaluator.evaluate_multiple_choice

        def evaluate_task(model, tokenizer, spec, *args, **kwargs):
            self.tasks.append(spec.name)
            return task(model, tokenizer, spec, *args, **kwargs)

        def evaluate_multiple_choice(*args, **kwargs):
            self.probes += 1
            return probe(*args, **kwargs)

        monkeypatch.setattr(evaluator, "evaluate_task", evaluate_task)
        monkeypatch.setattr(evaluator, "evaluate_multiple_choice", evaluate_multiple_choice)


def test_a_needed_run_evaluates_only_its_cells_and_matches_the_full_run(three, tmp_path, monkeypatch):
    full = run(three, tmp_path / "full")
    calls = Counting(monkeypatch)
    needed = run(three, tmp_path / "needed", "evaluation.schedule=needed")
    assert calls.tasks == ["mood", "compass", "side", "mood", "compass", "compass", "side", "mood", "compass", "side"]
    assert calls.probes == 3
    matrix = needed["accuracy_matrix"]
    assert [[v is not None for v in row] for row in matrix] == [
        [True, True, True], [True, True, False], [False, True, True], [True, True, True]]  # fmt: skip
    for row, full_row in zip(matrix, full["accuracy_matrix"], strict=True):
        assert [v for v in row if v is not None] == [f for v, f in zip(row, full_row, strict=True) if v is not None]
    for key in ("ap", "ap_weighted", "bwt", "fwt", "general_final", "f1_avg", "learned_accuracy"):
        assert needed["metrics"][key] == full["metrics"][key], key
    assert needed["metrics"]["forgetting"] == pytest.approx(-needed["metrics"]["bwt"])
    assert [e.get("evaluated", True) for e in needed["general"]] == [True, False, True, True]
    assert needed["metrics"]["general_scores"][1] is None and full["metrics"]["general_scores"][1] is not None
    assert needed["evaluations"] == {"schedule": "needed", "task_evaluations": 10, "task_cells": 12,
                                     "general_evaluations": 3, "stages": 4}  # fmt: skip
    assert full["evaluations"]["task_evaluations"] == 12 and full["evaluations"]["general_evaluations"] == 4
    written = json.loads((tmp_path / "needed" / "results.json").read_text())
    assert written["accuracy_matrix"][1][2] is None
    report = (tmp_path / "needed" / "report.md").read_text()
    assert "| after mood | " in report and "10 of 12 cells" in report and "3 of 4 stages" in report
    md, png = compare_runs([tmp_path / "full", tmp_path / "needed"], tmp_path / "cmp")
    rows = [line for line in md.read_text().splitlines() if line.startswith("| `")]
    assert len(rows) == 2 and rows[0].split("|")[4:7] == rows[1].split("|")[4:7]  # AP, AP weighted, BWT
    assert png.stat().st_size > 0


def test_a_needed_run_resumed_equals_one_run_straight_through(three, tmp_path, monkeypatch):
    whole, resumed = whole_and_resumed(three, tmp_path, monkeypatch, "evaluation.schedule=needed")
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed["accuracy_matrix"][1][2] is None
    assert resumed["general"] == whole["general"]
    for key in ("ap", "bwt", "fwt", "forgetting", "f1_avg"):
        assert resumed["metrics"][key] == whole["metrics"][key], key


def test_schedule_is_part_of_a_run_identity_only_when_not_full(three):
    full = load_run_config(three / "run.yaml")
    needed = load_run_config(three / "run.yaml", ["evaluation.schedule=needed"])
    assert config_digest(full) != config_digest(needed)
    # A run started before the setting existed recorded the digest of a config without it: it still resumes.
    old = run_folder._identity(full)
    del old["evaluation"]["schedule"]
    text = json.dumps(run_folder._canonical(run_folder._without_later_settings(old)), sort_keys=True)
    assert hashlib.sha256(text.encode()).hexdigest() == config_digest(full)
    with pytest.raises(GeReError, match="schedule"):
        load_run_config(three / "run.yaml", ["evaluation.schedule=some"])
