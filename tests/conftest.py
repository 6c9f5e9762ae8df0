"""Fixtures shared by the test modules; helpers they import live in tiny.py (models) and tiny_runs.py (runs)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_runs import write_tiny_run  # noqa: E402 (found through the path set above)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny two-task run's folder (``run.yaml`` and its files), written once per test module."""
    return write_tiny_run(tmp_path_factory.mktemp("cl"))
