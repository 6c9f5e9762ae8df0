"""The gradient-share diagnostic against a slow reference, and inside a continual run."""

import math

import pytest
import torch

from gere.diagnostics import gradient_shares

from tiny import tiny_llama
from tiny_runs import run


def _parts(model, seed=0):
    """Three differently shaped loss parts of one tiny model, as the trainer's contributions would be."""
    torch.manual_seed(seed)
    ids = torch.randint(3, 100, (2, 6))
    out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    return {
        "task_ce": out.loss / 2,
        "replay_margin": 7.0 * torch.relu(hidden - 0.1).mean(),
        "ewc": 0.3 * sum((p**2).sum() for p in model.parameters()),
    }


def test_gradient_shares_match_separate_backward_passes():
    model = tiny_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    shares = gradient_shares(_parts(model), params)
    # Slow reference: each part's gradient from its own forward and backward pass, then norms and cosines.
    grads = {}
    for name in ("task_ce", "replay_margin", "ewc"):
        model.zero_grad()
        _parts(model)[name].backward()
        grads[name] = torch.cat([p.grad.reshape(-1).double() for p in params])
    total = sum(grads.values())
    assert shares["grad_norm_total"] == pytest.approx(float(total.norm()), rel=1e-6)
    for name, g in grads.items():
        assert shares[f"grad_norm_{name}"] == pytest.approx(float(g.norm()), rel=1e-6)
        cos = float(g @ total / (g.norm() * total.norm()))
        assert shares[f"grad_cos_{name}"] == pytest.approx(cos, abs=1e-6)


def test_a_single_part_has_cosine_one_and_a_constant_part_norm_zero():
    model = tiny_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    parts = _parts(model)
    shares = gradient_shares({"task_ce": parts["task_ce"], "lwf": torch.tensor(0.0)}, params)
    assert shares["grad_cos_task_ce"] == pytest.approx(1.0, abs=1e-9)
    assert shares["grad_norm_lwf"] == 0.0 and "grad_cos_lwf" not in shares
    assert shares["grad_norm_total"] == pytest.approx(shares["grad_norm_task_ce"])


def test_the_graph_survives_for_the_trainers_backward():
    model = tiny_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    parts = _parts(model)
    gradient_shares(parts, params)
    assert all(p.grad is None for p in params)  # measuring leaves no gradient behind
    sum(parts.values()).backward()
    assert all(p.grad is not None for p in params)


def test_a_run_with_the_diagnostic_trains_exactly_as_one_without(setup, tmp_path):
    plain = run(setup, tmp_path / "plain", "gere.objective=ce+tm")
    measured = run(setup, tmp_path / "measured", "gere.objective=ce+tm", "gere.grad_share_every=1")
    assert measured["accuracy_matrix"] == plain["accuracy_matrix"]
    keys = ("loss", "task_ce", "replay_ce", "replay_margin", "margin_weight", "grad_norm")
    for a, b in zip(plain["loss_history"], measured["loss_history"], strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
        assert "grad_norm_task_ce" not in a
        for part in ("task_ce", "replay_ce", "replay_margin"):
            if part == "replay_margin" and b["replay_margin"] == 0:  # the first step: the model is the base
                assert b[f"grad_norm_{part}"] == 0 and f"grad_cos_{part}" not in b
                continue
            assert b[f"grad_norm_{part}"] > 0 and -1 <= b[f"grad_cos_{part}"] <= 1
        # The diagnostic's total is the Trainer's own gradient norm before clipping (one micro-batch a step).
        assert b["grad_norm_total"] == pytest.approx(b["grad_norm"], rel=1e-3)


def test_every_n_steps_measures_only_those_steps(setup, tmp_path):
    results = run(setup, tmp_path / "r", "gere.objective=ce", "gere.grad_share_every=2", "training.max_steps=3")
    measured = [h["step"] for h in results["loss_history"] if "grad_norm_task_ce" in h]
    assert measured == [1, 3, 4, 6]  # steps 1 and 3 of each 3-step task (global steps 0 and 2)
    assert all(math.isfinite(h["grad_cos_replay_ce"]) for h in results["loss_history"] if "grad_cos_replay_ce" in h)


def test_the_report_shows_and_plots_the_gradient_share(setup, tmp_path):
    results = run(setup, tmp_path / "r", "gere.objective=ce+tm", "gere.grad_share_every=1")
    report = (tmp_path / "r" / "report.md").read_text()
    assert "## Gradient share (diagnostic)" in report and "| mood | replay_margin |" in report
    assert (tmp_path / "r" / "grad_share.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run(setup, tmp_path / "p", "gere.objective=ce+tm")
    assert "Gradient share" not in (tmp_path / "p" / "report.md").read_text()
    assert not (tmp_path / "p" / "grad_share.png").exists()
    assert results["loss_history"][0]["learning_rate"] == pytest.approx(0.01)
