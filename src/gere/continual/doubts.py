"""Warnings about inputs that work but are probably not what the user meant ("silent doubts").

Nothing here stops a run: each finding is one line, logged when the run starts and listed under
"Warnings" in report.md (`gere.continual.report`). What is looked for:

- a task's training examples that repeat (same input and label: they weigh more than the others), and one
  input given two labels;
- test examples whose input is also a training input of the same task (their accuracy measures memory);
- a multiple-choice probe whose question repeats (with the same options: it counts several times in the
  accuracy) or whose options repeat (equal texts score alike in cloze format, ties go to the earlier one);
- settings of a method the run does not use (``olora.*`` without ``finetuning: olora``, ``lora.*`` under
  full fine-tuning): they change nothing.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import fields
from typing import Any

from gere.errors import shown

#: Examples shown per finding.
SHOWN = 2


def task_doubts(name: str, train: list, test: list) -> list[str]:
    """Lines about one task's examples (objects with ``input`` and ``label``)."""
    lines = []
    pairs = Counter((ex.input, ex.label) for ex in train)
    repeated = {pair: n for pair, n in pairs.items() if n > 1}
    if repeated:
        extra = sum(n - 1 for n in repeated.values())
        examples = ", ".join(f"{shown(i, 50)} x{n}" for (i, _), n in list(repeated.items())[:SHOWN])
        lines.append(f"task {shown(name)}: {extra} of {len(train)} training examples repeat others ({examples}); "
                     "repeated examples weigh more in training than the rest")  # fmt: skip
    labels: dict[str, set[str]] = defaultdict(set)
    for ex in train:
        labels[ex.input].add(ex.label)
    conflicting = [i for i, found in labels.items() if len(found) > 1]
    if conflicting:
        lines.append(f"task {shown(name)}: {len(conflicting)} training input(s) carry more than one label (e.g. "
                     f"{shown(conflicting[0], 50)}: {sorted(labels[conflicting[0]])}); check the labels")  # fmt: skip
    overlap = [ex for ex in test if ex.input in labels]
    if overlap:
        lines.append(f"task {shown(name)}: {len(overlap)} of {len(test)} test examples are also training inputs "
                     f"(e.g. {shown(overlap[0].input, 50)}); their accuracy measures memory, not learning")  # fmt: skip
    return lines


def probe_doubts(questions: list[dict[str, Any]], source: str) -> list[str]:
    """Lines about a multiple-choice probe: repeated questions, repeated options. Items count from 1."""
    lines = []
    items: dict[tuple, list[int]] = defaultdict(list)
    for number, q in enumerate(questions, start=1):
        items[(q["question"], tuple(q["choices"]))].append(number)
    repeated = [numbers for numbers in items.values() if len(numbers) > 1]
    if repeated:
        extra = sum(len(n) - 1 for n in repeated)
        first = repeated[0]
        lines.append(
            f"probe {source}: {extra} of {len(questions)} questions repeat others (items {shown(first, 60)} are "
            f"{shown(questions[first[0] - 1]['question'], 50)}); each copy counts in the accuracy again"
        )
    same = []
    for number, q in enumerate(questions, start=1):
        texts = [str(c).strip() for c in q["choices"]]
        if len(set(texts)) < len(texts):
            same.append(number)
    if same:
        q = questions[same[0] - 1]
        lines.append(
            f"probe {source}: {len(same)} question(s) list the same option twice (item {same[0]}: "
            f"{shown(q['choices'], 80)}); equal options cannot be told apart (in cloze format they score the same "
            "and a tie goes to the earlier one, so an answer that is the later copy is never picked)"
        )
    return lines


def config_doubts(cfg) -> list[str]:
    """Lines about settings the run's method ignores (a `gere.continual.run_config.RunConfig`)."""
    lines = []
    for section, used_when, method in (("olora", ("olora",), "finetuning: olora"),
                                       ("lora", ("lora", "olora"), "finetuning: lora or olora")):  # fmt: skip
        if cfg.finetuning in used_when:
            continue
        settings = getattr(cfg, section)
        changed = [f.name for f in fields(settings) if getattr(settings, f.name) != getattr(type(settings)(), f.name)]
        if changed:
            lines.append(f"{', '.join(f'{section}.{n}' for n in changed)} set, but finetuning is "
                         f"{cfg.finetuning!r}: these settings apply only with {method} and change nothing here")  # fmt: skip
    return lines


def input_doubts(cfg, tasks: list, probe: list[dict[str, Any]] | None) -> list[str]:
    """Every line for a run: its settings, each task's examples, its probe."""
    lines = config_doubts(cfg)
    for task in tasks:
        lines += task_doubts(task.spec.name, task.train, task.test)
    if probe:
        lines += probe_doubts(probe, str(cfg.evaluation.general_mc))
    return lines
