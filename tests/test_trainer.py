import json
import math

import pytest
import torch
from transformers import DataCollatorForSeq2Seq, TrainingArguments

from gere.config import GeReConfig
from gere.errors import GeReError
from gere.trainer import GeReTrainer

from tiny import replay_texts, sft_rows, tiny_llama, tiny_tokenizer

peft = pytest.importorskip("peft")


def task_dataset(tok, n=12):
    prompts = [f"review the movie was {'good' if i % 2 else 'bad'} answer :" for i in range(n)]
    return sft_rows(tok, prompts, [" good" if i % 2 else " bad" for i in range(n)])


def replay_file(tmp_path, n=10):
    path = tmp_path / "general.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"g{i}", "text": t}) + "\n" for i, t in enumerate(replay_texts(n)))
    )
    return path


def make_trainer(tmp_path, model, tok, config, steps=3, bs=4, ga=1, optim="adamw_torch", **kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        optim=optim,
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga,
        max_steps=steps,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return GeReTrainer(
        model=model,
        args=args,
        train_dataset=task_dataset(tok),
        processing_class=tok,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True),
        gere_config=config,
        **kwargs,
    )


def trainable_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def changed(before, model):
    return any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


EXPECTED_PARTS = {
    "ce": {"task_ce", "replay_ce"},
    "tm": {"task_ce", "replay_margin", "margin_weight"},
    "ce+tm": {"task_ce", "replay_ce", "replay_margin", "margin_weight"},
    "kl": {"task_ce", "replay_kl", "kl_weight"},
    "l1": {"task_ce", "replay_l1", "l1_weight"},
    "l2": {"task_ce", "replay_l2", "l2_weight"},
}


@pytest.mark.parametrize("objective", list(EXPECTED_PARTS))
def test_full_finetuning_each_objective_logs_parts_and_trains(tmp_path, objective):
    tok, model = tiny_tokenizer(), tiny_llama()
    config = GeReConfig(
        replay_source=str(replay_file(tmp_path)),
        num_replay_samples=8,
        objective=objective,
        replay_max_length=16,
        replay_batch_size=2,
        kl_topk=8,
        margin_weight="1",
    )
    trainer = make_trainer(tmp_path, model, tok, config)
    before = trainable_snapshot(model)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3
    for entry in logged:
        assert EXPECTED_PARTS[objective] <= set(entry), entry
    assert changed(before, model)
    # Plain CE replay needs no reference, so no store is built for it.
    assert (tmp_path / "out" / "gere_store" / "manifest.json").exists() == (objective != "ce")


def test_margin_is_zero_at_first_step_and_grows(tmp_path):
    tok, model = tiny_tokenizer(), tiny_llama()
    config = GeReConfig(
        replay_source=str(replay_file(tmp_path)),
        num_replay_samples=8,
        objective="ce+tm",
        replay_max_length=16,
        replay_batch_size=4,
        margin_weight="0",
    )
    trainer = make_trainer(tmp_path, model, tok, config, steps=6)
    trainer.train()
    margins = [h["replay_margin"] for h in trainer.state.log_history if "replay_margin" in h]
    assert margins[0] < 1e-5  # the first step sees the unchanged model
    assert max(margins[1:]) > 1e-4  # with weight 0 nothing holds the states back


def test_batch_interpolation_with_reference_argument_names(tmp_path):
    tok, model = tiny_tokenizer(), tiny_llama()
    trainer = make_trainer(
        tmp_path,
        model,
        tok,
        GeReConfig(num_replay_samples=8, replay_max_length=16),
        steps=4,
        bs=2,
        ga=2,
        gere_hidden_state_saving_dir=str(tmp_path / "store"),
        reuse_gere_hidden_state=True,
        num_interpolate_per_batch=1,
        w_strategy="100",
        gere_data_file=str(replay_file(tmp_path)),
    )
    assert trainer.gere.margin_weight == 100.0 and trainer.gere.num_interpolate_per_batch == 1
    seen = []
    original = trainer._replay_losses

    def spy(model, indices):
        seen.append(list(indices))
        return original(model, indices)

    trainer._replay_losses = spy
    trainer.train()
    # 4 steps x (global batch 4 = 2 x 2): one replay sample per global batch.
    assert sum(len(s) for s in seen) == 4
    weights = [h["margin_weight"] for h in trainer.state.log_history if "margin_weight" in h]
    assert weights and all(w == 100.0 for w in weights)
    assert (tmp_path / "store" / "manifest.json").exists()


