"""gere data cl15 on local fixtures laid out like each source (no network): counts, labels, layout."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from gere.cli import main
from gere.continual.tasks import load_benchmark, load_task
from gere.data.cl15 import LABEL_ORDER, SOURCES, build_cl15, from_olora
from gere.errors import GeReError
from gere.io_utils import sha256_file

COLUMNS = {  # each source's own columns, as on the Hub
    "mnli": ["premise", "hypothesis"], "cb": ["premise", "hypothesis"], "rte": ["sentence1", "sentence2"],
    "qqp": ["question1", "question2"], "boolq": ["passage", "question"], "multirc": ["paragraph", "question", "answer"],
    "wic": ["word", "sentence1", "sentence2"], "copa": ["premise", "choice1", "choice2", "question"],
    "imdb": ["text"], "sst2": ["sentence"], "yelp": ["text"], "agnews": ["text"], "dbpedia": ["title", "content"],
    "yahoo": ["question_title", "question_content", "best_answer"],
}  # fmt: skip
CLASSES = {"dbpedia": 14, "yahoo": 10}


def write_mirror(root):
    for task, source in SOURCES.items():
        n_classes = CLASSES.get(task) or len(LABEL_ORDER[task])
        label_key = "topic" if task == "yahoo" else "label"
        folder = root / source.dataset / (source.config or "default")
        folder.mkdir(parents=True, exist_ok=True)
        for split, per_class in zip(source.splits, (5, 4), strict=True):
            rows = [{**{c: f"{c} {task} {split} {k} {i}" for c in COLUMNS[task]}, label_key: k}
                    for k in range(n_classes) for i in range(per_class)]  # fmt: skip
            if split.startswith("validation") and task in ("qqp",):
                rows.append({**rows[0], "label": -1})  # an unlabelled row, as GLUE's test splits hold
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_amazon(path):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        for stars in range(1, 6):
            for i in range(40):
                writer.writerow([stars, f"title {stars} {i}", f"review text {stars} {i}"])


def test_every_task_is_built_balanced_and_loads(tmp_path):
    write_mirror(tmp_path / "mirror")
    write_amazon(tmp_path / "amazon.csv")
    out = build_cl15(tmp_path / "cl15", amazon_csv=tmp_path / "amazon.csv", mirror=tmp_path / "mirror", per_class=3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["tasks"]) == 15
    for spec in load_benchmark("cl15", order=4, data_dir=out):
        data = load_task(spec)
        counts = Counter(e.label for e in data.train)
        assert set(counts) == set(spec.labels) and set(counts.values()) == {3}, spec.name
        assert len(data.test) == 3 * len(spec.labels)
        for name in ("train", "test"):
            entry = manifest["tasks"][spec.name]["files"][f"{spec.name}/{name}.json"]
            assert entry["sha256"] == sha256_file(out / spec.name / f"{name}.json")
    mnli = json.loads((out / "mnli" / "train.json").read_text())
    assert all(r["input"].startswith("premise mnli train") and "\nhypothesis" in r["input"] for r in mnli)
    copa = json.loads((out / "copa" / "test.json").read_text())
    assert all("\nA: choice1" in r["input"] and r["label"] in ("A", "B") for r in copa)


def test_amazon_needs_its_csv_and_missing_mirror_files_are_named(tmp_path):
    with pytest.raises(GeReError, match="--amazon-csv"):
        build_cl15(tmp_path / "o", mirror=tmp_path)
    with pytest.raises(GeReError, match="mirror has no .*nyu-mll/glue/sst2/train.jsonl"):
        build_cl15(tmp_path / "o", mirror=tmp_path, tasks=["sst2"])


def test_from_olora_keeps_its_samples(tmp_path):
    for task, group, words in (("mnli", "NLI", ["entailment", "neutral", "contradiction"]), ("imdb", "SC", ["Good", "Bad"])):
        for name in ("train", "test"):
            folder = tmp_path / "CL_Benchmark" / group / task
            folder.mkdir(parents=True, exist_ok=True)
            data = {"Definition": ["..."], "Instances": [{"id": str(i), "sentence": f"{task} {name} {i}",
                                                          "label": words[i % len(words)].lower()} for i in range(6)]}  # fmt: skip
            (folder / f"{name}.json").write_text(json.dumps(data))
    with pytest.raises(GeReError, match="no \\*/cb/train.json"):
        from_olora(tmp_path / "CL_Benchmark", tmp_path / "out")
    # With the rest of the tasks in place, the conversion keeps every instance with the benchmark's words.
    from gere.continual.tasks import load_benchmark_definition

    for task, entry in load_benchmark_definition("cl15")["tasks"].items():
        folder = tmp_path / "CL_Benchmark" / "X" / task
        if task in ("mnli", "imdb"):
            continue
        folder.mkdir(parents=True)
        for name in ("train", "test"):
            (folder / f"{name}.json").write_text(json.dumps({"Instances": [
                {"sentence": f"{task} {i}", "label": entry["labels"][i % len(entry["labels"])]} for i in range(4)]}))  # fmt: skip
    assert main(["data", "cl15", "--from-olora", str(tmp_path / "CL_Benchmark"), "--out", str(tmp_path / "out")]) == 0
    imdb = json.loads((tmp_path / "out" / "imdb" / "train.json").read_text())
    assert [r["label"] for r in imdb] == ["Good", "Bad"] * 3 and imdb[0]["input"] == "imdb train 0"
