"""The training section passes any transformers.TrainingArguments field through, checked against
TrainingArguments itself; values TrainingArguments refuses stop a run before any work."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainingArguments

from gere.cli import main
from gere.continual.run_config import load_run_config
from gere.continual.run_folder import config_digest
from gere.continual.training_args import stage_training_args
from gere.errors import GeReError


def config(tmp_path, training: dict, **top):
    data = {"model": "m", "tasks": [{"name": "t", "source": "t", "labels": ["a", "b"], "instruction": "pick"}], "training": training, **top}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_trainer_arguments_pass_through_and_reach_every_stage(tmp_path):
    has_ratio = "warmup_ratio" in {f.name for f in dataclasses.fields(TrainingArguments)}
    training = {"max_grad_norm": 0.25, "adam_beta2": 0.95, "adam_epsilon": "1e-7", "torch_empty_cache_steps": 3,
                "lr_scheduler_kwargs": {"min_lr": 1e-6}, "warmup_ratio": 0.1, "learning_rate": 3e-4}  # fmt: skip
    cfg = load_run_config(config(tmp_path, training, per_task={"t": {"max_grad_norm": 2.0, "max_steps": 4}}))
    args = stage_training_args(cfg, "t", tmp_path / "stage", False, False)
    assert (args.max_grad_norm, args.adam_beta2, args.adam_epsilon) == (2.0, 0.95, 1e-7), "the task's own wins"
    assert args.lr_scheduler_kwargs == {"min_lr": 1e-6} and args.torch_empty_cache_steps == 3
    assert args.max_steps == 4 and args.learning_rate == 3e-4 and args.save_strategy == "no"
    if not has_ratio:  # transformers 5 reads a warmup_steps below 1 as a share of the steps
        assert cfg.training.warmup_steps == 0.1 and args.warmup_steps == 0.1
    # The resolved config writes the fields where the user wrote them and reads back as the same config.
    written = cfg.to_dict()
    assert written["training"]["max_grad_norm"] == 0.25 and "trainer_args" not in written["training"]
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(written))
    again = load_run_config(tmp_path / "again.yaml")
    assert again.to_dict() == written and config_digest(again) == config_digest(cfg)


@pytest.mark.parametrize(
    "training,message",
    [
        ({"max_grad_nrom": 1.0}, r"unknown config key training.max_grad_nrom \(did you mean 'max_grad_norm'\?\)"),
        ({"learnig_rate": 1e-4}, r"training.learnig_rate \(did you mean 'learning_rate'\?\)"),
        ({"output_dir": "x"}, "training.output_dir: gere sets this .* top-level output_dir"),
        ({"report_to": ["wandb"]}, "training.report_to: .*top-level report_to"),
        ({"adam_beta2": "high"}, "training.adam_beta2: expected a number, got 'high'"),
        ({"bf16": True, "fp16": True}, "bf16 and training.fp16 are both true"),
    ],
)
def test_typos_and_fields_gere_sets_are_refused_by_name(tmp_path, training, message):
    with pytest.raises(GeReError, match=message):
        load_run_config(config(tmp_path, training))


def test_per_task_typos_are_refused_by_name(tmp_path):
    with pytest.raises(GeReError, match=r"per_task.t.max_step \(did you mean 'max_steps'\?\)"):
        load_run_config(config(tmp_path, {}, per_task={"t": {"max_step": 3}}))


def tiny_run(setup, tmp_path, *sets):
    argv = ["run", str(setup / "run.yaml"), "--no-progress", "--set", f"output_dir={tmp_path / 'out'}",
            "--set", "gere.objective=none", *[x for s in sets for x in ("--set", s)]]  # fmt: skip
    return main(argv)


def test_max_grad_norm_bounds_each_sgd_step(setup, tmp_path):
    # Plain SGD moves the weights by learning_rate x the clipped gradient: with max_grad_norm 1e-4 and 2 steps
    # of task 1 and 2 of task 2, the weights move by at most 4 x 0.01 x 1e-4 in L2 norm.
    assert tiny_run(setup, tmp_path, "training.optim=sgd", "training.max_grad_norm=1e-4") == 0
    base = AutoModelForCausalLM.from_pretrained(setup / "model").state_dict()
    after = load_file(str(tmp_path / "out" / "checkpoints" / "stage-2" / "weights.safetensors"))
    moved = torch.sqrt(sum(((after[k] - base[k]) ** 2).sum() for k in after))
    assert 0 < moved <= 4 * 0.01 * 1e-4 * 1.001
    assert tiny_run(setup, tmp_path / "free", "training.optim=sgd") == 0  # without the clip: far more
    free = load_file(str(tmp_path / "free" / "out" / "checkpoints" / "stage-2" / "weights.safetensors"))
    assert torch.sqrt(sum(((free[k] - base[k]) ** 2).sum() for k in free)) > 100 * moved


def test_values_trainingarguments_refuses_stop_the_run_before_any_work(setup, tmp_path, capsys):
    assert tiny_run(setup, tmp_path, "gere.objective=ce+tm", "training.lr_scheduler_type=cosin") == 2
    err = capsys.readouterr().err
    assert "training: transformers.TrainingArguments refuses these settings: cosin is not a valid" in err
    assert not (tmp_path / "out" / "gere_store").exists() and not (tmp_path / "out" / "config.yaml").exists()


def test_fsdp_on_one_process_is_refused_before_any_work(setup, tmp_path, capsys):
    """One process cannot shard: the Trainer refused it ("Using fsdp only works in distributed training") only
    after the store was extracted and the base model evaluated."""
    assert tiny_run(setup, tmp_path, "gere.objective=ce+tm", "training.fsdp=full_shard") == 2
    err = capsys.readouterr().err
    assert "training.fsdp shards the model across processes, and this run is one process: start it with several " \
           "(torchrun --nproc_per_node N" in err and "Traceback" not in err  # fmt: skip
    assert not (tmp_path / "out").exists()
    assert tiny_run(setup, tmp_path, "per_task={mood: {fsdp: full_shard}}") == 2
    assert "per_task.mood.fsdp shards the model across processes" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["training.deepspeed", "per_task={mood: {deepspeed: DS}}"])
def test_a_missing_deepspeed_file_is_named_as_a_file_before_any_work(setup, tmp_path, capsys, where):
    missing = tmp_path / "ds_zero2.json"
    setting = f"{where}={missing}" if "=" not in where else where.replace("DS", str(missing))
    assert tiny_run(setup, tmp_path, "gere.objective=ce+tm", setting) == 2
    err = capsys.readouterr().err
    section = "training" if where.startswith("training") else "per_task.mood"
    assert f"{section}.deepspeed: the DeepSpeed config '{missing}' ({missing}) is not a file; give the path of a " \
           "DeepSpeed JSON config" in err and "package metadata" not in err  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed here")
def test_deepspeed_without_its_package_says_which_package(setup, tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}')
    assert tiny_run(setup, tmp_path, f"training.deepspeed={ds}") == 2
    err = capsys.readouterr().err
    assert "training.deepspeed needs the deepspeed package, which is not installed here: pip install " \
           "'gere[deepspeed]'" in err and "package metadata" not in err  # fmt: skip
    assert not (tmp_path / "out").exists()
