"""GeReSFTTrainer: TRL's SFTTrainer with replay, on a tiny model (skipped without TRL)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from gere.config import GeReConfig  # noqa: E402
from gere.trl_trainer import GeReSFTTrainer  # noqa: E402

from tiny import replay_texts, tiny_llama, tiny_tokenizer  # noqa: E402

SFT_METRICS = ("mean_token_accuracy", "entropy", "num_tokens")


def prompt_completion(n: int = 12):
    rows = [{"prompt": f"review the movie was {'good' if i % 2 else 'bad'} answer :",
             "completion": " good" if i % 2 else " bad"} for i in range(n)]  # fmt: skip
    return datasets.Dataset.from_list(rows)


def replay_config(tmp_path, **kw) -> GeReConfig:
    path = tmp_path / "general.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in replay_texts(8)))
    return GeReConfig(replay_source=str(path), num_replay_samples=8, replay_max_length=16, replay_batch_size=2,
                      **kw)  # fmt: skip


def sft_args(tmp_path, **kw):
    # fp32 and no activation checkpointing: SFTConfig turns both on by default, which tiny CPU tests do not need.
    # transformers renamed gradient_checkpointing to activation_checkpointing during 5.x.
    names = {f.name for f in dataclasses.fields(trl.SFTConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                    learning_rate=5e-3, report_to=[], use_cpu=True, max_length=32, bf16=False,
                    save_strategy="no", seed=0, disable_tqdm=True, **{checkpointing: False})  # fmt: skip
    return trl.SFTConfig(**{**settings, **kw})


def trained(trainer):
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(v, after[n].detach()) for n, v in before.items())
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("packing", [False, True])
def test_sft_loss_and_metrics_with_replay_parts(tmp_path, packing):
    trainer = GeReSFTTrainer(model=tiny_llama(), args=sft_args(tmp_path, packing=packing),
                             train_dataset=prompt_completion(), processing_class=tiny_tokenizer(),
                             gere_config=replay_config(tmp_path))  # fmt: skip
    logs = trained(trainer)
    assert len(logs) == 3
    for entry in logs:
        assert all(name in entry for name in SFT_METRICS)  # SFTTrainer's own metrics still come
        assert {"task_ce", "replay_ce", "replay_margin", "margin_weight"} <= set(entry)
        assert entry["loss"] == pytest.approx((entry["task_ce"] + entry["replay_ce"]) / 2
                                              + entry["margin_weight"] * entry["replay_margin"], rel=1e-3)  # fmt: skip
    assert logs[0]["replay_margin"] < 1e-5  # the unchanged model sits inside its own bands
    assert (tmp_path / "out" / "gere_store" / "manifest.json").exists()


def test_sft_lora_with_the_online_reference_and_accumulation(tmp_path):
    from peft import LoraConfig

    trainer = GeReSFTTrainer(
        model=tiny_llama(), args=sft_args(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=2),
        train_dataset=prompt_completion(), processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        gere_config=replay_config(tmp_path, reference="online", margin_weight=1.0),
    )  # fmt: skip
    logs = trained(trainer)
    assert all(n.count("lora_") for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert not (tmp_path / "out" / "gere_store").exists()  # the online reference writes nothing
    for entry in logs:  # a mean over the two micro-batches, not their sum
        ce = (entry["task_ce"] + entry["replay_ce"]) / 2
        assert entry["loss"] == pytest.approx(ce + entry["replay_margin"], rel=1e-3)
        assert all(name in entry for name in SFT_METRICS)


def test_two_processes_train_with_the_separate_replay_batch_and_refuse_interpolation(tmp_path):
    """A real torchrun of 2 gloo processes: SFT's metric gathering and GeRe's collectives line up."""
    from launch import torchrun

    ranks = torchrun("trl_dist_worker.py", tmp_path)
    for result in ranks:
        assert len(result["logs"]) == 2 and all("replay_margin" in h and "mean_token_accuracy" in h
                                                for h in result["logs"])  # fmt: skip
        assert "replay_mixing='batch'" in result["refused"]
    assert ranks[0]["logs"] == ranks[1]["logs"]  # logged values are averaged over the processes


def lwf_trainer(tmp_path, with_lwf=True, **kw):
    from gere.baselines.lwf import LwF, with_index

    model, lwf = tiny_llama(), LwF(weight=2.0, topk=8)
    dataset = datasets.Dataset.from_list(with_index(prompt_completion().to_list()))
    trainer = GeReSFTTrainer(model=model, args=sft_args(tmp_path, **kw), train_dataset=dataset,
                             processing_class=tiny_tokenizer(), gere_config=GeReConfig(objective="none"),
                             penalties=[lwf] if with_lwf else [])  # fmt: skip
    return trainer, lwf


def test_sft_with_lwf_distils_the_rows_sft_tokenized_through_trls_collator(tmp_path):
    trainer, lwf = lwf_trainer(tmp_path / "lwf", max_steps=6)
    lwf.prepare(trainer.model, trainer.train_dataset, trainer.processing_class.pad_token_id)
    batch = next(iter(trainer.get_train_dataloader()))  # through TRL's collator: the index column survives
    logs = trained(trainer)
    assert all(name in logs[0] for name in SFT_METRICS)
    assert logs[0]["lwf"] < 1e-3 < logs[-1]["lwf"], "0 at the model it distils toward, then it grows"
    for entry in logs:
        assert entry["loss"] == pytest.approx(entry["task_ce"] + entry["lwf"], rel=1e-3)
    # The distillation trains the model: it ends nearer the model it distils toward than SFT alone does.
    plain, _ = lwf_trainer(tmp_path / "plain", with_lwf=False, max_steps=6)
    trained(plain)

    def distance(model):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return lwf(model, batch, logits).item()

    assert distance(trainer.model) < 0.9 * distance(plain.model)  # equal if the LwF part had no gradient


@pytest.mark.parametrize("setting", [{"packing": True}, {"padding_free": True, "max_length": None}])
def test_sft_with_lwf_refuses_batches_that_join_rows(tmp_path, setting):
    from gere.errors import GeReError

    trainer, lwf = lwf_trainer(tmp_path, **setting)
    with pytest.raises(GeReError, match="packing=False and padding_free=False"):
        trainer.train()