@pytest.mark.parametrize("reference", ["store", "online"])
def test_lora_trains_adapter_only(tmp_path, reference):
    tok, base = tiny_tokenizer(), tiny_llama()
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    config = GeReConfig(
        replay_source=str(replay_file(tmp_path)),
        num_replay_samples=8,
        objective="ce+tm",
        replay_max_length=16,
        reference=reference,
    )
    trainer = make_trainer(tmp_path, model, tok, config)
    before = trainable_snapshot(model)
    trainer.train()
    assert changed(before, model)
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if not p.requires_grad)
    logged = [h for h in trainer.state.log_history if "replay_margin" in h]
    assert len(logged) == 3
    assert (tmp_path / "out" / "gere_store").exists() == (reference == "store")


def test_online_mode_needs_peft(tmp_path):
    tok, model = tiny_tokenizer(), tiny_llama()
    config = GeReConfig(replay_source=str(replay_file(tmp_path)), num_replay_samples=8, reference="online")
    with pytest.raises(GeReError, match="peft"):
        make_trainer(tmp_path, model, tok, config).train()


def test_missing_replay_source_offline_is_a_clear_error(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("the Hub cannot be reached")

    monkeypatch.setenv("GERE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "load_dataset", offline)
    tok, model = tiny_tokenizer(), tiny_llama()
    with pytest.raises(GeReError, match="default replay set.*could not be fetched.*set replay_source"):
        make_trainer(tmp_path, model, tok, GeReConfig()).train()


def test_nan_loss_stops_with_step_and_parts(tmp_path):
    tok, model = tiny_tokenizer(), tiny_llama()
    config = GeReConfig(replay_source=str(replay_file(tmp_path)), num_replay_samples=8, replay_max_length=16)
    trainer = make_trainer(tmp_path, model, tok, config)
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(GeReError, match=r"step 1 \(parts: .*task_ce"):
        trainer.train()


def test_objective_none_is_plain_training(tmp_path):
    tok, model = tiny_tokenizer(), tiny_llama()
    trainer = make_trainer(tmp_path, model, tok, GeReConfig(objective="none"))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all("task_ce" in h and "replay_ce" not in h for h in logged)
    assert not (tmp_path / "out" / "gere_store").exists()


def test_reference_scripts_tokenizer_argument_is_the_processing_class(tmp_path):
    tok, model = tiny_tokenizer(), tiny_llama()
    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True, max_steps=1)
    trainer = GeReTrainer(model=model, args=args, train_dataset=task_dataset(tok), tokenizer=tok,
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True),
                          gere_config=GeReConfig(objective="none"))  # fmt: skip
    assert trainer.processing_class is tok
    with pytest.raises(GeReError, match="tokenizer once"):
        GeReTrainer(model=model, args=args, tokenizer=tok, processing_class=tok)


