"""O-LoRA: the penalties against slow references, adapters per task, a two-task run, resume, settings."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from gere.baselines.olora import OLoRA, adapter_name, l2_loss, lora_modules, orthogonality_loss
from gere.batching import adapters_disabled
from gere.continual.run_config import load_run_config
from gere.errors import GeReError

from tiny import tiny_llama
from tiny_runs import run, whole_and_resumed

LORA = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}


def slow_orthogonality(earlier, new):
    """sum over earlier adapters and over pairs (j, k) of rows of (A_i[j] . A_new[k])^2, in plain Python."""
    total = 0.0
    for old in earlier:
        for row_old in old.tolist():
            for row_new in new.tolist():
                total += sum(a * b for a, b in zip(row_old, row_new, strict=True)) ** 2
    return total


def test_penalties_match_slow_references_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    earlier = [torch.randn(2, 5, generator=g), torch.randn(3, 5, generator=g)]
    new = torch.randn(4, 5, generator=g, requires_grad=True)
    value = orthogonality_loss(earlier, new)
    assert value.item() == pytest.approx(slow_orthogonality(earlier, new.detach()), rel=1e-5)
    value.backward()
    # d/dA_new sum_i ||A_i A_new^T||^2 = 2 sum_i (A_new A_i^T) A_i
    expected = sum(2 * (new.detach() @ old.T) @ old for old in earlier)
    torch.testing.assert_close(new.grad, expected)
    assert orthogonality_loss([], new).item() == 0.0
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    assert orthogonality_loss([q[:2]], q[2:]).item() == pytest.approx(0.0, abs=1e-10), "orthogonal rows: zero"
    params = [torch.randn(2, 3, generator=g, requires_grad=True), torch.randn(4, generator=g, requires_grad=True)]
    l2 = l2_loss(params)
    assert l2.item() == pytest.approx(sum(x * x for p in params for x in p.flatten().tolist()), rel=1e-6)
    l2.backward()
    for p in params:
        torch.testing.assert_close(p.grad, 2 * p.detach())


def test_each_task_trains_its_own_adapter_beside_the_frozen_earlier_ones():
    model = get_peft_model(tiny_llama(vocab_size=40, seed=0), LoraConfig(**LORA), adapter_name=adapter_name(0))
    olora = OLoRA(orthogonal=0.5, l2=0.1, lora_config=LoraConfig(**LORA))
    olora.begin_task(model, 0)
    parts = olora(model)
    assert parts["olora_orth"].item() == 0.0, "no earlier adapter on the first task"
    with torch.no_grad():
        for m in lora_modules(model):
            m.lora_B["task-1"].weight.normal_()  # peft starts B at zero; make task-1 change the output
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        after_first = model(input_ids=ids).logits
    olora.begin_task(model, 1)
    training = {n for n, p in model.named_parameters() if p.requires_grad}
    assert training and all(".task-2." in n for n in training), "only the new adapter trains"
    assert model.active_adapters == ["task-1", "task-2"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, after_first)  # new B = 0: task-1 still counts
    parts = olora(model)
    modules = lora_modules(model)
    slow = sum(slow_orthogonality([m.lora_A["task-1"].weight.detach()], m.lora_A["task-2"].weight.detach())
               for m in modules)  # fmt: skip
    assert parts["olora_orth"].item() == pytest.approx(0.5 * slow, rel=1e-5) and slow > 0
    squares = sum(w.pow(2).sum().item() for m in modules for w in (m.lora_A["task-2"].weight, m.lora_B["task-2"].weight))
    assert parts["olora_l2"].item() == pytest.approx(0.1 * squares, rel=1e-5)
    (parts["olora_orth"] + parts["olora_l2"]).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".task-1." in n)
    with adapters_disabled(model):  # peft's own context would turn task-1's gradients back on
        pass
    assert {n for n, p in model.named_parameters() if p.requires_grad} == training
    with pytest.raises(GeReError, match="0 or more"):
        OLoRA(orthogonal=-1, l2=0, lora_config=None)


def test_two_task_run_keeps_an_adapter_per_task_and_penalises_overlap(setup, tmp_path):
    out = tmp_path / "olora"
    result = run(setup, out, "finetuning=olora", "lora.target_modules=[q_proj,v_proj]", "gere.objective=none",
                 "olora.l2=0.01", "keep_checkpoints=0")  # fmt: skip
    assert result["method"] == "olora"
    history = result["loss_history"]
    first, second = [r for r in history if r["task"] == "mood"], [r for r in history if r["task"] == "compass"]
    assert all(r["olora_orth"] == 0.0 for r in first) and all(r["olora_orth"] > 0 for r in second)
    for r in history:
        assert r["loss"] == pytest.approx(r["task_ce"] + r["olora_orth"] + r["olora_l2"], rel=1e-4)
    one = load_file(str(out / "checkpoints" / "stage-1" / "weights.safetensors"))
    two = load_file(str(out / "checkpoints" / "stage-2" / "weights.safetensors"))
    assert {k.split("/")[0] for k in one} == {"task-1"} and {k.split("/")[0] for k in two} == {"task-1", "task-2"}
    for name, value in one.items():  # task-1's adapter did not move while task 2 trained
        torch.testing.assert_close(two[name], value)


def test_with_ce_tm_online_reference_and_resumed_after_a_crash(setup, tmp_path, monkeypatch):
    args = ("finetuning=olora", "lora.target_modules=[q_proj,v_proj]", "gere.objective=ce+tm",
            "gere.reference=online", "keep_checkpoints=0")  # fmt: skip
    whole, resumed = whole_and_resumed(setup, tmp_path, monkeypatch, *args)
    assert whole["method"] == "ce+tm+olora"
    assert all(r["replay_margin"] is not None for r in whole["loss_history"])
    assert [r["olora_orth"] for r in resumed["loss_history"]] == [r["olora_orth"] for r in whole["loss_history"]]
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed["metrics"] == whole["metrics"]


def test_settings_are_checked(setup):
    for bad, words in (("olora.orthogonal=-1", "olora.orthogonal"), ("olora.l2=.inf", "olora.l2"),
                       ("finetuning=o-lora", "finetuning")):  # fmt: skip
        with pytest.raises(GeReError, match=words):
            load_run_config(setup / "run.yaml", [bad])
    with pytest.raises(GeReError, match="use one of the two"):
        load_run_config(setup / "run.yaml", ["finetuning=olora", "ewc.strength=1"])
    assert load_run_config(setup / "run.yaml", ["finetuning=olora"]).to_dict()["olora"] == {"orthogonal": 0.5, "l2": 0.0}
