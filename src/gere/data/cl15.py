"""``gere data cl15``: the 15 tasks of the long-sequence benchmark, built into the layout `load_benchmark` reads.

Each task comes from its public source on the Hugging Face Hub (GLUE, SuperGLUE through the Hub's parquet
conversion, IMDB, Yelp, DBpedia, AG News, Yahoo Answers) or, for Amazon's 5-class reviews, which have no
canonical Hub copy, from a CSV the user gives (``label,title,text``, labels 1-5). As in Progressive Prompts
and O-LoRA, training data are about 1,000 examples per class (seeded, class-balanced) and the test pool is
as large, drawn from the source's evaluation split where it has labels. Rows become ``{"input", "label"}``
with the benchmark's label words (`gere.benchmarks/cl15.yaml`); ``manifest.json`` records the sources,
counts and sha256 of every file written.

``--hub-mirror DIR`` reads local copies in the same layout instead of the Hub: ``DIR/<dataset>/<config or
default>/<split>.{jsonl,json,csv,parquet}`` with the source's own columns (the tests use it).
``--from-olora DIR`` converts O-LoRA's ``CL_Benchmark`` JSON files instead, for the paper's exact data
(`gere.data.olora`). Either way every task is read and written into a staging folder first and swapped into
place with ``manifest.json`` written last (`gere.data.staging`), so a source that fails half-way leaves an
earlier conversion in ``--out`` as it was.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gere.continual.tasks import load_benchmark_definition
from gere.data.staging import StagedConversion
from gere.errors import GeReError, check_task_names
from gere.io_utils import read_rows

logger = logging.getLogger(__name__)

PER_CLASS = 1000


@dataclass(frozen=True)
class Source:
    """Where a task's rows come from and how a row becomes ``(input, label index)``."""

    dataset: str
    config: str | None
    splits: tuple[str, str]  # (train, test pool)
    text: Callable[[dict], str]
    label: Callable[[dict], int] = lambda row: int(row["label"])


def _join(*fields: str) -> Callable[[dict], str]:
    return lambda row: "\n".join(str(row[f]) for f in fields)


GLUE, SUPERGLUE = "nyu-mll/glue", "aps/super_glue"
SOURCES: dict[str, Source] = {
    # label index -> the task's label words in cl15.yaml order, given by LABEL_ORDER below
    "mnli": Source(GLUE, "mnli", ("train", "validation_matched"), _join("premise", "hypothesis")),
    "cb": Source(SUPERGLUE, "cb", ("train", "validation"), _join("premise", "hypothesis")),
    "rte": Source(GLUE, "rte", ("train", "validation"), _join("sentence1", "sentence2")),
    "qqp": Source(GLUE, "qqp", ("train", "validation"), _join("question1", "question2")),
    "boolq": Source(SUPERGLUE, "boolq", ("train", "validation"), _join("passage", "question")),
    "multirc": Source(SUPERGLUE, "multirc", ("train", "validation"), _join("paragraph", "question", "answer")),
    "wic": Source(SUPERGLUE, "wic", ("train", "validation"),
                  lambda r: f"Word: {r['word']}\n{r['sentence1']}\n{r['sentence2']}"),
    "copa": Source(SUPERGLUE, "copa", ("train", "validation"),
                   lambda r: f"{r['premise']} What was the {r['question']}?\nA: {r['choice1']}\nB: {r['choice2']}"),
    "imdb": Source("stanfordnlp/imdb", None, ("train", "test"), _join("text")),
    "sst2": Source(GLUE, "sst2", ("train", "validation"), _join("sentence")),
    "yelp": Source("Yelp/yelp_review_full", None, ("train", "test"), _join("text")),
    "agnews": Source("fancyzhx/ag_news", None, ("train", "test"), _join("text")),
    "dbpedia": Source("fancyzhx/dbpedia_14", None, ("train", "test"), _join("title", "content")),
    "yahoo": Source("community-datasets/yahoo_answers_topics", None, ("train", "test"),
                    _join("question_title", "question_content", "best_answer"), lambda r: int(r["topic"])),
}  # fmt: skip
# The source's label index -> the task's label word (the sources' own orders).
LABEL_ORDER: dict[str, list[str]] = {
    "mnli": ["entailment", "neutral", "contradiction"],
    "cb": ["entailment", "contradiction", "neutral"],
    "rte": ["entailment", "contradiction"],
    "qqp": ["False", "True"],
    "boolq": ["False", "True"],
    "multirc": ["False", "True"],
    "wic": ["False", "True"],
    "copa": ["A", "B"],
    "imdb": ["Bad", "Good"],
    "sst2": ["Bad", "Good"],
    "yelp": ["very negative", "negative", "neutral", "positive", "very positive"],
    "amazon": ["very negative", "negative", "neutral", "positive", "very positive"],
    "agnews": ["World", "Sports", "Business", "Science or Technology"],
}