@pytest.mark.parametrize("objective", ["none", "ce+tm"])
def test_gradient_accumulation_averages_micro_batches(tmp_path, objective):
    """Two accumulated micro-batches of 2 rows update the model as one batch of 4 (rows of equal length)."""
    tok = tiny_tokenizer()
    config = GeReConfig(objective=objective, replay_source=str(replay_file(tmp_path)), num_replay_samples=8,
                        replay_max_length=16, replay_batch_size=2, margin_weight=1.0)  # fmt: skip
    updates, losses = [], []
    for bs, ga in ((4, 1), (2, 2)):
        model = tiny_llama()
        before = trainable_snapshot(model)
        # Plain SGD: an update proportional to the gradient shows a doubled loss (Adam's first step would not).
        trainer = make_trainer(tmp_path / f"{bs}x{ga}", model, tok, config, steps=1, bs=bs, ga=ga, optim="sgd")
        trainer.train()
        updates.append({n: p.detach() - before[n] for n, p in model.named_parameters()})
        losses.append(trainer.state.log_history[0])
    logged = losses[1]
    if objective == "none":
        for name, delta in updates[0].items():
            torch.testing.assert_close(updates[1][name], delta, rtol=1e-4, atol=1e-6)
        assert logged["loss"] == pytest.approx(losses[0]["loss"], rel=1e-4)
    else:
        # The logged loss is the mean over micro-batches of CE + w * margin, not their sum.
        ce = (logged["task_ce"] + logged["replay_ce"]) / 2
        assert logged["loss"] == pytest.approx(ce + logged["replay_margin"], rel=1e-3)


def test_concat_mixing_replays_each_text_once_per_epoch(tmp_path):
    """The reference's way without interpolation: replay rows shuffled among the task rows, one epoch."""
    tok, model = tiny_tokenizer(), tiny_llama()
    config = GeReConfig(replay_mixing="concat", replay_source=str(replay_file(tmp_path, n=6)), num_replay_samples=6,
                        replay_max_length=16)  # fmt: skip
    args = TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=3, num_train_epochs=1,
                             learning_rate=5e-3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, save_strategy="no")  # fmt: skip
    trainer = GeReTrainer(model=model, args=args, train_dataset=task_dataset(tok, n=12), processing_class=tok,
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True), gere_config=config)  # fmt: skip
    seen, calls = [], []
    original = trainer._replay_losses

    def spy(model, indices):
        seen.extend(indices)
        calls.append(trainer.state.global_step)
        return original(model, indices)

    trainer._replay_losses = spy
    trainer.train()
    assert trainer.state.global_step == 6  # (12 task + 6 replay rows) / 3 per batch
    assert sorted(seen) == list(range(6))  # every replay text exactly once
    logged = [h for h in trainer.state.log_history if "loss" in h]
    # Replay parts are logged exactly at the steps whose batch held replay rows; the others train task CE.
    assert [h["step"] - 1 for h in logged if "replay_margin" in h] == sorted(set(calls))


def test_reference_argument_names_bring_the_reference_defaults(tmp_path):
    tok, model = tiny_tokenizer(), tiny_llama()
    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True, max_steps=1)
    ref = GeReTrainer(model=model, args=args, tokenizer=tok, gere_data_file=str(replay_file(tmp_path)),
                      gere_hidden_state_saving_dir=str(tmp_path / "store"))  # fmt: skip
    assert ref.gere.margin_weight == 100.0 and ref.gere.mixing == "concat"
    bi = GeReTrainer(model=model, args=args, tokenizer=tok, num_interpolate_per_batch=2, w_strategy="dy")
    assert bi.gere.margin_weight == "dy" and bi.gere.mixing == "interpolate"
    assert bi.gere.interpolation_placement == "random"
    own = GeReTrainer(model=model, args=args, tokenizer=tok, gere_config=GeReConfig(), gere_data_file="x.jsonl")
    assert own.gere.margin_weight == 1.0 and own.gere.mixing == "batch"  # an explicit config keeps its values
    assert own.gere.interpolation_placement == "even"
    with pytest.raises(GeReError, match="applies to replay_mixing 'interpolate'"):
        GeReConfig(replay_mixing="concat", num_interpolate_per_batch=2)


