"""General ability through lm-evaluation-harness: local task YAMLs, offline, on the in-memory model."""

import json
import random

import pytest
import torch
import yaml

from gere.continual.lm_eval_general import LmEvalGeneral, lm_eval_tasks
from gere.continual.multiple_choice import evaluate_multiple_choice, load_multiple_choice
from gere.continual.run_config import load_run_config
from gere.continual.runner import run_continual
from gere.errors import GeReError

from tiny import WORDS, tiny_llama, tiny_tokenizer, write_tiny_run_files

pytest.importorskip("lm_eval")

CHOICES = ["north", "south", "good", "bad"]


def questions(n: int = 12) -> list[dict]:
    rng = random.Random(0)
    return [{"question": " ".join(rng.sample(WORDS[:40], 4)), "choices": CHOICES, "answer": i % 4, "subject": "x"}
            for i in range(n)]  # fmt: skip


def write_task(folder, rows, name="tiny_probe", metrics=("acc", "acc_norm")):
    """A local lm-eval multiple-choice task over a JSONL file (no hub)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
    }  # fmt: skip
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task))
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("lm_eval_tasks"), questions())


def test_lm_eval_accuracy_equals_the_built_in_cloze_sum_and_keeps_mode_and_rng(task_dir):
    model, tok = tiny_llama(vocab_size=len(tiny_tokenizer()), seed=3), tiny_tokenizer()
    model.train()
    torch.manual_seed(11)
    before = torch.random.get_rng_state()
    score = LmEvalGeneral(["tiny_probe"], include_path=str(task_dir), batch_size=5)(model, tok)
    # The same questions scored by gere's own cloze evaluator: the option's text after the question,
    # summed log-likelihood (lm-eval's acc).
    ours = evaluate_multiple_choice(model, tok, load_multiple_choice(task_dir / "tiny_probe.jsonl"), mc_format="cloze")
    assert score["lm_eval"]["tiny_probe"] == pytest.approx(ours["accuracy_sum"])
    assert score["lm_eval_score"] == score["lm_eval"]["tiny_probe"]
    assert model.training, "the model goes back to training mode"
    assert torch.equal(torch.random.get_rng_state(), before), "training sees the random state it would without lm-eval"


def test_lm_eval_scores_a_model_that_knows_the_answers(tmp_path):
    # Every answer is "good": a model whose head always prefers "good" gets exactly the share of such rows.
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=0)
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(model.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[tok.convert_tokens_to_ids("good")] = 10.0
    rows = [{**q, "answer": 2 if i < 9 else 0} for i, q in enumerate(questions())]  # 9 of 12 say "good"
    folder = write_task(tmp_path / "tasks", rows, name="always_good")
    score = LmEvalGeneral(["always_good"], include_path=str(folder))(model, tok)
    assert score["lm_eval"]["always_good"] == pytest.approx(9 / 12)


def test_settings_errors_name_the_fix(task_dir):
    assert lm_eval_tasks("mc") is None and lm_eval_tasks("lm_eval:a, b") == ["a", "b"]
    with pytest.raises(GeReError, match="'mc', 'suite' or 'lm_eval:<task,...>'"):
        lm_eval_tasks("mmlu")
    with pytest.raises(GeReError, match="names no task"):
        lm_eval_tasks("lm_eval:")
    model, tok = tiny_llama(vocab_size=len(tiny_tokenizer())), tiny_tokenizer()
    with pytest.raises(GeReError, match=r"\['no_such_task'\] not found.*lm_eval_include_path"):
        LmEvalGeneral(["no_such_task"], include_path=str(task_dir))(model, tok)
    with pytest.raises(GeReError, match="reports no 'f1'.*'acc', 'acc_norm'"):
        LmEvalGeneral(["tiny_probe"], include_path=str(task_dir), metric="f1")(model, tok)


def test_a_lora_run_takes_its_general_score_from_lm_eval(tmp_path, task_dir):
    model_dir = write_tiny_run_files(tmp_path)
    mc = [{"question": "the river is", "choices": CHOICES, "answer": 1, "subject": "geo"}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in mc * 3))
    config = {
        "name": "tiny", "model": str(model_dir), "output_dir": str(tmp_path / "out"), "finetuning": "lora",
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "tasks": [{"source": str(tmp_path / "mood")}, {"source": str(tmp_path / "compass")}],
        "gere": {"objective": "ce+tm", "reference": "online", "replay_source": str(tmp_path / "replay.jsonl"),
                 "num_replay_samples": 8, "replay_max_length": 16, "replay_batch_size": 2},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 0.01, "max_length": 32,
                     "optim": "adamw_torch"},
        "evaluation": {"general_mc": str(tmp_path / "mc.jsonl"), "general": "lm_eval:tiny_probe",
                       "lm_eval_include_path": str(task_dir), "lm_eval_limit": 8},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    results = run_continual(load_run_config(tmp_path / "run.yaml"), progress=False)
    general = results["general"]
    assert len(general) == 3 and all(set(e["lm_eval"]) == {"tiny_probe"} for e in general)
    assert all(e["mc_accuracy"] is not None for e in general), "the built-in set is still reported"
    assert results["metrics"]["general_scores"] == [e["lm_eval_score"] for e in general]
    final = general[-1]["lm_eval_score"]
    ap = results["metrics"]["ap"]
    assert results["metrics"]["f1_avg"] == pytest.approx(2 * final * ap / (final + ap))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "lm-eval tiny_probe (%)" in report


def test_auto_batch_size_scores_the_same(task_dir):
    model, tok = tiny_llama(vocab_size=len(tiny_tokenizer()), seed=3), tiny_tokenizer()
    fixed = LmEvalGeneral(["tiny_probe"], include_path=str(task_dir), batch_size=5)(model, tok)
    auto = LmEvalGeneral(["tiny_probe"], include_path=str(task_dir), batch_size="auto")(model, tok)
    assert auto["lm_eval"]["tiny_probe"] == pytest.approx(fixed["lm_eval"]["tiny_probe"])


def lm_eval_run_config(tmp_path, evaluation: dict) -> dict:
    model_dir = write_tiny_run_files(tmp_path)
    return {
        "name": "tiny", "model": str(model_dir), "output_dir": str(tmp_path / "out"),
        "tasks": [{"source": str(tmp_path / "mood")}],
        "gere": {"objective": "ce+tm", "replay_source": str(tmp_path / "replay.jsonl"), "num_replay_samples": 8,
                 "replay_max_length": 16, "replay_batch_size": 2},
        "training": {"max_steps": 1, "per_device_train_batch_size": 4, "max_length": 32, "optim": "adamw_torch"},
        "evaluation": {"lm_eval_limit": 4, **evaluation},
    }  # fmt: skip


def test_include_path_is_read_from_the_config_folder_and_batch_size_takes_auto(tmp_path, monkeypatch):
    write_task(tmp_path / "configs" / "lm_tasks", questions(4))
    config = lm_eval_run_config(tmp_path, {"general": "lm_eval:tiny_probe", "lm_eval_include_path": "lm_tasks",
                                           "lm_eval_batch_size": "auto"})  # fmt: skip
    (tmp_path / "configs" / "run.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)  # not the config's folder: the relative path still names configs/lm_tasks
    cfg = load_run_config("configs/run.yaml")
    assert cfg.evaluation.lm_eval_include_path == str(tmp_path / "configs" / "lm_tasks")
    assert cfg.evaluation.lm_eval_batch_size == "auto"
    results = run_continual(cfg, progress=False)
    assert all(set(e["lm_eval"]) == {"tiny_probe"} for e in results["general"])
    for bad in ("0", "autox", "auto:0"):
        with pytest.raises(GeReError, match="evaluation.lm_eval_batch_size .* 'auto', 'auto:N'"):
            load_run_config("configs/run.yaml", [f"evaluation.lm_eval_batch_size={bad}"])
    with pytest.raises(GeReError, match="evaluation.lm_eval_batch_size: expected int, got bool"):
        load_run_config("configs/run.yaml", ["evaluation.lm_eval_batch_size=true"])


def test_a_missing_lm_eval_task_or_folder_is_found_before_the_store_is_extracted(tmp_path, task_dir):
    config = lm_eval_run_config(tmp_path, {"general": "lm_eval:tiny_prob", "lm_eval_include_path": str(task_dir)})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(GeReError, match=r"\['tiny_prob'\] not found"):
        run_continual(load_run_config(tmp_path / "run.yaml"), progress=False)
    assert not (tmp_path / "out" / "gere_store").exists() and not (tmp_path / "out" / "config.yaml").exists()
    with pytest.raises(GeReError, match="lm_eval_include_path no_tasks is not a folder"):
        run_continual(load_run_config(tmp_path / "run.yaml", ["evaluation.lm_eval_include_path=no_tasks"]))
