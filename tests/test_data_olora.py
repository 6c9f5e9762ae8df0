"""gere data cl15 --from-olora on O-LoRA's layout: every problem in one run, rows without a gold label left out
and counted, the --tasks hint, O-LoRA's prompts recorded and built as its loader builds them."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from gere.cli import main
from gere.continual.prompts import build_train_features, format_prompt
from gere.continual.run_config import load_run_config
from gere.continual.tasks import load_benchmark, load_benchmark_definition, load_task
from gere.data.olora import OLORA_FOLDERS, from_olora
from gere.errors import GeReError

OLORA = Path(__file__).parent / "fixtures" / "olora" / "CL_Benchmark"  # O-LoRA's layout, made-up sentences
ORDER4 = ["mnli", "cb", "wic", "copa", "qqp", "boolq", "rte", "imdb", "yelp", "amazon", "sst2", "dbpedia", "agnews",
          "multirc", "yahoo"]  # fmt: skip
# O-LoRA's instruction file's shape (configs/instruction_config.json), with made-up instructions: each ends in a
# newline, as O-LoRA's do; the NLI group lists a few-shot entry first, which the single strategy passes over.
INSTRUCTIONS = {
    "NLI": [{"instruction_type": "few-shot", "instruction": "Fixture few-shot NLI.\n"},
            {"instruction_type": "zero-shot", "instruction": "Fixture: how do the two sentences relate?\n"},
            {"instruction_type": "zero-shot", "instruction": "Second NLI wording, never used.\n"}],
    **{group: [{"instruction_type": "zero-shot", "instruction": f"Fixture instruction of {group}.\n"}]
       for group in ("QQP", "SC", "TC", "BoolQA", "MultiRC", "WiC")},
}  # fmt: skip


def split_file(root: Path, task: str, split: str) -> Path:
    group, dataset = OLORA_FOLDERS[task]
    return root / group / dataset / f"{split}.json"


def olora_repo(tmp_path: Path, instructions: dict | None = INSTRUCTIONS) -> Path:
    """A folder laid out as O-LoRA's repository: CL_Benchmark/ and configs/instruction_config.json."""
    repo = tmp_path / "O-LoRA"
    shutil.copytree(OLORA, repo / "CL_Benchmark")
    if instructions is not None:
        (repo / "configs").mkdir()
        (repo / "configs" / "instruction_config.json").write_text(json.dumps(instructions, indent=2))
    return repo


def edit_rows(path: Path, edit) -> None:
    rows = json.loads(path.read_text())
    edit(rows)
    path.write_text(json.dumps(rows))


