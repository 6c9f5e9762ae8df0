"""LwF: the loss against a slow reference, the targets, the trainer's batches, a two-task run, resume, settings."""

import math

import pytest
import torch
from transformers import DataCollatorForSeq2Seq, TrainingArguments

from gere.baselines.lwf import INDEX, LwF, lwf_loss, with_index
from gere.config import GeReConfig
from gere.continual.run_config import load_run_config
from gere.errors import GeReError
from gere.trainer import GeReTrainer

from tiny import sft_rows, tiny_llama, tiny_tokenizer
from tiny_runs import run, whole_and_resumed


def slow_lwf(logits, values, indices, mask, temperature):
    """Token by token: KL between the two softmaxes over the previous model's k tokens, times T^2."""
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if not mask[b, t]:
                continue
            ref = [v / temperature for v in values[b, t].tolist()]
            cur = [logits[b, t, i].item() / temperature for i in indices[b, t].tolist()]
            zr, zc = math.log(sum(math.exp(x) for x in ref)), math.log(sum(math.exp(x) for x in cur))
            total += sum(math.exp(r - zr) * ((r - zr) - (c - zc)) for r, c in zip(ref, cur, strict=True))
            count += 1
    return temperature**2 * total / count


@pytest.mark.parametrize("k", [3, 7])  # 7 = the whole vocabulary: the full KL
def test_loss_value_and_gradient_match_a_slow_reference(k):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=g, requires_grad=True)
    previous = torch.randn(2, 4, 7, generator=g)
    values, indices = previous.topk(k, dim=-1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    value = lwf_loss(logits, values, indices, mask, temperature=2.0)
    assert value.item() == pytest.approx(slow_lwf(logits, values, indices, mask, 2.0), rel=1e-5)
    value.backward()
    # Numerical gradient of the slow reference at a few entries.
    eps = 1e-3
    for b, t, v in [(0, 0, int(indices[0, 0, 0])), (1, 1, int(indices[1, 1, -1])), (0, 3, 2)]:
        bumped = logits.detach().clone()
        bumped[b, t, v] += eps
        lower = logits.detach().clone()
        lower[b, t, v] -= eps
        numeric = (slow_lwf(bumped, values, indices, mask, 2.0) - slow_lwf(lower, values, indices, mask, 2.0)) / (2 * eps)
        assert logits.grad[b, t, v].item() == pytest.approx(numeric, abs=1e-4)
    assert logits.grad[0, 3].abs().sum() == 0, "a padding position gets no gradient"
    same = lwf_loss(previous, values, indices, torch.ones(2, 4), temperature=2.0)
    assert same.item() == pytest.approx(0.0, abs=1e-6), "zero at the previous model itself"


def rows_and_model():
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=3)
    rows = sft_rows(tok, ["the river is", "a king was", "the city of the king"], ["north", "good", "south east"])
    return tok, model, with_index(rows)


def test_targets_are_the_previous_models_top_k_logits_row_by_row():
    tok, model, rows = rows_and_model()
    lwf = LwF(weight=1.0, topk=5, batch_size=2)
    assert not lwf.active
    model.train()
    lwf.prepare(model, rows, tok.pad_token_id)
    assert lwf.active and model.training, "prepared in eval mode, then put back"
    for i, row in enumerate(rows):
        with torch.no_grad():
            alone = model.eval()(input_ids=torch.tensor([row["input_ids"]])).logits[0]
        values, indices = lwf._targets[i]
        assert values.shape == (len(row["input_ids"]), 5) and values.dtype == torch.float16
        torch.testing.assert_close(indices.long(), alone.topk(5, dim=-1).indices)
        torch.testing.assert_close(values.float(), alone.topk(5, dim=-1).values, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_padded_batch_is_looked_up_by_row_index(side):
    tok, model, rows = rows_and_model()
    lwf = LwF(weight=0.5, topk=4)
    lwf.prepare(model, rows, tok.pad_token_id)
    tok.padding_side = side
    batch = DataCollatorForSeq2Seq(tok, padding=True)([rows[2], rows[0]])
    assert batch[INDEX].tolist() == [2, 0]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    value = lwf(model, batch, logits)
    assert value.item() == pytest.approx(0.0, abs=1e-3), "the model is still the previous stage"
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Slow reference: each row alone, its own real tokens.
    expected = []
    for b, i in enumerate([2, 0]):
        real = batch["attention_mask"][b].bool()
        values, indices = lwf._targets[i]
        expected.append((slow_lwf(logits[b : b + 1, real], values[None].float(), indices[None].long(),
                                  torch.ones(1, int(real.sum())), 2.0), int(real.sum())))  # fmt: skip
    weighted = sum(v * n for v, n in expected) / sum(n for _, n in expected)
    assert lwf(model, batch, logits).item() == pytest.approx(0.5 * weighted, rel=1e-4)
    with pytest.raises(GeReError, match="has no 'gere_example_index'"):
        lwf(model, {k: v for k, v in batch.items() if k != INDEX}, logits)
    short = dict(batch, attention_mask=batch["attention_mask"].clone())
    short["attention_mask"][0, short["attention_mask"][0].nonzero()[0]] = 0
    with pytest.raises(GeReError, match="same rows"):
        lwf(model, short, logits)


def test_the_trainer_adds_lwf_to_the_minimised_loss_and_keeps_the_index_column(tmp_path):
    import datasets

    tok, model, rows = rows_and_model()
    lwf = LwF(weight=2.0, topk=8)
    lwf.prepare(model, rows, tok.pad_token_id)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=3, learning_rate=0.05,
                             logging_steps=1, report_to=[], save_strategy="no", optim="adamw_torch")  # fmt: skip
    trainer = GeReTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True), processing_class=tok,
                          gere_config=GeReConfig(objective="none"), penalties=[lwf])  # fmt: skip
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["lwf"] for e in logged][0] < 1e-3 < logged[-1]["lwf"], "0 at the previous stage, then it grows"
    for e in logged:
        assert e["loss"] == pytest.approx(e["task_ce"] + e["lwf"], rel=1e-4)


