from pathlib import Path

import pytest

from gere.continual.run_config import RunConfig, load_run_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses(path):
    # Task sources point at data the user brings; parsing checks every key and type.
    cfg = load_run_config(path)
    assert isinstance(cfg, RunConfig) and cfg.gere.parts


def test_there_are_configs():
    assert len(CONFIGS) >= 2
