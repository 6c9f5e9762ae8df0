"""The README's "Use it with" examples run as they are, on a tiny model folder."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import write_tiny_run_files

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script", ["trainer.py", "sft.py"])
def test_example_runs_and_logs_replay_parts(script, tmp_path):
    if script == "sft.py":
        pytest.importorskip("trl")
    model_dir = write_tiny_run_files(tmp_path)
    done = subprocess.run([sys.executable, str(EXAMPLES / script), str(model_dir), str(tmp_path / "replay.jsonl")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    logged = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert "replay_margin" in logged and (tmp_path / "runs").exists()