def test_one_run_lists_every_problem_and_the_tasks_that_would_convert(tmp_path, capsys):
    repo = olora_repo(tmp_path)
    bench = repo / "CL_Benchmark"
    for split in ("train", "test"):
        split_file(bench, "yahoo", split).unlink()  # as a copy without O-LoRA's largest files has it
    edit_rows(split_file(bench, "rte", "train"), lambda rows: [r.update(label="maybe") for r in rows[1:4]])
    edit_rows(split_file(bench, "cb", "test"), lambda rows: rows[0].pop("sentence"))
    split_file(bench, "boolq", "test").write_text('[{"sentence": "cut')
    out = tmp_path / "out"
    assert main(["data", "cl15", "--from-olora", str(repo), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "have 4 problems; nothing was written" in err and "Traceback" not in err, err
    assert "TC/yahoo has no train.json and no test.json; copy them from O-LoRA's CL_Benchmark, or leave yahoo out" in err
    assert "NLI/RTE/train.json, items 2, 3, 4: label 'maybe' is not one of ['contradiction', 'entailment']" in err
    assert "NLI/CB/test.json, item 1: 'sentence' is missing, not text; fix or remove that row" in err
    assert "BoolQA/BoolQA/test.json: not valid JSON" in err
    complete = [t for t in ["mnli", "cb", "rte", "qqp", "boolq", "multirc", "wic", "copa", "imdb", "sst2", "yelp",
                            "amazon", "agnews", "dbpedia"] if t not in ("rte", "cb", "boolq")]  # fmt: skip
    assert err.rstrip().endswith(f"The 11 complete tasks convert with: --tasks {' '.join(complete)}"), err
    assert not out.exists(), "nothing is written while there is a problem"
    hint = re.search(r"--tasks (.*)$", err.rstrip()).group(1).split()
    assert main(["data", "cl15", "--from-olora", str(repo), "--out", str(out), "--tasks", *hint]) == 0
    assert sorted(json.loads((out / "manifest.json").read_text())["tasks"]) == sorted(complete)


def test_rows_without_a_gold_label_are_left_out_and_counted_but_a_typo_is_an_error(tmp_path, caplog):
    repo = olora_repo(tmp_path)
    test_file = split_file(repo / "CL_Benchmark", "mnli", "test")
    released = json.loads(test_file.read_text())
    unlabelled = [{"sentence": "sentence 1: x\nsentence 2: y", "label": label} for label in ("-", " - ", "", None)]
    test_file.write_text(json.dumps(released[:2] + unlabelled + released[2:]))
    with caplog.at_level(logging.WARNING, logger="gere.data.olora"):
        out = from_olora(repo, tmp_path / "out", tasks=["mnli", "cb"])
    entry = json.loads((out / "manifest.json").read_text())["tasks"]["mnli"]
    assert entry["without_gold_label"] == {"train": 0, "test": 4}
    assert entry["files"]["mnli/test.json"]["rows"] == len(released)
    assert [r["input"] for r in json.loads((out / "mnli" / "test.json").read_text())] == [r["sentence"] for r in released]
    assert "NLI/MNLI/test.json: 4 rows without a gold label (e.g. '-') left out" in caplog.text
    edit_rows(test_file, lambda rows: rows[5].update(label="entailmnet"))
    with pytest.raises(GeReError, match=r"NLI/MNLI/test.json, item 6: label 'entailmnet' is not one of"):
        from_olora(repo, tmp_path / "out2", tasks=["mnli"])


def olora_expected(group: str, dataset: str, options: list[str], sentence: str) -> str:
    """The text O-LoRA's scripts put to a decoder model for one row, written out from its code
    (src/uie_dataset_lora.py, src/uie_collator.py with --add_task_name and --add_dataset_name True)."""
    head = "Task:" + group + "\n" + "Dataset:" + dataset + "\n"
    if group == "COPA":  # load_COPA_dataset: no instruction, no options
        return head + sentence + "\nAnswer:"
    instruction = [e for e in INSTRUCTIONS[group] if e["instruction_type"] == "zero-shot"][0]["instruction"]
    return head + instruction + "Option: " + ", ".join(options) + " \n" + sentence + "\nAnswer:"


def test_prompts_olora_are_built_as_olora_builds_them(tmp_path):
    from gere.continual.evaluation import evaluate_task

    from tiny import tiny_llama, tiny_tokenizer

    out = from_olora(olora_repo(tmp_path), tmp_path / "out")  # the repository: its instruction file is found
    specs = {s.name: s for s in load_benchmark("cl15", order=4, data_dir=out, prompts="olora")}
    assert list(specs) == ORDER4
    for task, spec in specs.items():
        group, dataset = OLORA_FOLDERS[task]
        options = json.loads((split_file(OLORA, task, "train").parent / "labels.json").read_text())
        data, rows = load_task(spec), json.loads(split_file(OLORA, task, "test").read_text())
        assert spec.labels == options, "O-LoRA's options, in labels.json's order and spelling"
        assert [format_prompt(spec, e.input) for e in data.test] == [
            olora_expected(group, dataset, options, r["sentence"]) for r in rows], task
        assert {e.label for e in data.train + data.test} <= set(spec.labels), "gold labels are words the prompt lists"
    assert format_prompt(specs["mnli"], "S").startswith("Task:NLI\nDataset:MNLI\nFixture: how do the two sentences relate?\n"
                                                        "Option: neutral, entailment, contradiction \nS")  # fmt: skip
    dbpedia = load_task(specs["dbpedia"])
    assert "Mean of Transportation" in {e.label for e in dbpedia.test}, "scored in O-LoRA's spelling, as listed"
    gere_spec = load_benchmark("cl15", order=4, data_dir=out, tasks=["mnli"])[0]
    assert format_prompt(gere_spec, "S") == f"{gere_spec.instruction} Option: entailment, contradiction, neutral \nS\nAnswer:"
    tokenizer, model = tiny_tokenizer(), tiny_llama()
    result = evaluate_task(model, tokenizer, specs["dbpedia"], dbpedia.test, batch_size=4, max_length=64)
    assert set(result["predictions"]) <= set(specs["dbpedia"].labels)
    assert result["correct"] == sum(p == e.label for p, e in zip(result["predictions"], dbpedia.test, strict=True))
    feature = build_train_features(specs["copa"], load_task(specs["copa"]).train[:1], tokenizer, 64)[0]
    answer = [i for i, label in zip(feature["input_ids"], feature["labels"], strict=True) if label != -100]
    assert answer == tokenizer(" " + load_task(specs["copa"]).train[0].label, add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]  # fmt: skip


def test_prompts_olora_refuse_data_without_recorded_instructions(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gere.data.olora"):
        out = from_olora(olora_repo(tmp_path, instructions=None), tmp_path / "out", tasks=["sst2", "copa"])
    assert "benchmark.prompts: olora will refuse it; pass --olora-instructions" in caplog.text
    with pytest.raises(GeReError, match=r"holds none for copa, sst2 \(no olora_prompt.json\); convert with O-LoRA's "
                                        r"instruction file: `gere data cl15 --from-olora O-LoRA .*--olora-instructions FILE; "
                                        r"or use prompts: gere"):  # fmt: skip
        load_benchmark("cl15", order=4, data_dir=out, tasks=["sst2", "copa"], prompts="olora")
    assert [s.name for s in load_benchmark("cl15", order=4, data_dir=out, tasks=["sst2", "copa"])] == ["copa", "sst2"]
    instructions = tmp_path / "instructions.json"
    instructions.write_text(json.dumps({k: v for k, v in INSTRUCTIONS.items() if k != "SC"}))
    with pytest.raises(GeReError, match=r"(?s)1 problem;.*has no zero-shot instruction for O-LoRA's group 'SC'.*"
                                        r"The complete task converts with: --tasks copa$"):  # fmt: skip
        from_olora(OLORA, out, tasks=["sst2", "copa"], instructions=instructions)
    with pytest.raises(GeReError, match=r"--olora-instructions .*O-LoRA: .*configs/instruction_config.json does not exist"):
        from_olora(OLORA, out, tasks=["sst2", "copa"], instructions=tmp_path / "O-LoRA")  # a repository without it


def test_a_missing_task_folder_names_the_tasks_present_and_configs_run_on_them(tmp_path):
    out = from_olora(OLORA, tmp_path / "cl15", tasks=ORDER4[:-1])  # yahoo left out
    shipped = Path(__file__).parent.parent / "configs"
    cfg = load_run_config(shipped / "cl15_order4.yaml", [f"benchmark.data_dir={out}"])
    present = ", ".join(ORDER4[:-1])
    with pytest.raises(GeReError, match=re.escape(f"has no folder for yahoo (1 of the 15 tasks of order 4); add it "
                                                  f"(gere data cl15 --out {out} --tasks yahoo), or train on the 14 "
                                                  f"present with tasks: [{present}]")):  # fmt: skip
        cfg.task_specs()
    with pytest.raises(GeReError, match="data_dir .*nowhere does not exist; build it with `gere data cl15"):
        load_run_config(shipped / "cl15_order4.yaml", [f"benchmark.data_dir={tmp_path / 'nowhere'}"]).task_specs()
    from_olora(OLORA, out, tasks=ORDER4[:-1], instructions=olora_repo(tmp_path))  # again, with O-LoRA's prompts
    for order in (4, 5, 6):
        cfg = load_run_config(shipped / "cl15_order4_olora14.yaml", [f"benchmark.data_dir={out}", f"benchmark.order={order}"])
        specs = cfg.task_specs()
        sequence = load_benchmark_definition("cl15")["orders"][order]
        assert [s.name for s in specs] == [t for t in sequence if t != "yahoo"], "the 14, in the order's sequence"
        assert all(s.prompt_prefix and s.prompt_prefix.startswith("Task:") for s in specs)
    with pytest.raises(GeReError, match=r"benchmark.prompts = 'o-lora' is not valid: it must be one of \['gere', 'olora'\]"):
        load_run_config(shipped / "cl15_order4_olora14.yaml", ["benchmark.prompts=o-lora"])


def test_a_run_trains_with_olora_s_prompts(tmp_path, capsys):
    import yaml

    from tiny import write_tiny_run_files

    out = from_olora(olora_repo(tmp_path), tmp_path / "cl15", tasks=["sst2", "copa"])
    model = write_tiny_run_files(tmp_path)
    config = {"name": "olora-prompts", "model": str(model), "output_dir": str(tmp_path / "run"),
              "benchmark": {"order": 4, "data_dir": str(out), "tasks": ["sst2", "copa"], "prompts": "olora"},
              "gere": {"replay_source": str(tmp_path / "replay.jsonl"), "num_replay_samples": 8, "replay_max_length": 16,
                       "replay_batch_size": 2},
              "training": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 64, "optim": "adamw_torch"},
              "evaluation": {"perplexity_sets": {"heldout": str(tmp_path / "heldout.jsonl")}}}  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "run.yaml"), "--no-progress"]) == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["tasks"] == ["copa", "sst2"] and results["test_sizes"] == [2, 2]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["benchmark"]["prompts"] == "olora"


def test_problems_past_the_message_s_length_are_each_logged(tmp_path, caplog):
    repo = olora_repo(tmp_path, instructions=None)
    for task in OLORA_FOLDERS:
        split_file(repo / "CL_Benchmark", task, "test").unlink()
    with caplog.at_level(logging.ERROR, logger="gere.data.olora"), pytest.raises(GeReError) as err:
        from_olora(repo, tmp_path / "out")
    message = str(err.value)
    assert "characters left out" not in message, "within GeReError's length, so never cut in the middle"
    assert "have 15 problems" in message and message.endswith("(every problem is logged above)\nNo task is complete.")
    listed = message.count("\n  - ") - 1  # the last line says how many more
    assert 1 <= listed < 15 and f"... and {15 - listed} more" in message
    assert sorted(r.getMessage() for r in caplog.records) == sorted(
        f"{'/'.join(OLORA_FOLDERS[t])} has no test.json; copy it from O-LoRA's CL_Benchmark, or leave {t} out with --tasks"
        for t in OLORA_FOLDERS)  # fmt: skip
    assert not (tmp_path / "out").exists()
