"""gere data cl15 on local fixtures laid out like each source (no network): counts, labels, layout."""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from gere.cli import main
from gere.continual.tasks import load_benchmark, load_task
from gere.data.cl15 import LABEL_ORDER, SOURCES, build_cl15
from gere.data.olora import OLORA_FOLDERS, from_olora
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


OLORA = Path(__file__).parent / "fixtures" / "olora" / "CL_Benchmark"  # O-LoRA's layout, made-up sentences


def olora_file(root, task, split):
    group, dataset = OLORA_FOLDERS[task]
    return root / group / dataset / f"{split}.json"


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_from_olora_reads_olora_s_own_layout(tmp_path):
    assert main(["data", "cl15", "--from-olora", str(OLORA.parent), "--out", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(manifest["tasks"]) == sorted(OLORA_FOLDERS)
    assert not list((tmp_path / "out").glob(".staging-*")), "the staging folder is gone"
    for spec in load_benchmark("cl15", order=5, data_dir=tmp_path / "out"):
        data = load_task(spec)
        source = json.loads(olora_file(OLORA, spec.name, "train").read_text())
        assert [e.input for e in data.train] == [r["sentence"] for r in source], spec.name
        assert Counter(e.label for e in data.train) == dict.fromkeys(spec.labels, 2), spec.name
        assert len(data.test) == len(spec.labels)
        entry = manifest["tasks"][spec.name]
        assert entry["source"].endswith("/".join(OLORA_FOLDERS[spec.name]))
        assert entry["files"][f"{spec.name}/test.json"]["sha256"] == sha256_file(tmp_path / "out" / spec.name / "test.json")
    dbpedia = json.loads((tmp_path / "out" / "dbpedia" / "train.json").read_text())
    assert "Mean Of Transportation" in {r["label"] for r in dbpedia}, "O-LoRA's 'Mean of' in cl15's spelling"


def test_from_olora_takes_a_subset_and_keeps_earlier_tasks(tmp_path):
    out = tmp_path / "out"
    from_olora(OLORA, out, tasks=["sst2", "boolq"])
    assert sorted(p.name for p in out.iterdir()) == ["boolq", "manifest.json", "sst2"]
    before = (out / "sst2" / "train.json").read_bytes()
    from_olora(OLORA, out, tasks=["copa"])  # a later conversion of another task keeps the first two
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["tasks"]) == ["boolq", "copa", "sst2"]
    assert (out / "sst2" / "train.json").read_bytes() == before
    with pytest.raises(GeReError, match="no task 'sst-2' \\(did you mean 'sst2'\\?\\)"):
        from_olora(OLORA, out, tasks=["sst-2"])


def test_a_bad_source_file_leaves_the_earlier_conversion_whole(tmp_path, capsys):
    out = tmp_path / "out"
    from_olora(OLORA, out)
    before = snapshot(out)
    source = tmp_path / "CL_Benchmark"
    shutil.copytree(OLORA, source)
    text = olora_file(source, "yahoo", "test").read_text()
    olora_file(source, "yahoo", "test").write_text(text[: len(text) // 2])  # truncated: yahoo is the last task
    assert main(["data", "cl15", "--from-olora", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "TC/yahoo/test.json: not valid JSON" in err and "Traceback" not in err
    assert snapshot(out) == before, "no task and not the manifest changed"
    assert not list(out.glob(".staging-*"))


@pytest.mark.parametrize(
    "task,content,words",
    [
        ("mnli", ["a", "b"], "MNLI/train.json, items 1, 2: expected a JSON object .*, got str; fix or remove those rows"),
        ("cb", [{"label": "neutral"}], "CB/train.json, item 1: 'sentence' is missing, not text; fix or remove that row"),
        ("rte", [{"sentence": "s", "label": "maybe"}], "RTE/train.json, item 1: label 'maybe' is not one of"),
        ("wic", {"Instances": []}, "WiC/train.json: expected a JSON list of objects"),
        ("qqp", [], "QQP/train.json holds no labelled rows"),
    ],
)
def test_malformed_olora_rows_name_the_file_and_row(tmp_path, capsys, task, content, words):
    source = tmp_path / "CL_Benchmark"
    shutil.copytree(OLORA, source)
    olora_file(source, task, "train").write_text(json.dumps(content))
    assert main(["data", "cl15", "--from-olora", str(source), "--out", str(tmp_path / "out"), "--tasks", task]) == 2
    err = capsys.readouterr().err
    assert re.search(words, err) and "Traceback" not in err, err
    assert not (tmp_path / "out" / task).exists() and not (tmp_path / "out" / "manifest.json").exists()


def test_olora_folders_missing_or_of_another_task_are_named(tmp_path, capsys):
    source = tmp_path / "CL_Benchmark"
    shutil.copytree(OLORA, source)
    shutil.rmtree(source / "SC" / "SST-2")
    with pytest.raises(GeReError, match="SC/SST-2 does not exist \\(O-LoRA's folder of sst2\\).*leave sst2 out with --tasks"):
        from_olora(source, tmp_path / "out")
    (source / "NLI" / "RTE" / "labels.json").write_text(json.dumps(["True", "False"]))
    with pytest.raises(GeReError, match="RTE/labels.json lists the labels \\['True', 'False'\\]"):
        from_olora(source, tmp_path / "out", tasks=["rte"])
    # A folder named as gere names the task is found too.
    (source / "SC" / "sst2").mkdir()
    for split in ("train", "test"):
        shutil.copy(olora_file(OLORA, "sst2", split), source / "SC" / "sst2" / f"{split}.json")
    assert from_olora(source, tmp_path / "out", tasks=["sst2"]) == tmp_path / "out"
    flags = ["data", "cl15", "--from-olora", str(source), "--per-class", "5", "--out", str(tmp_path / "o")]
    assert main(flags) == 2 and "--per-class would be ignored" in capsys.readouterr().err


def test_a_failing_hub_build_leaves_the_earlier_build_whole(tmp_path):
    write_mirror(tmp_path / "mirror")
    out = build_cl15(tmp_path / "cl15", mirror=tmp_path / "mirror", per_class=2, tasks=["sst2", "imdb"])
    before = snapshot(out)
    (tmp_path / "mirror" / "stanfordnlp/imdb/default/test.jsonl").write_text('{"text": "cut off')
    with pytest.raises(GeReError, match="imdb/default/test.jsonl, line 1: not valid JSON"):
        build_cl15(out, mirror=tmp_path / "mirror", per_class=3, tasks=["sst2", "imdb"])
    assert snapshot(out) == before


def test_a_run_trains_on_a_subset_of_the_converted_benchmark(tmp_path, capsys):
    import yaml

    from tiny import write_tiny_run_files

    from_olora(OLORA, tmp_path / "cl15")
    model = write_tiny_run_files(tmp_path)
    config = {"name": "olora-subset", "model": str(model), "output_dir": str(tmp_path / "run"),
              "benchmark": {"order": 4, "data_dir": str(tmp_path / "cl15"), "tasks": ["sst2", "copa"]},
              "gere": {"replay_source": str(tmp_path / "replay.jsonl"), "num_replay_samples": 8, "replay_max_length": 16,
                       "replay_batch_size": 2},
              "training": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 64, "optim": "adamw_torch"},
              "evaluation": {"perplexity_sets": {"heldout": str(tmp_path / "heldout.jsonl")}}}  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "run.yaml"), "--no-progress"]) == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["tasks"] == ["copa", "sst2"], "the subset, in order 4's sequence"
    assert results["test_sizes"] == [2, 2]
    config["benchmark"]["tasks"] = ["sst-2"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "run.yaml"), "--overwrite"]) == 2
    assert "benchmark: tasks: cl15 has no task 'sst-2' (did you mean 'sst2'?)" in capsys.readouterr().err
