"""The general suite's table of benchmarks: each benchmark's released files, reader, prompt, choices and
scoring, one entry each (as lm-evaluation-harness's task registry holds one YAML per task).

Prompts are lm-eval 0.4's own (its task YAMLs ``arc_easy``, ``piqa``, ``openbookqa``, ``commonsense_qa``,
``mmlu`` default template and ``lambada_openai``): the context is the task's description (MMLU's) and its
``doc_to_text``, a choice's continuation is lm-eval's target delimiter (one space) and the choice's text.
Rows are read in the formats the benchmarks' authors release (not the Hugging Face copies'), so each
reader maps the released field names onto those templates' fields. Adding a benchmark is one entry of
`BENCHMARKS`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gere.errors import GeReError, shown
from gere.reading import check_regular_file, jsonl_values, read_text

#: Between a context and each continuation: lm-eval's default ``target_delimiter``.
#: The ``evaluation.general`` value that makes the suite the run's general score.
SUITE = "suite"
#: Where a run reads the suite's files when ``evaluation.general_suite_dir`` is not set.
DEFAULT_SUITE_DIR = "data/general"
TARGET_DELIMITER = " "
SCORINGS = ("multiple_choice", "last_word")
LETTERS = "ABCDEFGHIJ"

Row = dict[str, Any]
Located = tuple[tuple[str, int], Row]  # ((file relative to the data folder, 0-based row), the released row)


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: where its rows are, how they are read, prompted and scored."""

    name: str
    files: str  # the released file(s) under the data folder, for messages and docs
    read: Callable[[Path], list[Located]]  # data folder -> released rows with their (file, row) keys
    prompt: Callable[[Row], str]  # the context (lm-eval's description + doc_to_text)
    choices: Callable[[Row], list[str]]  # each continuation's text, without the delimiter
    gold: Callable[[Row], int]  # index of the right choice
    scoring: str  # "multiple_choice" (acc, acc_norm) or "last_word" (acc = greedy, perplexity)
    metric: str  # the score counted into the general score
    lm_eval_task: str  # the lm-eval task whose prompt this is
    group: Callable[[Row], str] | None = None  # stratum of the seeded subsample (MMLU: the subject)
    fields: tuple[str, ...] = field(default=())  # the released fields every row must have


def _need(row: Any, where: str, keys: tuple[str, ...], what: str) -> Row:
    if not isinstance(row, dict):
        raise GeReError(f"{where}: expected a JSON object of {what}, got {shown(row, 60)}; fix or remove that line")
    missing = [k for k in keys if k not in row]
    if missing:
        raise GeReError(f"{where}: missing field(s) {missing} of {what} (each row needs {list(keys)}); fix or "
                        "remove that row, or give the file as released")  # fmt: skip
    return row


def _file(folder: Path, rel: str, bench: str) -> Path:
    path = folder / rel
    if not path.exists():
        raise GeReError(f"general suite benchmark {bench!r}: {path} does not exist; put the released file there "
                        f"(evaluation.general_suite_dir names the folder), or drop {bench!r} from "
                        "evaluation.general_suite")  # fmt: skip
    return check_regular_file(path, f"{bench} file")


def _jsonl(rel: str, bench: str, keys: tuple[str, ...]) -> Callable[[Path], list[Located]]:
    def read(folder: Path) -> list[Located]:
        path = _file(folder, rel, bench)
        rows = [_need(v, w, keys, bench) for w, v in jsonl_values(read_text(path, what=bench), path, bench)]
        return [((rel, i), row) for i, row in enumerate(rows)]

    return read


def _labelled(row: Row, where: str, key: str) -> tuple[list[str], int]:
    """The choice texts of an ARC / OpenBookQA / CommonsenseQA row and the index of its answer key."""
    question = row["question"]
    choices = question.get("choices") if isinstance(question, dict) else None
    if not isinstance(choices, list) or not all(isinstance(c, dict) and {"text", "label"} <= set(c) for c in choices):
        raise GeReError(f"{where}: question.choices must be a list of {{'text', 'label'}}; give the file as released")
    labels = [str(c["label"]) for c in choices]
    answer = str(row[key]).lstrip()
    if answer not in labels:
        raise GeReError(f"{where}: {key} {shown(answer)} is none of the labels {labels}; fix or remove that row")
    return [str(c["text"]) for c in choices], labels.index(answer)


