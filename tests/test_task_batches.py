"""Task batches at the processor's speed (gere.task_batches): logits at the answer positions only give the loss
and gradients of the full projection; length-grouped batches keep every sampler's promises and cut padding."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch.testing import assert_close
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainingArguments, TrainingArguments

from gere.config import GeReConfig
from gere.replay.sampler import BatchInterpolationSampler
from gere.task_batches import LengthGroupedSampler, answer_logits_inputs, padded_share, row_lengths
from gere.trainer import GeReSeq2SeqTrainer, GeReTrainer

from tiny import WORDS, replay_texts, sft_rows, tiny_llama, tiny_tokenizer

peft = pytest.importorskip("peft")


def uneven_rows(tok, n=24, seed=0):
    """Rows of 2 to 40 prompt words, answered ' good' or ' bad'; the loss on the answer and EOS only."""
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS[:40]) for _ in range(rng.randint(2, 40))) + " answer :" for _ in range(n)]
    return sft_rows(tok, prompts, [" good" if i % 2 else " bad" for i in range(n)])


def padded(tok, rows):
    return DataCollatorForSeq2Seq(tok, padding=True)(rows)


def loss_and_grads(model, inputs):
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True])
def test_answer_logits_give_the_full_projections_loss_and_gradients(lora):
    tok, model = tiny_tokenizer(), tiny_llama(vocab_size=len(tiny_tokenizer()))
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    batch = dict(padded(tok, uneven_rows(tok, n=6)))
    full_loss, full_grads = loss_and_grads(model, batch)
    inputs = answer_logits_inputs(batch)
    kept = int(inputs["logits_to_keep"].sum())
    assert kept == int((batch["labels"][:, 1:] != -100).sum()) == 6 * 2  # one answer word and EOS a row
    loss, grads = loss_and_grads(model, inputs)
    assert model(**inputs).logits.shape[:-1] == (kept,)  # the head ran at the answer positions only
    assert_close(loss, full_loss)
    assert grads.keys() == full_grads.keys() and len(grads) > 0
    for name in grads:
        assert_close(grads[name], full_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def head_rows(model):
    """Rows the lm_head projects, one entry per call."""
    calls = []
    model.lm_head.register_forward_hook(lambda m, args, out: calls.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    return calls


def replay_config(tmp_path, objective, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "general.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in replay_texts(6)))
    return GeReConfig(objective=objective, replay_source=str(path), num_replay_samples=6, replay_max_length=16,
                      replay_batch_size=2, reference="store", store_dir=str(tmp_path / "store"), **kw)  # fmt: skip


def one_step(tmp_path, trainer_class, answer_logits_only, objective="none", **args):
    tok, model = tiny_tokenizer(), tiny_llama(vocab_size=len(tiny_tokenizer()))
    arguments = (Seq2SeqTrainingArguments if trainer_class is GeReSeq2SeqTrainer else TrainingArguments)(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, **args,
    )  # fmt: skip
    trainer = trainer_class(model=model, args=arguments, train_dataset=uneven_rows(tok, n=4), processing_class=tok,
                            data_collator=DataCollatorForSeq2Seq(tok, padding=True),
                            gere_config=replay_config(tmp_path, objective), answer_logits_only=answer_logits_only)
    trainer._gere_prepare()  # the store's extraction projects with its own batches: watch training only
    calls = head_rows(model)
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    return logged, {n: p.detach() for n, p in model.named_parameters()}, calls


@pytest.mark.parametrize("trainer_class", [GeReTrainer, GeReSeq2SeqTrainer])
@pytest.mark.parametrize("objective", ["none", "ce+kl"])
def test_a_training_step_is_the_same_with_answer_logits_only(tmp_path, trainer_class, objective):
    full, full_weights, full_calls = one_step(tmp_path / "a", trainer_class, False, objective)
    logged, weights, calls = one_step(tmp_path / "b", trainer_class, True, objective)
    for key in ("task_ce", "loss", *(("replay_ce", "replay_kl") if objective != "none" else ())):
        assert logged[key] == pytest.approx(full[key], rel=1e-5), key
    for name in weights:
        assert_close(weights[name], full_weights[name], atol=1e-6, rtol=1e-4, msg=name)
    batch = padded(tiny_tokenizer(), uneven_rows(tiny_tokenizer(), n=4))
    assert calls[0] == 4 * 2 and full_calls[0] == batch["input_ids"].numel()  # task pass: answers only
    if objective != "none":  # the replay pass keeps every position's logits (replay CE, KL on logits)
        assert calls[1] == full_calls[1] > 2 * 2


def test_label_smoothing_keeps_the_full_projection(tmp_path):
    _, _, calls = one_step(tmp_path, GeReTrainer, True, label_smoothing_factor=0.1)
    batch = padded(tiny_tokenizer(), uneven_rows(tiny_tokenizer(), n=4))
    assert calls[0] == batch["input_ids"].numel()


def test_sft_trainer_keeps_its_full_logits(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from gere.trl_trainer import GeReSFTTrainer

    rows = datasets.Dataset.from_list([{"prompt": "review the movie answer :", "completion": " good"}] * 4)
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, logging_steps=1,
                         report_to=[],
                         use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True)  # fmt: skip
    trainer = GeReSFTTrainer(model=tiny_llama(), args=args, train_dataset=rows, processing_class=tiny_tokenizer(),
                             gere_config=GeReConfig(objective="none"))  # fmt: skip
    labels = torch.tensor([[-100, 5, 1]])
    assert not trainer._answer_logits(trainer.model, {"labels": labels})  # TRL's metrics read every logit
    trainer.train()
    assert "mean_token_accuracy" in next(h for h in trainer.state.log_history if "loss" in h)


# ----------------------------------------------------------------------------------------- length grouping


def test_grouping_is_a_permutation_that_cuts_padding_and_keeps_other_rows_in_place():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(400)]
    inner = BatchInterpolationSampler(400, 30, 2, 8, seed=3)  # 2 replay placeholders in every 8
    grouped = LengthGroupedSampler(lengths, 4, seed=1, inner=inner, num_grouped=400)
    plain, order = list(inner), list(grouped)
    assert len(order) == len(grouped) == len(plain)
    assert [i for i in order if i >= 400] == [i for i in plain if i >= 400]
    assert [p for p, i in enumerate(order) if i >= 400] == [p for p, i in enumerate(plain) if i >= 400]
    assert sorted(i for i in order if i < 400) == list(range(400))  # every task row once
    task_only = [i for i in order if i < 400]
    before = padded_share(lengths, [i for i in plain if i < 400], 3)
    after = padded_share(lengths, task_only, 3)
    assert after < before / 4, (before, after)
    # The window's micro-batches come in random order, not longest first.
    firsts = [lengths[task_only[b]] for b in range(0, len(task_only), 3)]
    assert firsts != sorted(firsts, reverse=True)


def test_grouping_is_seeded_per_epoch_and_the_same_again():
    lengths = list(range(1, 101))
    a, b = LengthGroupedSampler(lengths, 4, seed=5), LengthGroupedSampler(lengths, 4, seed=5)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b) and sorted(a) == list(range(100))
    assert list(LengthGroupedSampler(lengths, 4, seed=6)) != list(b)


def test_row_lengths_reads_rows_and_datasets():
    datasets = pytest.importorskip("datasets")
    rows = [{"input_ids": [1] * n} for n in (3, 1, 4)]
    assert row_lengths(rows) == row_lengths(datasets.Dataset.from_list(rows)) == [3, 1, 4]
    from gere.errors import GeReError

    with pytest.raises(GeReError, match="input_ids"):
        row_lengths([{"text": "no ids"}])


def grouped_trainer(tmp_path, steps, config, strategy="group_by_length"):
    tok, model = tiny_tokenizer(), tiny_llama(vocab_size=len(tiny_tokenizer()))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, max_steps=steps,
                             learning_rate=1e-3, logging_steps=1, save_strategy="steps", save_steps=2, report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True, train_sampling_strategy=strategy)
    trainer = GeReTrainer(model=model, args=args, train_dataset=uneven_rows(tok, n=24), processing_class=tok,
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True), gere_config=config)  # fmt: skip
    seen = []  # per micro-batch: the task rows' real lengths, the replay indices
    compute = trainer.compute_loss

    def spy(model, inputs, *a, **k):
        lengths = inputs["attention_mask"].sum(1).tolist() if "attention_mask" in inputs else []
        seen.append((tuple(lengths), tuple(inputs.get("gere_replay_index", torch.tensor([])).tolist())))
        return compute(model, inputs, *a, **k)

    trainer.compute_loss = spy
    return trainer, seen


def padding(seen) -> int:
    return sum(max(rows) * len(rows) - sum(rows) for rows, _ in seen if rows)


@pytest.mark.parametrize("mixing", ["batch", "interpolate"])
def test_grouped_training_keeps_batch_interpolation_and_resumes_in_the_same_order(tmp_path, mixing):
    def config():
        return replay_config(tmp_path, "ce", replay_mixing=mixing, num_interpolate_per_batch=int(mixing != "batch"))

    trainer, seen = grouped_trainer(tmp_path / "grouped", 6, config())
    trainer.train()
    plain, seen_plain = grouped_trainer(tmp_path / "plain", 6, config(), strategy="random")
    plain.train()
    if mixing == "interpolate":
        assert all(len(replay) == 1 for _, replay in seen)  # exactly one replay sample in every batch of 3
        assert [r for _, r in seen] == [r for _, r in seen_plain]  # the same replay draws, in the same places
    # Windows of 2 micro-batches here (transformers' rule: 4 windows an epoch where 50 do not fit).
    assert padding(seen) < 0.6 * padding(seen_plain), (padding(seen), padding(seen_plain))
    resumed, seen_again = grouped_trainer(tmp_path / "grouped", 6, config())
    resumed.train(resume_from_checkpoint=str(tmp_path / "grouped" / "out" / "checkpoint-2"))
    assert seen_again == seen[2:]  # the steps after the checkpoint saw the same batches


def test_a_run_configs_group_by_length_reaches_every_stages_trainer(tmp_path):
    import yaml

    from gere.continual.run_config import load_run_config
    from gere.continual.training_args import stage_training_args

    task = {"name": "t", "source": "t", "labels": ["a", "b"], "instruction": "pick"}
    for given, strategy in ((None, "random"), (True, "group_by_length")):
        training = {"max_steps": 2, **({"group_by_length": given} if given is not None else {})}
        path = tmp_path / f"run-{given}.yaml"
        path.write_text(yaml.safe_dump({"model": "m", "tasks": [task], "training": training}))
        cfg = load_run_config(path)
        assert cfg.training.group_by_length is bool(given) and cfg.to_dict()["training"]["group_by_length"] is bool(given)
        assert stage_training_args(cfg, "t", tmp_path / "s", False, False).train_sampling_strategy == strategy
