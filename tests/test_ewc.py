"""EWC: the penalty and the Fisher against slow references, a two-task run, resume, settings."""

import json

import pytest
import torch
from safetensors.torch import load_file

from gere.baselines.ewc import EWC, FILE, diagonal_fisher, ewc_penalty
from gere.continual.run_config import load_run_config
from gere.errors import GeReError

from tiny import sft_rows, tiny_llama, tiny_tokenizer
from tiny_runs import run, whole_and_resumed


def slow_penalty(params, fisher, anchor, strength):
    total = 0.0
    for name in fisher:
        for p, f, a in zip(params[name].flatten().tolist(), fisher[name].flatten().tolist(),
                           anchor[name].flatten().tolist(), strict=True):  # fmt: skip
            total += f * (p - a) ** 2
    return strength / 2 * total


def test_penalty_value_and_gradient_match_a_slow_reference():
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(3, 4, generator=g, requires_grad=True), "b": torch.randn(5, generator=g, requires_grad=True)}
    fisher = {k: torch.rand(v.shape, generator=g) for k, v in params.items()}
    anchor = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    value = ewc_penalty(params, fisher, anchor, strength=3.0)
    assert value.item() == pytest.approx(slow_penalty(params, fisher, anchor, 3.0), rel=1e-5)
    value.backward()
    for k, p in params.items():  # d/dtheta = strength * F * (theta - anchor)
        torch.testing.assert_close(p.grad, 3.0 * fisher[k] * (p.detach() - anchor[k]))
    with pytest.raises(GeReError, match="from the second task on"):
        ewc_penalty(params, {}, {}, 1.0)


def test_fisher_is_the_mean_squared_gradient_of_each_answer_log_likelihood():
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=2)
    rows = sft_rows(tok, ["the river is", "the city of", "a king was"], ["north", "south east", "good"])
    fisher = diagonal_fisher(model, rows)
    # Slow reference: one example at a time, log-probabilities token by token, backward, square the grads.
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for row in rows:
        model.zero_grad()
        ids = torch.tensor([row["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        ll = sum(logp[t - 1, row["input_ids"][t]] for t in range(1, len(row["labels"])) if row["labels"][t] != -100)
        ll.backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad**2 / len(rows)
    assert set(fisher) == set(expected)
    for n in fisher:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-4, atol=1e-9)
    model.train()
    diagonal_fisher(model, rows[:1])
    assert model.training


def test_consolidate_accumulates_fisher_and_moves_the_anchor(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=1)
    rows = sft_rows(tok, ["the river is", "a king was"], ["north", "good"])
    ewc = EWC(strength=2.0)
    assert not ewc.active
    ewc.consolidate(model, rows[:1])
    first = {k: v.clone() for k, v in ewc.fisher.items()}
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)
    ewc.consolidate(model, rows[1:])
    second = diagonal_fisher(model, rows[1:])
    for k in first:
        torch.testing.assert_close(ewc.fisher[k], first[k] + second[k])
    torch.testing.assert_close(ewc.anchor["model.norm.weight"], model.model.norm.weight.detach())
    assert ewc(model).item() == 0.0  # at the anchor
    ewc.save(tmp_path)
    again = EWC(strength=2.0)
    again.load(tmp_path)
    assert set(again.fisher) == set(ewc.fisher) and all(torch.equal(again.fisher[k], ewc.fisher[k]) for k in ewc.fisher)
    with pytest.raises(GeReError, match="above 0"):
        EWC(0.0)
    with pytest.raises(GeReError, match="missing.*--overwrite"):
        EWC(1.0).load(tmp_path / "nowhere")


def test_two_task_run_adds_the_penalty_from_the_second_task_anchored_at_the_first(setup, tmp_path):
    out = tmp_path / "ewc"
    ewc = run(setup, out, "gere.objective=none", "ewc.strength=1000", "ewc.samples=4", "keep_checkpoints=0")
    assert ewc["method"] == "ewc"
    history = ewc["loss_history"]
    first, second = [r for r in history if r["task"] == "mood"], [r for r in history if r["task"] == "compass"]
    assert all(r["ewc"] is None for r in first), "no penalty while the first task trains"
    assert second and all(r["ewc"] > 0 for r in second[1:]), "the weights leave the anchor after the first step"
    for r in second:  # the penalty is in the loss that was minimised
        assert r["loss"] == pytest.approx(r["task_ce"] + r["ewc"], rel=1e-4)
    stored = load_file(str(out / "checkpoints" / "stage-1" / FILE))
    after_first = load_file(str(out / "checkpoints" / "stage-1" / "weights.safetensors"))
    anchor = {k.split("/", 1)[1]: v for k, v in stored.items() if k.startswith("anchor/")}
    assert anchor and set(anchor) <= set(after_first) | {"lm_head.weight"}
    for name, value in anchor.items():
        if name in after_first:
            torch.testing.assert_close(value, after_first[name].float())
    fisher = {k.split("/", 1)[1]: v for k, v in stored.items() if k.startswith("fisher/")}
    assert set(fisher) == set(anchor) and sum(f.sum().item() for f in fisher.values()) > 0


def test_resume_after_a_crash_gives_the_same_metrics(setup, tmp_path, monkeypatch):
    args = ("gere.objective=ce+tm", "ewc.strength=10", "ewc.samples=4", "keep_checkpoints=0")
    whole, resumed = whole_and_resumed(setup, tmp_path, monkeypatch, *args)
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert [r["ewc"] for r in resumed["loss_history"]] == [r["ewc"] for r in whole["loss_history"]]
    assert resumed["metrics"] == whole["metrics"]


def test_settings_are_checked(setup):
    for bad, words in (("ewc.strength=-1", "ewc.strength"), ("ewc.samples=0", "ewc.samples"),
                       ("ewc.strength=.inf", "ewc.strength")):  # fmt: skip
        with pytest.raises(GeReError, match=words):
            load_run_config(setup / "run.yaml", [bad])
    assert json.loads(json.dumps(load_run_config(setup / "run.yaml", ["ewc.strength=5"]).to_dict()))["ewc"] == {
        "strength": 5.0, "samples": 64}


def test_under_lora_only_the_adapter_is_constrained(setup, tmp_path):
    out = tmp_path / "lora"
    result = run(setup, out, "finetuning=lora", "lora.target_modules=[q_proj,v_proj]", "gere.objective=none",
                 "ewc.strength=10", "ewc.samples=2")  # fmt: skip
    assert any(r["ewc"] for r in result["loss_history"] if r["task"] == "compass")
    stored = load_file(str(out / "checkpoints" / "stage-2" / FILE))
    names = {k.split("/", 1)[1] for k in stored}
    assert names and all("lora_" in n for n in names), sorted(names)[:3]
