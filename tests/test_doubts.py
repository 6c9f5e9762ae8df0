"""Silent doubts: inputs that work but are probably not meant are said in the log and under "Warnings" in
report.md (duplicate or train/test-overlapping examples, repeated probe questions, identical options,
settings of a method the run does not use). Generated data sets with known counts."""

from __future__ import annotations

import json
import random

import pytest

from gere.continual.doubts import config_doubts, probe_doubts, task_doubts
from gere.continual.evaluator import Evaluator
from gere.continual.report import render_markdown
from gere.continual.run_config import load_run_config
from gere.continual.tasks import Example, TaskSpec, load_task


def examples(pairs):
    return [Example(i, label) for i, label in pairs]


@pytest.mark.parametrize("seed", range(6))
def test_repeated_training_examples_are_counted(seed):
    rng = random.Random(seed)
    unique = [(f"text {i}", "a" if i % 2 else "b") for i in range(rng.randint(4, 30))]
    copies = rng.randint(0, 12)
    train = unique + [rng.choice(unique) for _ in range(copies)]
    rng.shuffle(train)
    lines = task_doubts("t", examples(train), [])
    if copies:
        assert len(lines) == 1 and f"{copies} of {len(train)} training examples repeat others" in lines[0]
    else:
        assert lines == []


@pytest.mark.parametrize("seed", range(6))
def test_test_examples_that_are_training_inputs_are_counted(seed):
    rng = random.Random(seed)
    train = [(f"text {i}", "a") for i in range(20)] + [(f"other {i}", "b") for i in range(20)]
    fresh = [(f"new {i}", "a") for i in range(rng.randint(1, 10))]
    seen = rng.sample(train, rng.randint(0, 10))
    lines = task_doubts("t", examples(train), examples(fresh + [(i, "b") for i, _ in seen]))
    overlap = [line for line in lines if "also training inputs" in line]
    if seen:
        assert overlap == [f"task 't': {len(seen)} of {len(fresh) + len(seen)} test examples are also training "
                           f"inputs (e.g. {seen[0][0]!r}); their accuracy measures memory, not learning"]  # fmt: skip
    else:
        assert overlap == []


def test_one_input_with_two_labels_is_said():
    lines = task_doubts("t", examples([("same", "a"), ("same", "b"), ("other", "a")]), [])
    assert lines == ["task 't': 1 training input(s) carry more than one label (e.g. 'same': ['a', 'b']); check the labels"]


def question(text: str, choices=("north", "south", "east", "west"), answer=0) -> dict:
    return {"question": text, "choices": list(choices), "answer": answer, "subject": "geo", "category": "other"}


@pytest.mark.parametrize("copies", [2, 9])
def test_a_repeated_probe_question_is_said(copies):
    probe = [question("the river is")] * copies + [question(f"q {i}") for i in range(10 - copies)]
    lines = probe_doubts(probe, "probe.jsonl")
    assert len(lines) == 1
    assert lines[0].startswith(f"probe probe.jsonl: {copies - 1} of 10 questions repeat others (items [1, 2")


@pytest.mark.parametrize("choices", [("a", "a"), ("x", "y", "x"), ("same ", " same", "other")])
def test_identical_options_are_said(choices):
    probe = [question("fine"), question("twins", choices, answer=len(choices) - 1)]
    lines = probe_doubts(probe, "p.jsonl")
    assert len(lines) == 1 and "1 question(s) list the same option twice (item 2:" in lines[0]
    assert probe_doubts([question("fine")], "p.jsonl") == []


@pytest.mark.parametrize(
    "overrides, said",
    [
        (["olora.l2=0.5"], "olora.l2 set, but finetuning is 'full'"),
        (["olora.orthogonal=0.1", "finetuning=lora"], "olora.orthogonal set, but finetuning is 'lora'"),
        (["lora.r=4"], "lora.r set, but finetuning is 'full'"),
        (["lora.r=4", "finetuning=lora"], None),
        (["olora.l2=0.5", "finetuning=olora"], None),
        ([], None),
    ],
)
def test_settings_of_a_method_the_run_does_not_use_are_said(overrides, said):
    lines = config_doubts(load_run_config(None, ["model=x", *overrides]))
    assert (lines == []) if said is None else (len(lines) == 1 and said in lines[0])


def test_a_run_collects_its_doubts_and_report_md_lists_them(tmp_path):
    pairs = [("text 0", "a")] * 3 + [("text 1", "b"), ("text 1", "a"), ("text 2", "b")]
    rows = [{"input": i, "label": label} for i, label in pairs]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text(json.dumps({"input": "text 1", "label": "a"}) + "\n")
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps(question("q", ("a", "a"))) + "\n" for _ in range(3)))
    cfg = load_run_config(None, ["model=x", "olora.l2=0.5", f"evaluation.general_mc={probe}"])
    task = load_task(TaskSpec(name="t", instruction="i", labels=["a", "b"], source=str(tmp_path)))
    doubts = Evaluator(cfg, [task]).doubts
    assert [d.split(":")[0] for d in doubts] == ["olora.l2 set, but finetuning is 'full'", "task 't'", "task 't'",
                                                 "task 't'", f"probe {probe}", f"probe {probe}"]  # fmt: skip
    results = {"name": "r", "method": "none", "tasks": ["t"], "accuracy_matrix": [[0.5], [0.6]],
               "metrics": {}, "input_warnings": doubts}  # fmt: skip
    text = render_markdown(results)
    warnings = text.split("## Warnings\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert warnings[: len(doubts)] == [f"- {d}" for d in doubts]
