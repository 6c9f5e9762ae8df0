"""gere-lf: GeRe inside LLaMA-Factory's SFT training, run for real (`make test-lf`, LLaMA-Factory's own pins).

Every test runs the `gere-lf` command as a subprocess on a tiny Llama saved to disk, with a dataset in
LLaMA-Factory's layout (dataset_info.json + alpaca JSON), on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny import replay_texts, tiny_llama, tiny_tokenizer

pytest.importorskip("llamafactory")
GERE_LF = shutil.which("gere-lf", path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lf")
    tok = tiny_tokenizer()
    tiny_llama(vocab_size=len(tok)).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = [{"instruction": f"the river {i} is", "input": "", "output": ["north", "south"][i % 2]} for i in range(16)]
    (root / "data").mkdir()
    (root / "data" / "tiny.json").write_text(json.dumps(rows))
    (root / "data" / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    (root / "replay.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in replay_texts(8)))
    return root


def config(files: Path, out: Path, **changes) -> Path:
    cfg = {
        "model_name_or_path": str(files / "model"), "stage": "sft", "do_train": True, "finetuning_type": "full",
        "dataset": "tiny", "dataset_dir": str(files / "data"), "template": "empty", "cutoff_len": 32,
        "output_dir": str(out / "model"), "overwrite_output_dir": True, "per_device_train_batch_size": 4,
        "max_steps": 2, "learning_rate": 1e-3, "logging_steps": 1, "report_to": "none", "use_cpu": True,
        "save_strategy": "no",
        "gere": {"replay_source": str(files / "replay.jsonl"), "objective": "ce+tm", "num_replay_samples": 8,
                 "replay_max_length": 16, "replay_batch_size": 2, "store_dir": str(out / "store")},
    }  # fmt: skip
    for key, value in changes.items():
        if key.startswith("gere_"):
            cfg["gere"][key[5:]] = value
        else:
            cfg[key] = value
    path = out / "train.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def gere_lf(path: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    assert GERE_LF, "gere-lf is not installed in this environment (make test-lf installs it)"
    return subprocess.run([GERE_LF, "train", str(path), *extra], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})  # fmt: skip


def logged(out: Path) -> list[dict]:
    return json.loads((out / "model" / "trainer_state.json").read_text())["log_history"]


def test_full_fine_tuning_trains_with_the_margin_loss(files, tmp_path):
    done = gere_lf(config(files, tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GeRe (ce+tm) in LLaMA-Factory's SFT trainer, rank 0" in done.stderr
    steps = [e for e in logged(tmp_path) if "loss" in e]
    assert len(steps) == 2 and all({"task_ce", "replay_ce", "replay_margin", "margin_weight"} <= set(e) for e in steps)
    assert steps[-1]["replay_margin"] > 0, "the model moved off the base model's bands after a step"
    # LlamaBoard's source, trainer_log.jsonl, carries the same parts beside each step's loss.
    lines = [json.loads(line) for line in (tmp_path / "model" / "trainer_log.jsonl").read_text().splitlines()]
    lines = [line for line in lines if "loss" in line]  # the last line sums the run up, without a loss
    assert [line["current_steps"] for line in lines] == [1, 2]
    for line, step in zip(lines, steps, strict=True):
        assert list(line)[:6] == ["current_steps", "total_steps", "loss", "task_ce", "replay_ce", "replay_margin"]
        assert line["grad_norm"] == pytest.approx(step["grad_norm"]) and line["grad_norm"] > 0
        assert {k: line[k] for k in ("task_ce", "replay_ce", "replay_margin", "margin_weight")} == pytest.approx(
            {k: step[k] for k in ("task_ce", "replay_ce", "replay_margin", "margin_weight")})
    assert (tmp_path / "store" / "manifest.json").exists(), "the activation store was built where gere: said"
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_lora_with_the_online_reference_and_overrides(files, tmp_path):
    path = config(files, tmp_path, finetuning_type="lora", lora_target="q_proj,v_proj", gere_reference="online")
    done = gere_lf(path, "gere.margin_weight=100", "max_steps=3")
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [e for e in logged(tmp_path) if "loss" in e]
    assert len(steps) == 3 and all(e["margin_weight"] == 100 for e in steps)
    assert not (tmp_path / "store").exists(), "the online reference keeps no store"
    assert (tmp_path / "model" / "adapter_model.safetensors").exists()


def test_two_processes_each_run_gere(files, tmp_path):
    done = gere_lf(config(files, tmp_path), env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert f"LLaMA-Factory's SFT trainer, rank {rank}" in done.stderr, "the patch reached every worker"
    assert any("replay_margin" in e for e in logged(tmp_path))


def test_without_torchaudio_the_error_names_it_and_the_fix(files, tmp_path):
    import importlib.util

    if importlib.util.find_spec("torchaudio") is None or "stubs" not in str(importlib.util.find_spec("torchaudio").origin):
        pytest.skip("runs where torchaudio is the stand-in of tests_lf/stubs")
    env = {"PYTHONPATH": os.pathsep.join(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                         if "stubs" not in p)}  # fmt: skip
    done = gere_lf(config(files, tmp_path), env=env)
    assert done.returncode == 2 and "needs LLaMA-Factory" not in done.stderr
    assert "needs the module 'torchaudio', which is missing" in done.stderr and "stand-in" in done.stderr


def test_bad_configs_are_refused_before_training(files, tmp_path):
    path = config(files, tmp_path, gere_objective="ce+xx")
    done = gere_lf(path)
    assert done.returncode == 2 and "gere-lf: error" in done.stderr and "objective" in done.stderr
    done = gere_lf(config(files, tmp_path / "dpo", stage="dpo"))
    assert done.returncode == 2 and "stage: sft" in done.stderr


def test_a_second_task_reuses_the_first_tasks_store(files, tmp_path):
    """docs/llamafactory.md's sequence: task 2 trains from task 1's output and reuses task 1's store (the base
    model's) through store_dir with reuse_store and check_store_model: false."""
    first = gere_lf(config(files, tmp_path / "task1"))
    assert first.returncode == 0, first.stderr[-3000:]
    store = tmp_path / "task1" / "store"
    manifest = (store / "manifest.json").read_text()
    later = {"model_name_or_path": str(tmp_path / "task1" / "model"), "gere_store_dir": str(store),
             "gere_reuse_store": True}  # fmt: skip
    refused = gere_lf(config(files, tmp_path / "task2", **later))
    assert refused.returncode == 2 and "was made with a different model" in refused.stderr
    done = gere_lf(config(files, tmp_path / "task2", **later), "gere.check_store_model=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "made with another model" in done.stderr and "check_store_model is off" in done.stderr
    assert (store / "manifest.json").read_text() == manifest, "task 1's store reused, not rebuilt"
    assert not (tmp_path / "task2" / "store").exists()
    steps = [e for e in logged(tmp_path / "task2") if "loss" in e]
    assert len(steps) == 2 and steps[0]["replay_margin"] > 0, "task 2 starts off the base model's bands"
    done = gere_lf(config(files, tmp_path / "task2", gere_check_store_model=False, **later))  # in the YAML
    assert done.returncode == 0, done.stderr[-3000:]
