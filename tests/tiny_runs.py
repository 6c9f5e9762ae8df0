"""The tiny two-task continual run the tests share: its files and config, a run of it, and a run crashed in
its second task and resumed. The ``setup`` fixture (tests/conftest.py) writes the files once per test module."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import yaml

import gere.continual.runner as runner
from gere.continual.run_config import load_run_config
from gere.continual.runner import run_continual

from tiny import write_tiny_run_files


def write_tiny_run(root: Path) -> Path:
    """A tiny model, two tasks (mood, compass), replay and held-out texts and ``run.yaml`` under ``root``."""
    model_dir = write_tiny_run_files(root)
    mc = [
        {
            "question": "the river is",
            "choices": ["north", "south", "good", "bad"],
            "answer": 1,
            "subject": "geo",
        }
    ]
    (root / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in mc * 3))
    config = {
        "name": "tiny",
        "model": str(model_dir),
        "tasks": [{"source": str(root / "mood")}, {"source": str(root / "compass")}],
        "gere": {"replay_source": str(root / "replay.jsonl"), "num_replay_samples": 8, "replay_max_length": 16,
                 "replay_batch_size": 2},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 0.01, "max_length": 32,
                     "optim": "adamw_torch", "bf16": False},  # fp32 on every machine: the tests compare exact numbers
        "evaluation": {"general_mc": str(root / "mc.jsonl"), "perplexity_sets": {"heldout": str(root / "heldout.jsonl")}},
    }  # fmt: skip
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root


def run(setup, out, *extra, **kwargs):
    cfg = load_run_config(setup / "run.yaml", [f"output_dir={out}", *extra])
    return run_continual(cfg, progress=False, **kwargs)


@contextlib.contextmanager
def crash_in_second_task(monkeypatch):
    """Inside the block a run stops with "simulated crash" as its second task starts (the block expects it)."""
    real = runner._run_stage

    def crash_on_second_task(run_, index):
        if index == 1:
            raise RuntimeError("simulated crash")
        return real(run_, index)

    monkeypatch.setattr(runner, "_run_stage", crash_on_second_task)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            yield
    finally:
        monkeypatch.setattr(runner, "_run_stage", real)


def whole_and_resumed(setup, tmp_path, monkeypatch, *args):
    """The same run twice: once straight through, once crashing in its second task and then resumed."""
    whole = run(setup, tmp_path / "whole", *args)
    with crash_in_second_task(monkeypatch):
        run(setup, tmp_path / "resumed", *args)
    return whole, run(setup, tmp_path / "resumed", *args, resume=True)


@contextlib.contextmanager
def tmpfs(mount_point: Path, options: str):
    """A real tmpfs mounted at ``mount_point`` for the block, with mount ``options`` (``size=160k``: a disk
    that fills up; ``ro,size=1m``: a read-only one). The test is skipped where mounting is not allowed."""
    import subprocess

    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
