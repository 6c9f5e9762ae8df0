"""The registry of continual-learning baselines: each class by its run-config section (its settings' ``section``),
in the order a continual run calls them (their loss parts join the loss in this order). Adding a baseline adds
its class here."""

from __future__ import annotations

from gere.baselines.base import Baseline
from gere.baselines.ewc import EwcBaseline
from gere.baselines.lwf import LwfBaseline
from gere.baselines.olora import OLoraBaseline
from gere.baselines.task_replay import TaskReplay

BASELINES: dict[str, type[Baseline]] = {
    cls.settings_class.section: cls for cls in (EwcBaseline, TaskReplay, OLoraBaseline, LwfBaseline)
}


def run_baselines(cfg) -> dict[str, Baseline]:
    """The baselines run config ``cfg`` turns on, by name, in `BASELINES` order."""
    built = {name: cls.from_config(cfg) for name, cls in BASELINES.items()}
    return {name: b for name, b in built.items() if b is not None}