def test_a_script_shaped_like_the_reference_readme_runs_unchanged(tmp_path):
    """The reference README's call, word for word but the class: tokenizer=, its four GeRe arguments and a
    replay file. It trains the reference's way: replay set appended to the task data, weight 100."""
    tok, model = tiny_tokenizer(), tiny_llama(max_position_embeddings=1024)  # room for 563-token replay texts
    training_args = TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4,
                                      num_train_epochs=1, logging_steps=1, report_to=[], use_cpu=True,
                                      save_strategy="no", disable_tqdm=True)  # fmt: skip
    trainer = GeReTrainer(
        model=model,
        args=training_args,
        train_dataset=task_dataset(tok, n=12),
        data_collator=DataCollatorForSeq2Seq(tok, padding=True),
        tokenizer=tok,
        gere_hidden_state_saving_dir=str(tmp_path / "tiny_gere_saving"),
        reuse_gere_hidden_state=True,
        num_interpolate_per_batch=0,
        w_strategy="100",
        gere_data_file=str(replay_file(tmp_path, n=8)),
    )
    trainer.train()
    assert trainer.state.global_step == 5  # (12 task + 8 replay rows) / 4: the reference's epoch
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert {h["margin_weight"] for h in logged if "margin_weight" in h} == {100.0}
    assert (tmp_path / "tiny_gere_saving" / "manifest.json").exists()


def test_a_store_of_another_model_is_refused(tmp_path):
    from gere.store import StoreSpec, extract_store

    tok = tiny_tokenizer()
    config = GeReConfig(replay_source=str(replay_file(tmp_path)), num_replay_samples=8, replay_max_length=16)
    other = extract_store(tiny_llama(seed=1), tok, config.load_replay_set(), tmp_path / "other",
                          StoreSpec(max_length=16), progress=False)  # fmt: skip
    with pytest.raises(GeReError, match="different model.*check_store_model=False"):
        make_trainer(tmp_path, tiny_llama(), tok, config, steps=1, activation_store=other).train()
    trainer = make_trainer(tmp_path, tiny_llama(), tok, config, steps=1, activation_store=other,
                           check_store_model=False)  # a later stage trained from the store's model  # fmt: skip
    trainer.train()
    own = extract_store(tiny_llama(), tok, config.load_replay_set(), tmp_path / "own", StoreSpec(max_length=16),
                        progress=False)  # fmt: skip
    make_trainer(tmp_path, tiny_llama(), tok, config, steps=1, activation_store=own).train()


def test_a_later_task_reuses_the_store_in_store_dir_when_check_store_model_is_off(tmp_path, caplog):
    """gere-lf's sequence recipe: the second task's model is the first task's trained model, reusing the first
    task's store through store_dir / reuse_store; refused by default, reused (and logged) with the check off."""
    tok = tiny_tokenizer()
    config = GeReConfig(replay_source=str(replay_file(tmp_path)), num_replay_samples=8, replay_max_length=16,
                        store_dir=str(tmp_path / "store"), reuse_store=True)  # fmt: skip
    first = make_trainer(tmp_path, tiny_llama(), tok, config, steps=2)
    first.train()
    manifest = (tmp_path / "store" / "manifest.json").read_text()
    trained = first.model  # the second task starts from the first task's weights
    with pytest.raises(GeReError, match="different model"):
        make_trainer(tmp_path, trained, tok, config, steps=1).train()
    with caplog.at_level("WARNING", logger="gere.store.extract"):
        second = make_trainer(tmp_path, trained, tok, config, steps=2, check_store_model=False)
        second.train()
    assert "made with another model" in caplog.text and "check_store_model is off" in caplog.text
    assert (tmp_path / "store" / "manifest.json").read_text() == manifest, "the first task's store, not rebuilt"
    from gere.store.fingerprint import model_fingerprint

    assert json.loads(manifest)["model"] != model_fingerprint(trained), "the store is the base model's"
    assert any(h.get("replay_margin", 0) > 0 for h in second.state.log_history), "margins against the base model"
    # The check stays for what must match: a store of other settings is still refused.
    import dataclasses

    other_k = dataclasses.replace(config, threshold_k=2.0)
    with pytest.raises(GeReError, match="threshold k"):
        make_trainer(tmp_path, trained, tok, other_k, steps=1, check_store_model=False).train()