def test_two_task_run_distils_every_task_toward_the_stage_before(setup, tmp_path):
    result = run(setup, tmp_path / "lwf", "gere.objective=none", "lwf.weight=1", "lwf.topk=8")
    assert result["method"] == "lwf"
    history = result["loss_history"]
    for task in ("mood", "compass"):
        rows = [r for r in history if r["task"] == task]
        assert rows[0]["lwf"] < 1e-3, "each task starts at the model it distils toward"
        assert rows[-1]["lwf"] > rows[0]["lwf"]
        for r in rows:
            assert r["loss"] == pytest.approx(r["task_ce"] + r["lwf"], rel=1e-4)
    plain = run(setup, tmp_path / "plain", "gere.objective=none")
    assert plain["loss_history"][0]["task_ce"] == pytest.approx(history[0]["task_ce"], rel=1e-6)
    assert plain["accuracy_matrix"][1:] != result["accuracy_matrix"][1:] or plain["general"] != result["general"]


def test_combined_with_ce_tm_and_resumed_after_a_crash(setup, tmp_path, monkeypatch):
    args = ("gere.objective=ce+tm", "lwf.weight=1", "lwf.topk=8", "keep_checkpoints=0")
    whole, resumed = whole_and_resumed(setup, tmp_path, monkeypatch, *args)
    assert whole["method"] == "ce+tm+lwf"
    assert all(r["lwf"] is not None and r["replay_margin"] is not None for r in whole["loss_history"])
    assert [r["lwf"] for r in resumed["loss_history"]] == [r["lwf"] for r in whole["loss_history"]]
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed["metrics"] == whole["metrics"]


def test_settings_are_checked(setup):
    for bad, words in (("lwf.weight=-1", "lwf.weight"), ("lwf.temperature=0", "lwf.temperature"),
                       ("lwf.topk=0", "lwf.topk"), ("lwf.weight=.inf", "lwf.weight"),
                       ("lwf.tokens=answers", "lwf.tokens")):  # fmt: skip
        with pytest.raises(GeReError, match=words):
            load_run_config(setup / "run.yaml", [bad])
    assert load_run_config(setup / "run.yaml", ["lwf.weight=0.5"]).to_dict()["lwf"] == {
        "weight": 0.5, "temperature": 2.0, "topk": 64, "tokens": "all"}
    with pytest.raises(GeReError, match="LwF: weight"):
        LwF(weight=0)
    with pytest.raises(GeReError, match="prepare"):
        LwF()(None, {}, torch.zeros(1, 1, 2))


def test_keep_columns_carries_the_index_past_a_collator_that_drops_it():
    from gere.batching import KeepColumns

    assert LwF.columns == (INDEX,)

    def known_columns_only(features):  # as collators that build batches from the columns they know do
        return {"input_ids": torch.tensor([f["input_ids"] for f in features])}

    collate = KeepColumns(known_columns_only, LwF.columns)
    batch = collate([{"input_ids": [1, 2], INDEX: 7}, {"input_ids": [3, 4], INDEX: 2}])
    assert batch[INDEX].tolist() == [7, 2] and batch["input_ids"].shape == (2, 2)
    assert INDEX not in collate([{"input_ids": [1, 2]}]), "examples without the index pass through"
    joined = KeepColumns(lambda features: {"input_ids": torch.tensor([sum((f["input_ids"] for f in features), [])])},
                         LwF.columns)  # fmt: skip
    with pytest.raises(GeReError, match="2 examples"):
        joined([{"input_ids": [1, 2], INDEX: 0}, {"input_ids": [3], INDEX: 1}])


@pytest.mark.parametrize("side", ["right", "left"])
def test_answer_tokens_distils_only_the_positions_that_predict_the_answer(side):
    tok, model, rows = rows_and_model()
    lwf = LwF(weight=1.0, topk=4, tokens="answer")
    lwf.prepare(model, rows, tok.pad_token_id)
    tok.padding_side = side
    batch = DataCollatorForSeq2Seq(tok, padding=True)([rows[2], rows[1]])
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Slow reference: each row alone; the positions whose next token is labelled, found from the row itself.
    total, count = 0.0, 0
    for b, i in enumerate([2, 1]):
        real = batch["attention_mask"][b].bool()
        row_labels = rows[i]["labels"]
        answer = [t for t in range(len(row_labels) - 1) if row_labels[t + 1] != -100]
        values, indices = lwf._targets[i]
        row_logits = logits[b : b + 1, real][:, answer]
        value = slow_lwf(row_logits, values[None, answer].float(), indices[None, answer].long(),
                         torch.ones(1, len(answer)), 2.0)  # fmt: skip
        total, count = total + value * len(answer), count + len(answer)
    assert lwf(model, batch, logits).item() == pytest.approx(total / count, rel=1e-4)
    assert lwf(model, batch, logits).item() != pytest.approx(LwF.__call__(_all(lwf), model, batch, logits).item())
    with pytest.raises(GeReError, match="needs the batch's labels"):
        lwf(model, {k: v for k, v in batch.items() if k != "labels"}, logits)
    with pytest.raises(GeReError, match=r"LwF: tokens = 'prompt' is not valid: it must be one of"):
        LwF(tokens="prompt")


def _all(lwf):
    """The same targets, every real token distilled."""
    other = LwF(lwf.weight, lwf.temperature, lwf.topk, tokens="all")
    other._targets = lwf._targets
    return other