def _checked(read: Callable[[Path], list[Located]], check: Callable[[Row, str], Any]):
    """A reader whose rows pass ``check(row, where)`` first, so a bad row is found when the suite loads."""

    def checked(folder: Path) -> list[Located]:
        located = read(folder)
        for (rel, i), row in located:
            check(row, f"{folder / rel}, row {i + 1}")
        return located

    return checked


def _stem(row: Row) -> str:
    question = row["question"]
    if not isinstance(question, dict) or not isinstance(question.get("stem"), str):
        raise GeReError(f"row {shown(row.get('id'))}: question.stem is missing; give the file as released")
    return question["stem"]


def _read_piqa(folder: Path) -> list[Located]:
    rows = _jsonl("piqa/valid.jsonl", "piqa", ("goal", "sol1", "sol2"))(folder)
    labels_path = _file(folder, "piqa/valid-labels.lst", "piqa")
    labels = [line.strip() for line in read_text(labels_path, what="piqa labels").splitlines() if line.strip()]
    if len(labels) != len(rows):
        raise GeReError(f"{labels_path} holds {len(labels)} labels for the {len(rows)} rows of piqa/valid.jsonl; "
                        "give both files as released (one label per row)")  # fmt: skip
    for n, label in enumerate(labels, start=1):
        if label not in ("0", "1"):
            raise GeReError(f"{labels_path}, line {n}: label {shown(label)} is not 0 or 1; fix that line")
    return [(key, {**row, "label": int(label)}) for (key, row), label in zip(rows, labels, strict=True)]


MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")


def _read_mmlu(folder: Path) -> list[Located]:
    """MMLU's ``test/<subject>_test.csv`` files, without a header (question, A, B, C, D, answer), in name order."""
    test = folder / "mmlu" / "test"
    files = sorted(test.glob("*_test.csv")) if test.is_dir() else []
    if not files:
        raise GeReError(f"general suite benchmark 'mmlu': no <subject>_test.csv file in {test}; put MMLU's "
                        "released test folder there, or drop 'mmlu' from evaluation.general_suite")  # fmt: skip
    located: list[Located] = []
    for path in files:
        text = read_text(check_regular_file(path, "mmlu file"), what="mmlu file")
        subject = path.name[: -len("_test.csv")]
        for i, values in enumerate(v for v in csv.reader(io.StringIO(text, newline="")) if v):
            if len(values) != len(MMLU_COLUMNS) or values[5] not in "ABCD" or not values[5]:
                raise GeReError(f"{path}, row {i + 1}: expected 6 fields (question, A, B, C, D, answer letter A-D) "
                                f"without a header, got {shown(values, 80)}; fix or remove that row")  # fmt: skip
            located.append(((f"mmlu/test/{path.name}", i), {**dict(zip(MMLU_COLUMNS, values)), "subject": subject}))
    return located


def _mmlu_prompt(row: Row) -> str:
    subject = row["subject"].replace("_", " ")
    options = "".join(f"\n{letter}. {row[letter]}" for letter in "ABCD")
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n" \
           f"{row['question'].strip()}{options}\nAnswer:"  # fmt: skip


def _csqa_prompt(row: Row) -> str:
    texts, _ = _labelled(row, f"commonsenseqa row {shown(row.get('id'))}", "answerKey")
    options = "".join(f"\n{LETTERS[k]}. {text}" for k, text in enumerate(texts))
    return f"Question: {row['question']['stem'].strip()}{options}\nAnswer:"


def _lambada_context(row: Row) -> str:
    return " ".join(row["text"].split(" ")[:-1])


def _lambada_word(row: Row) -> str:
    return row["text"].split(" ")[-1]