# ---------------------------------------------------------------------------------------------- on a GPU
# What only a CUDA device exercises: bf16 autocast there, the store extracted there, the store's tensors moved
# there. Marked `gpu` (``pytest -m gpu`` runs these alone; benchmarks/device_check.py does) and skipped where
# torch sees no CUDA device, so the CPU suite reports them as skipped, never failed.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_bf16_trainer(tmp_path, model, tok, config, steps=3, use_cpu=False):
    """`make_trainer`'s trainer on the default CUDA device under bf16 autocast (weights stay fp32); ``use_cpu``
    puts the same on the CPU, to try the tests' code there."""
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=steps, learning_rate=5e-3,
        logging_steps=1, save_strategy="no", report_to=[], bf16=True, use_cpu=use_cpu, seed=0, disable_tqdm=True,
    )  # fmt: skip
    return GeReTrainer(model=model, args=args, train_dataset=task_dataset(tok), processing_class=tok,
                       data_collator=DataCollatorForSeq2Seq(tok, padding=True), gere_config=config)  # fmt: skip


def tm_config(tmp_path, margin_weight="dy"):
    return GeReConfig(replay_source=str(replay_file(tmp_path)), num_replay_samples=8, objective="ce+tm",
                      replay_max_length=16, replay_batch_size=4, margin_weight=margin_weight)  # fmt: skip


@pytest.mark.gpu
@needs_cuda
def test_bf16_training_on_cuda_logs_finite_parts_and_a_margin(tmp_path):
    tok, model = tiny_tokenizer(), tiny_llama()
    trainer = cuda_bf16_trainer(tmp_path, model, tok, tm_config(tmp_path, margin_weight="0"), steps=4)
    assert trainer.args.device.type == "cuda" and trainer.args.bf16
    before = trainable_snapshot(model)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4
    for entry in logged:
        assert EXPECTED_PARTS["ce+tm"] <= set(entry), entry
        assert all(math.isfinite(entry[k]) for k in (*EXPECTED_PARTS["ce+tm"], "loss")), entry
    margins = [h["replay_margin"] for h in logged]
    # bf16 states differ from the fp32 store's by rounding alone at the first step; with weight 0 nothing holds
    # the states back, so training moves them across the thresholds.
    assert margins[0] < 0.05 and max(margins[1:]) > margins[0]
    assert next(model.parameters()).device.type == "cuda" and next(model.parameters()).dtype == torch.float32
    assert changed(before, model)
    assert (tmp_path / "out" / "gere_store" / "manifest.json").exists()


@pytest.mark.gpu
@needs_cuda
def test_the_stores_targets_reach_the_models_cuda_device_in_training(tmp_path, monkeypatch):
    from gere.reference import StoreReference

    seen = []
    real_targets = StoreReference.targets

    def recording_targets(self, model, indices, ids, mask):  # the real method, its outputs' devices noted
        out = real_targets(self, model, indices, ids, mask)
        tensors = [ids, mask, *out.codes.values(), *(t for band in out.bands.values() for t in band)]
        seen.append((next(model.parameters()).device, {t.device for t in tensors}, out))
        return out

    monkeypatch.setattr(StoreReference, "targets", recording_targets)
    tok, model = tiny_tokenizer(), tiny_llama()
    cuda_bf16_trainer(tmp_path, model, tok, tm_config(tmp_path), steps=2).train()
    assert len(seen) == 2
    for model_device, devices, out in seen:
        assert model_device.type == "cuda" and devices == {model_device}
        assert all(codes.dtype == torch.uint8 for codes in out.codes.values())
        assert all({low.dtype, high.dtype} == {torch.float32} for low, high in out.bands.values())
