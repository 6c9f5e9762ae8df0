"""Every demo method is a valid run config, and names itself as reports will."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from gere.continual.run_config import load_run_config
from gere.demo.run import METHODS, SIZES, demo_config, method_cells


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_loads_and_is_named_by_its_parts(name, tmp_path):
    root = Path(tmp_path)
    for task in ("a", "b"):
        (root / task).mkdir()
        (root / task / "task.json").write_text(json.dumps({"name": task, "instruction": "Answer.", "labels": ["x", "y"]}))
    assets = SimpleNamespace(model_dir=root / "model", task_dirs=[root / "a", root / "b"], replay=root / "r.jsonl",
                             probe=root / "p.jsonl", heldout_wiki=root / "w.jsonl", heldout_news=root / "n.jsonl")  # fmt: skip
    (cell,) = method_cells([name], "default")
    cfg = load_run_config(None, list(cell.overrides), base=demo_config(assets, "default", root / "out"))
    # The demo's label and the method the report names agree, up to a variant's suffix.
    variant = next((s for s in ("-w100", "-w1", "-dy10", "-gb1", "-warm8", "-bi", "-lora") if name.endswith(s)), "")
    assert cfg.method_name() == name.removesuffix(variant)
    if cfg.finetuning != "full":
        assert cfg.training.learning_rate == SIZES["default"]["lora"]["learning_rate"]