def _check_labelled(row: Row, where: str) -> None:
    _labelled(row, where, "answerKey")
    _stem(row)


def _check_lambada(row: Row, where: str) -> None:
    if not isinstance(row["text"], str) or len(row["text"].split(" ")) < 2:
        raise GeReError(f"{where}: text must be a passage of two words or more; fix or remove that row")


_ARC_READ = _checked(_jsonl("arc_easy/ARC-Easy-Test.jsonl", "arc_easy", ("question", "answerKey")), _check_labelled)
_OBQA_READ = _checked(_jsonl("openbookqa/test.jsonl", "openbookqa", ("question", "answerKey")), _check_labelled)
_CSQA_READ = _checked(_jsonl("commonsenseqa/dev_rand_split.jsonl", "commonsenseqa", ("question", "answerKey")),
                      _check_labelled)  # fmt: skip
_LAMBADA_READ = _checked(_jsonl("lambada/lambada_test.jsonl", "lambada", ("text",)), _check_lambada)

#: Every benchmark of the suite, by the name `evaluation.general_suite` uses.
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("arc_easy", "arc_easy/ARC-Easy-Test.jsonl", _ARC_READ,
              prompt=lambda r: f"Question: {_stem(r)}\nAnswer:",
              choices=lambda r: _labelled(r, "arc_easy", "answerKey")[0],
              gold=lambda r: _labelled(r, "arc_easy", "answerKey")[1],
              scoring="multiple_choice", metric="acc_norm", lm_eval_task="arc_easy"),
    Benchmark("piqa", "piqa/valid.jsonl + piqa/valid-labels.lst", _read_piqa,
              prompt=lambda r: f"Question: {r['goal']}\nAnswer:",
              choices=lambda r: [r["sol1"], r["sol2"]], gold=lambda r: r["label"],
              scoring="multiple_choice", metric="acc_norm", lm_eval_task="piqa"),
    Benchmark("openbookqa", "openbookqa/test.jsonl", _OBQA_READ,
              prompt=_stem,
              choices=lambda r: _labelled(r, "openbookqa", "answerKey")[0],
              gold=lambda r: _labelled(r, "openbookqa", "answerKey")[1],
              scoring="multiple_choice", metric="acc_norm", lm_eval_task="openbookqa"),
    Benchmark("commonsenseqa", "commonsenseqa/dev_rand_split.jsonl", _CSQA_READ,
              prompt=_csqa_prompt,
              choices=lambda r: list(LETTERS[: len(r["question"]["choices"])]),
              gold=lambda r: _labelled(r, "commonsenseqa", "answerKey")[1],
              scoring="multiple_choice", metric="acc", lm_eval_task="commonsense_qa"),
    Benchmark("mmlu", "mmlu/test/<subject>_test.csv", _read_mmlu,
              prompt=_mmlu_prompt, choices=lambda r: list("ABCD"), gold=lambda r: "ABCD".index(r["answer"]),
              scoring="multiple_choice", metric="acc", lm_eval_task="mmlu", group=lambda r: r["subject"]),
    Benchmark("lambada", "lambada/lambada_test.jsonl", _LAMBADA_READ,
              prompt=_lambada_context, choices=lambda r: [_lambada_word(r)], gold=lambda r: 0,
              scoring="last_word", metric="acc", lm_eval_task="lambada_openai"),
]}  # fmt: skip


def suite_folders(names: list[str]) -> list[str]:
    """The folders (relative to the suite's folder) that hold the named benchmarks' files: what a resumed run
    checks for changes."""
    return [str(Path(BENCHMARKS[n].files.split(" + ")[0]).parent) for n in names]


def benchmark(name: str) -> Benchmark:
    """The table entry of `name`; an unknown name is an error listing the suite."""
    if name not in BENCHMARKS:
        raise GeReError(f"evaluation.general_suite: {shown(name)} is not a benchmark of the suite; use some of "
                        f"{list(BENCHMARKS)}")  # fmt: skip
    return BENCHMARKS[name]