def _load_split(source: Source, split: str, mirror: Path | None) -> list[dict[str, Any]]:
    if mirror is not None:
        folder = mirror / source.dataset / (source.config or "default")
        found = [p for p in sorted(folder.glob(f"{split}.*")) if p.suffix in (".jsonl", ".json", ".csv", ".parquet")]
        if not found:
            raise GeReError(f"the mirror has no {folder}/{split}.jsonl (or .json, .csv, .parquet); add it")
        if found[0].suffix == ".parquet":
            import datasets

            return [dict(r) for r in datasets.load_dataset("parquet", data_files=str(found[0]), split="train")]
        return read_rows(found[0])
    import datasets

    revision = {"revision": "refs/convert/parquet"} if source.dataset == SUPERGLUE else {}
    try:
        ds = datasets.load_dataset(source.dataset, source.config, split=split, **revision)
    except Exception as err:  # network, renamed dataset: the user can mirror it
        raise GeReError(f"could not load {source.dataset} ({source.config}, {split}) from the Hub: {err}; download it "
                        "and pass --hub-mirror DIR with DIR/<dataset>/<config>/<split>.jsonl") from None  # fmt: skip
    return [dict(r) for r in ds]


def balanced_sample(rows: list[dict[str, str]], per_class: int, seed: int) -> list[dict[str, str]]:
    """At most ``per_class`` rows of each label, seeded; shuffled together."""
    rng = random.Random(seed)
    by_label: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_label[row["label"]].append(row)
    chosen = []
    for label in sorted(by_label):
        pool = by_label[label]
        chosen += rng.sample(pool, min(per_class, len(pool)))
    rng.shuffle(chosen)
    return chosen


def _examples(task: str, rows: list[dict[str, Any]], source: Source | None) -> list[dict[str, str]]:
    words = LABEL_ORDER.get(task) or load_benchmark_definition("cl15")["tasks"][task]["labels"]
    out = []
    for row in rows:
        index = source.label(row) if source else int(row["label"]) - 1  # Amazon CSV: stars 1-5
        if 0 <= index < len(words):  # GLUE test splits carry -1: unlabelled
            out.append({"input": source.text(row) if source else f"{row['title']}\n{row['text']}",
                        "label": words[index]})  # fmt: skip
    return out


def build_cl15(out: str | Path, *, amazon_csv: str | Path | None = None, mirror: str | Path | None = None,
               per_class: int = PER_CLASS, seed: int = 0, tasks: list[str] | None = None) -> Path:  # fmt: skip
    """Build ``out/<task>/{train,test}.json`` for every task (or ``tasks``) and ``out/manifest.json``."""
    mirror = Path(mirror) if mirror is not None else None
    wanted = check_task_names(tasks, list(load_benchmark_definition("cl15")["tasks"]))
    if "amazon" in wanted and amazon_csv is None:
        raise GeReError("amazon has no canonical Hub copy: pass --amazon-csv FILE (label,title,text; labels 1-5), "
                        "or leave amazon out with --tasks")  # fmt: skip
    with StagedConversion(out) as staged:
        for task in wanted:
            source = SOURCES.get(task)
            if source is None:
                train_rows, test_rows = _amazon_rows(Path(amazon_csv))
            else:
                train_rows, test_rows = (_load_split(source, s, mirror) for s in source.splits)
            split = {"train": balanced_sample(_examples(task, train_rows, source), per_class, seed),
                     "test": balanced_sample(_examples(task, test_rows, source), per_class, seed + 1)}  # fmt: skip
            where = "amazon CSV" if source is None else f"{source.dataset}:{source.config or 'default'}"
            staged.write_task(task, split, source=where, per_class=per_class, seed=seed)
            logger.info("cl15 %s: %d train, %d test from %s", task, len(split["train"]), len(split["test"]), where)
        return staged.commit(benchmark="cl15")


def _amazon_rows(path: Path) -> tuple[list[dict], list[dict]]:
    """The user's Amazon CSV, without a header (``label,title,text``), split 90/10 within each class by a
    seeded shuffle."""
    import csv

    if not path.is_file():
        raise GeReError(f"--amazon-csv {path} does not exist")
    with open(path, encoding="utf-8", newline="") as f:
        rows = [{"label": r[0], "title": r[1], "text": r[2]} for r in csv.reader(f) if len(r) >= 3 and r[0].isdigit()]
    if not rows:
        raise GeReError(f"{path} holds no rows of label,title,text with labels 1-5")
    rng, train, test = random.Random(0), [], []
    by_label: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_label[row["label"]].append(row)
    for label in sorted(by_label):
        pool = by_label[label]
        rng.shuffle(pool)
        cut = max(1, len(pool) // 10)
        test += pool[:cut]
        train += pool[cut:]
    return train, test
