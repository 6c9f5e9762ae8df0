"""Real multi-process runs for the tests: ``torchrun`` with 2 gloo processes on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
TORCHRUN = Path(sys.executable).with_name("torchrun")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, out: Path, processes: int = 2, timeout: int = 300) -> list:
    """Run ``tests/<script> OUT`` under torchrun (one thread each) and return each process's
    ``OUT/rank<r>.json``; a failure shows the processes' output."""
    if not TORCHRUN.exists():
        pytest.skip("torchrun is not installed next to this Python")
    # The tests' folder in front of the caller's own path (a checkout's src/ there wins over an installed gere).
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [str(TORCHRUN), "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(TESTS / script), str(out)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
