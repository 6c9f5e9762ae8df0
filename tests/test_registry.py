"""The baselines' registry and interface: every baseline one registered module, the runner and the trainer
naming none, and a baseline added by registration alone taking part in a run."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import gere.baselines.registry as registry
from gere.baselines.base import Baseline, Stage
from gere.continual.run_config import RunConfig

from tiny_runs import run

SRC = Path(__file__).resolve().parent.parent / "src" / "gere"


def test_every_baseline_has_a_run_config_section_and_is_off_by_default():
    sections = {f.name: f for f in dataclasses.fields(RunConfig)}
    for name, cls in registry.BASELINES.items():
        assert issubclass(cls, Baseline) and name in sections, name
        assert dataclasses.is_dataclass(sections[name].default_factory()), name
    assert registry.run_baselines(RunConfig()) == {}


def _names_in_code(path: Path) -> set[str]:
    """Identifiers, attributes, imported modules and string constants of a module (not its comments)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.update([node.module, *(a.name for a in node.names)])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and not node.value.count(" "):
            found.add(node.value)
    return found


def test_the_runner_and_the_trainer_name_no_baseline():
    words = {*registry.BASELINES, "task-replay", "lwf", "LwF", "EWC", "OLoRA", "TaskReplay"}
    for module in ("continual/runner.py", "trainer.py"):
        names = _names_in_code(SRC / module)
        named = sorted(
            n for n in names for w in words if w.lower() in n.lower().split(".")[-1].replace("_", "")
        )
        assert named == [], (module, named)
        assert not {n for n in names if n.startswith("gere.baselines.")} - {
            "gere.baselines.base",
            "gere.baselines.registry",
        }


class Counting(Baseline):
    """A baseline added in the test: counts its tasks, reports a row per task, saves its count."""

    def __init__(self):
        self.count = 0

    @classmethod
    def from_config(cls, cfg):
        return cls()

    def train_rows(self, stage: Stage) -> list[dict]:
        return stage.rows[:-1]  # one row fewer, to see the trainer use what the baseline hands back

    def before_task(self, stage: Stage) -> list[dict]:
        return [{"rows": len(stage.rows)}]

    def after_task(self, stage: Stage) -> list[dict]:
        self.count += 1
        return [{"count": self.count}]

    def save(self, folder: Path) -> None:
        (folder / "counting.json").write_text(json.dumps(self.count))


def test_a_baseline_added_by_registration_takes_part_in_a_run(setup, tmp_path, monkeypatch):
    monkeypatch.setitem(registry.BASELINES, "counting", Counting)
    results = run(setup, tmp_path / "r", "gere.objective=none")
    assert results["baselines"] == [
        {"stage": 1, "baseline": "counting", "rows": 15},
        {"stage": 1, "baseline": "counting", "count": 1},
        {"stage": 2, "baseline": "counting", "rows": 15},
        {"stage": 2, "baseline": "counting", "count": 2},
    ]
    assert json.loads((tmp_path / "r" / "checkpoints" / "stage-2" / "counting.json").read_text()) == 2


def test_each_baseline_is_one_spec_its_on_rule_read_by_the_class_and_the_method_name():
    from gere.baselines.settings import BASELINE_SETTINGS
    from gere.continual.run_config import load_run_config
    from gere.parts import PENALTIES

    sections = {f.name: f for f in dataclasses.fields(RunConfig)}
    assert {cls.settings_class for cls in registry.BASELINES.values()} == set(BASELINE_SETTINGS)
    for name, cls in registry.BASELINES.items():
        spec = cls.settings_class
        assert spec in BASELINE_SETTINGS and name == spec.section and sections[name].type in (spec, spec.__name__)
    assert PENALTIES == ("ewc", "lwf", "olora_orth", "olora_l2", "task_replay_ce")  # every section's parts, in order
    on = ["ewc.strength=1", "lwf.weight=0.5", "task_replay.per_task=2", "lora.target_modules=[q_proj]"]
    for sets, method, built in (
        ([], "ce", []),
        (on, "ce+ewc+lwf+task-replay", ["ewc", "task_replay", "lwf"]),
        ([*on[1:], "finetuning=olora"], "ce+lwf+olora+task-replay", ["task_replay", "olora", "lwf"]),
    ):
        cfg = load_run_config(None, ["model=m", "tasks=[{name: t, source: t, labels: [a, b], instruction: i}]",
                                     "gere.objective=ce", *sets])  # fmt: skip
        assert cfg.method_name() == method and list(registry.run_baselines(cfg)) == built
