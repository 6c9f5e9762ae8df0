"""benchmarks/device_check.py's CPU path, run as a user runs it: a subprocess, a tiny model, its JSON read back."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "device_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path runs where torch sees no CUDA device")
def test_the_cpu_path_writes_every_figure_and_says_cpu(tmp_path):
    out = tmp_path / "device_check.json"
    sizes = ["--steps", "2", "--warmup", "1", "--extract-repeats", "1", "--replay-texts", "8", "--length", "32",
             "--replay-length", "32"]  # fmt: skip
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", *sizes, "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"].startswith("cpu: ") and "the CPU path" in result["device"] and result["path"] == "cpu"
    assert f"device: {result['device']}" in proc.stdout
    assert result["command"] == f"python benchmarks/device_check.py --tiny {' '.join(sizes)} --out {out}"
    assert result["gpu_tests"]["ran"] is False and "no CUDA device" in result["gpu_tests"]["reason"]
    assert "GPU tests: skipped (no CUDA device" in proc.stdout and "pytest -m gpu" in result["gpu_tests"]["command"]
    figures = [result["extraction"][k] for k in ("texts_per_s", "tokens_per_s", "peak_memory_bytes")]
    for objective in ("none", "ce+tm"):
        step = result["step"][objective]
        figures += [step[k] for k in ("seconds", "task_tokens_per_s", "tokens_per_s", "peak_memory_bytes")]
        assert f"  {objective:6} {step['seconds']:.4f} s/step" in proc.stdout
    figures.append(result["peak_memory_bytes"])
    assert all(isinstance(f, int | float) and math.isfinite(f) and f > 0 for f in figures), figures
    assert result["extraction"]["texts"] == 8 and result["extraction"]["tokens"] == 8 * 32
    assert result["step"]["none"]["task_tokens"] == 4 * 32 and result["step"]["none"]["replay_tokens"] == 0
    assert result["step"]["ce+tm"]["replay_tokens"] == 4 * 32  # every replay text filled to its 32 tokens
    # The margin part was trained and logged, finite; none logs the task loss alone.
    logged = result["step"]["ce+tm"]["last_logged"]
    assert {"task_ce", "replay_ce", "replay_margin", "margin_weight"} <= set(logged)
    assert all(math.isfinite(v) for v in logged.values()) and set(result["step"]["none"]["last_logged"]) == {
        "loss", "task_ce"}  # fmt: skip
    assert result["precision"] in ("bf16", "fp32") and result["sizes"]["steps"] == 2


def test_gpu_tests_are_skipped_not_failed_without_cuda(monkeypatch):
    """The device check finds the GPU tests by their marker; here, without CUDA, each is a skip."""
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU machine's view of the GPU tests")
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from device_check import gpu_test_files

    files = gpu_test_files()
    assert {"tests/test_store.py", "tests/test_trainer.py"} <= set(files) and "tests/test_device_check.py" not in files
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert int(re.search(r"(\d+) skipped", summary)[1]) >= 3, summary
    assert not re.search(r"passed|failed|error", summary), summary
