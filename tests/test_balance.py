"""Gradient-balanced regulariser weights (gb:<fraction>) against a slow reference, and in a run."""

import pytest
import torch
from torch.testing import assert_close

from gere.config import GeReConfig, weight_rule
from gere.errors import GeReError
from gere.losses import combine_losses

from tiny import tiny_llama
from tiny_runs import run


def _parts(model):
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 6))
    replay = torch.randint(3, 100, (2, 5))
    task = model(input_ids=ids, labels=ids)
    out = model(input_ids=replay, labels=replay, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    return {
        "task_ce": task.loss,
        "replay_ce": out.loss,
        "replay_margin": torch.relu(hidden - 0.05).mean(),
        "ewc": 0.1 * sum((p**2).sum() for p in model.parameters()),
    }


def _flat_grad(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])


@pytest.mark.parametrize("rule,step,warm", [("gb:1", 1, 1.0), ("gb:0.25", 3, 1.0), ("warm:4:gb:0.5", 1, 0.25)])
def test_balanced_loss_gradient_and_value_match_a_slow_reference(rule, step, warm):
    model = tiny_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    loss, weights = combine_losses(_parts(model), rule, step, params)
    got = _flat_grad(model, loss)
    # Slow reference: each part's gradient from its own forward and backward pass.
    p = _parts(model)
    g_ce = _flat_grad(model, (p["task_ce"] + p["replay_ce"]) / 2)
    g_m = _flat_grad(model, _parts(model)["replay_margin"])
    g_ewc = _flat_grad(model, _parts(model)["ewc"])
    fraction = weight_rule(rule).value
    w = fraction * g_ce.norm() / g_m.norm() * warm
    assert weights["margin_weight"] == pytest.approx(float(w), rel=1e-5)
    assert_close(got, g_ce + w * g_m + g_ewc, rtol=1e-5, atol=1e-7)
    assert float((w * g_m).norm()) == pytest.approx(fraction * warm * float(g_ce.norm()), rel=1e-5)
    p = _parts(model)
    value = (p["task_ce"] + p["replay_ce"]) / 2 + float(w) * p["replay_margin"] + p["ewc"]
    assert float(loss) == pytest.approx(float(value), rel=1e-5)


def test_a_zero_regulariser_gets_weight_zero_and_the_ce_gradient_stays():
    model = tiny_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    parts = _parts(model)
    parts["replay_margin"] = parts["replay_margin"] * 0.0
    loss, weights = combine_losses({k: v for k, v in parts.items() if k != "ewc"}, "gb:1", 1, params)
    assert weights["margin_weight"] == 0.0
    p = _parts(model)
    assert_close(_flat_grad(model, loss), _flat_grad(model, (p["task_ce"] + p["replay_ce"]) / 2))


def test_gb_needs_parameters_and_ce_in_every_micro_batch():
    model = tiny_llama()
    with pytest.raises(GeReError, match="trainable parameters"):
        combine_losses(_parts(model), "gb:1", 1)
    with pytest.raises(GeReError, match="without CE"):
        GeReConfig(objective="tm", margin_weight="gb:1", replay_mixing="concat")
    GeReConfig(objective="tm", margin_weight="gb:1")  # a separate replay batch: every micro-batch has task CE


def test_a_run_with_a_balanced_weight_holds_the_margin_gradient_to_the_fraction(setup, tmp_path):
    results = run(setup, tmp_path / "r", "gere.objective=ce+tm", "gere.margin_weight=gb:0.5",
                  "gere.grad_share_every=1")  # fmt: skip
    for h in results["loss_history"]:
        if h["margin_weight"] == 0:  # the first step of the sequence: the model is the base, no violation
            continue
        # The diagnostic measures each part; the CE terms' gradient is the total minus the margin's.
        cos_m, n_m, total = h["grad_cos_replay_margin"], h["grad_norm_replay_margin"], h["grad_norm_total"]
        ce_sq = total**2 - 2 * cos_m * n_m * total + n_m**2  # ||total - margin||^2
        assert n_m == pytest.approx(0.5 * ce_sq**0.5, rel=1e-3)
