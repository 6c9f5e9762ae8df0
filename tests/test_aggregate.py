"""Mean +- sd over seeds and paired differences, against numbers worked by hand."""

from __future__ import annotations

import math

import pytest

from gere.continual.aggregate import (
    aggregate_runs,
    paired_difference,
    render_aggregate,
    t975,
    write_aggregate,
)
from gere.errors import GeReError


def fake_run(seed: int, ap: float, general: float, ppl: float, name: str = "run") -> dict:
    """A results dict with the fields the aggregate reads (one task, so BWT and forgetting are None)."""
    f1 = 2 * ap * general / (ap + general)
    return {
        "name": name,
        "config": {"seed": seed},
        "metrics": {"ap": ap, "bwt": None, "fwt": None, "forgetting": None, "general_final": general, "f1_avg": f1},
        "general": [{"perplexity": {"wiki": ppl}}],
        "timing": {"per_task_s": [6.0, 4.0], "train_steps": 5},
    }


BASE = [fake_run(0, 0.50, 0.60, 30.0), fake_run(1, 0.60, 0.62, 32.0), fake_run(2, 0.70, 0.64, 31.0)]
TM = [fake_run(0, 0.55, 0.70, 28.0), fake_run(1, 0.62, 0.71, 29.0), fake_run(2, 0.78, 0.75, 27.0)]


def test_mean_sd_and_paired_interval_by_hand():
    result = aggregate_runs({"ce": BASE, "ce+tm": TM}, baseline="ce")
    ap = result["cells"]["ce"]["AP %"]
    # AP 50, 60, 70: mean 60, sample sd sqrt(((-10)^2 + 0 + 10^2) / 2) = 10.
    assert ap["mean"] == pytest.approx(60.0) and ap["sd"] == pytest.approx(10.0) and ap["n"] == 3
    assert result["cells"]["ce"]["s / step"]["mean"] == pytest.approx(2.0)  # (6 + 4) s / 5 steps
    d = result["differences"]["ce+tm"]["AP %"]
    # Paired differences 5, 2, 8: mean 5, sd sqrt((0 + 9 + 9) / 2) = 3, half-width 4.303 * 3 / sqrt(3).
    assert d["mean"] == pytest.approx(5.0) and d["sd"] == pytest.approx(3.0) and d["seeds"] == [0, 1, 2]
    half = 4.303 * 3.0 / math.sqrt(3)
    assert (d["low"], d["high"]) == (pytest.approx(5.0 - half), pytest.approx(5.0 + half))
    ppl = result["differences"]["ce+tm"]["ppl wiki"]  # -2, -3, -4
    assert ppl["mean"] == pytest.approx(-3.0) and ppl["high"] < 0
    assert result["cells"]["ce"]["BWT %"] is None and "BWT %" in result["metrics"]
    text = render_aggregate(result, "Sweep")
    assert "| ce | 3 | 60.00 ± 10.00 |" in text
    assert f"+5.00 [{5.0 - half:+.2f}, {5.0 + half:+.2f}]" in text


def test_differences_pair_by_seed_and_one_seed_gives_no_interval():
    partial = {"ce": BASE, "tm": [TM[2]]}
    d = aggregate_runs(partial, baseline="ce")["differences"]["tm"]["AP %"]
    assert d["seeds"] == [2] and d["mean"] == pytest.approx(8.0) and d["low"] is None
    assert paired_difference({0: 1.0}, {1: 2.0}) is None  # no seed in common
    with pytest.raises(GeReError, match="seed 0"):
        aggregate_runs({"ce": [BASE[0], BASE[0]]})


def test_t_quantiles():
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(11) == 2.228 and t975(1000) == 1.96
    with pytest.raises(ValueError):
        t975(0)


def test_written_files(tmp_path):
    paths = write_aggregate(aggregate_runs({"ce": BASE, "ce+tm": TM}), tmp_path, "Sweep")
    assert [p.name for p in paths] == ["sweep.md", "sweep.json", "sweep.png"]
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
