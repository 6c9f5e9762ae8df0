from __future__ import annotations

import csv
import json

import pytest
from transformers import PreTrainedTokenizerFast

from gere.continual.prompts import build_train_features, format_prompt
from gere.continual.tasks import (
    Example,
    TaskSpec,
    load_benchmark,
    load_benchmark_definition,
    load_task,
    subsample,
)
from gere.errors import GeReError

from tiny import bos_tokenizer

WORDS = (
    "Is this review good or bad ? Option : Good Bad , Answer the movie was great awful and very long boring "
    "fun plot actors story a of it I liked hated"
).split()


def make_tokenizer() -> PreTrainedTokenizerFast:
    return bos_tokenizer(WORDS)


def spec_for(source, **kw) -> TaskSpec:
    base = {"name": "sent", "instruction": "Is this review good or bad ?", "labels": ["Good", "Bad"]}
    return TaskSpec(source=str(source), **{**base, **kw})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


ROWS = [
    {"input": f"the movie was {'great' if i % 3 else 'awful'} {i}", "label": "Good" if i % 3 else "Bad"}
    for i in range(30)
]


def test_folder_jsonl_csv_json(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    with open(tmp_path / "test.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["input", "label"])
        writer.writeheader()
        writer.writerows(ROWS[:5])
    data = load_task(spec_for(tmp_path))
    assert len(data.train) == 30 and len(data.test) == 5
    assert data.test[0] == Example("the movie was awful 0", "Bad")

    single = tmp_path / "all.json"
    single.write_text(json.dumps(ROWS))
    data = load_task(spec_for(single, test_size=6))
    assert len(data.test) == 6 and len(data.train) == 24
    # A single file is split without overlap.
    assert not {e.input for e in data.test} & {e.input for e in data.train}


def test_task_json_fills_spec(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", ROWS[:4])
    (tmp_path / "task.json").write_text(
        json.dumps({"name": "imdb", "instruction": "Rate it.", "labels": ["Good", "Bad"]})
    )
    spec = TaskSpec(source=str(tmp_path))
    assert spec.name == "imdb" and spec.labels == ["Good", "Bad"]
    assert len(load_task(spec).test) == 4


def test_malformed_jsonl_names_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"input": "a", "label": "Good"}\n\n{"input": "b", "label": \n')
    write_jsonl(tmp_path / "test.jsonl", ROWS[:2])
    with pytest.raises(GeReError, match=r"train\.jsonl, line 3"):
        load_task(spec_for(tmp_path))


def test_label_outside_label_words(tmp_path):
    rows = ROWS[:3] + [{"input": "x", "label": "Meh"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", ROWS[:2])
    with pytest.raises(
        GeReError, match=r"train\.jsonl, row 4: label 'Meh' is not one of .*\['Good', 'Bad'\]"
    ):
        load_task(spec_for(tmp_path))


@pytest.mark.parametrize(
    "labels, message",
    [(["Good"], "at least two"), (["Good", "Good"], "more than once"), (["Good", " "], "empty")],
)
def test_bad_label_words(labels, message):
    with pytest.raises(GeReError, match=message):
        TaskSpec(name="t", instruction="i", labels=labels, source="x.json")


def test_field_mapping_and_label_map(tmp_path):
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "y": i % 2} for i in range(10)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:3])
    spec = spec_for(
        tmp_path, input_field=["premise", "hypothesis"], label_field="y", label_map={0: "Bad", 1: "Good"}
    )
    data = load_task(spec)
    assert data.test[1] == Example("p1\nh1", "Good")
    spec = spec_for(
        tmp_path,
        input_field="{premise} so {hypothesis}",
        label_field="y",
        label_map={"0": "Bad", "1": "Good"},
    )
    assert load_task(spec).test[0] == Example("p0 so h0", "Bad")
    with pytest.raises(GeReError, match="no field 'text'"):
        load_task(spec_for(tmp_path, input_field="text", label_field="y", label_map={0: "Bad", 1: "Good"}))


def test_seeded_subsample_reproducible_and_stratified(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", ROWS)
    a = load_task(spec_for(tmp_path, train_size=8, seed=3))
    b = load_task(spec_for(tmp_path, train_size=8, seed=3))
    c = load_task(spec_for(tmp_path, train_size=8, seed=4))
    assert a.train == b.train and a.train != c.train
    assert sorted(e.label for e in a.train) == ["Bad"] * 4 + ["Good"] * 4  # 10 Bad / 20 Good balanced to 4/4
    plain = subsample([Example(str(i), "Good") for i in range(20)], 5, seed=1, stratify=False)
    assert len(plain) == 5 and len({e.input for e in plain}) == 5


def test_hf_source_uses_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": ["great fun", "boring"], "label": [1, 0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = TaskSpec(
        name="sst2",
        instruction="i",
        labels=["Good", "Bad"],
        source="hf:glue:sst2",
        input_field="text",
        label_map={"1": "Good", "0": "Bad"},
        test_split="validation",
    )
    data = load_task(spec)
    assert calls == [("glue", "sst2", "train"), ("glue", "sst2", "validation")]
    assert data.train[0] == Example("great fun", "Good")


def test_save_to_disk_folder(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {
            s: datasets.Dataset.from_dict({"input": ["a", "b", "c"], "label": ["Good", "Bad", "Good"]})
            for s in ("train", "test")
        }
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    data = load_task(spec_for(tmp_path / "ds"))
    assert [e.label for e in data.test] == ["Good", "Bad", "Good"]


def test_prompt_format():
    spec = spec_for("x.json")
    assert format_prompt(spec, "fun") == "Is this review good or bad ? Option: Good, Bad \nfun\nAnswer:"


def test_build_train_features_masks_prompt_and_keeps_answer():
    tok = make_tokenizer()
    spec = spec_for("x.json")
    ex = Example("I liked the movie", "Good")
    (feat,) = build_train_features(spec, [ex], tok, max_length=64)
    ids, labels = feat["input_ids"], feat["labels"]
    good, eos = tok.convert_tokens_to_ids("Good"), tok.eos_token_id
    assert ids[0] == tok.bos_token_id and ids[-2:] == [good, eos]
    assert labels == [-100] * (len(ids) - 2) + [good, eos]
    assert feat["attention_mask"] == [1] * len(ids)

    long_ex = Example("I liked the movie " + "very long boring plot " * 20 + "fun story", "Bad")
    (cut,) = build_train_features(spec, [long_ex], tok, max_length=24)
    assert len(cut["input_ids"]) <= 24
    assert cut["labels"][-2:] == [tok.convert_tokens_to_ids("Bad"), eos]
    assert sum(label != -100 for label in cut["labels"]) == 2
    text = tok.decode(cut["input_ids"])
    # The instruction, the end of the input and "Answer :" survive; the start of the input is dropped.
    assert text.startswith("<s> Is this review good or bad ?") and "fun story Answer : Bad" in text
    assert "I liked" not in text
    with pytest.raises(GeReError, match="raise max_length"):
        build_train_features(spec, [ex], tok, max_length=2)


def test_cl15_definition(tmp_path):
    definition = load_benchmark_definition("cl15")
    tasks = definition["tasks"]
    assert len(tasks) == 15
    assert tasks["rte"]["labels"] == ["contradiction", "entailment"]
    assert tasks["qqp"]["labels"] == ["True", "False"]
    assert len(tasks["dbpedia"]["labels"]) == 14 and len(tasks["yahoo"]["labels"]) == 10
    assert tasks["agnews"]["labels"][-1] == "Science or Technology"
    assert set(definition["orders"]) == {4, 5, 6}
    for order in definition["orders"].values():
        assert sorted(order) == sorted(tasks)
    for task in tasks:  # load_benchmark checks that every task's folder is there
        (tmp_path / "cl15" / task).mkdir(parents=True)
    specs = load_benchmark("cl15", order=6, data_dir=tmp_path / "cl15")
    assert [s.name for s in specs][:3] == ["yelp", "amazon", "mnli"]
    assert specs[0].source == str(tmp_path / "cl15" / "yelp") and specs[0].train_size == 5000
    with pytest.raises(GeReError, match="orders"):
        load_benchmark("cl15", order=7)
