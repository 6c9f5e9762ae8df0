"""Kill a real `gere run` process at a chosen point (SIGKILL, via `gere.faults`), resume it, and check that
it ends exactly where an uninterrupted run of the same config ends: same metrics, same activation store.

Each case runs the CLI in subprocesses (~6 s each, mostly imports); one uninterrupted reference run is
shared by every case. See docs/reliability.md.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gere.cli import main

from tiny import tiny_tokenizer, write_tiny_run_files

GERE = str(Path(sys.executable).with_name("gere"))


def build_run_folder(root: Path) -> Path:
    """A tiny model, two tiny tasks, replay and held-out texts, and ``run.yaml`` (2 steps per task)."""
    assert tiny_tokenizer().bos_token is None  # every run here also shows that no bos token is needed
    model_dir = write_tiny_run_files(root)
    config = {
        "name": "tiny",
        "model": str(model_dir),
        "tasks": [{"source": str(root / "mood")}, {"source": str(root / "compass")}],
        # 8 replay samples in extraction batches of 2: four batches to interrupt between.
        "gere": {"replay_source": str(root / "replay.jsonl"), "num_replay_samples": 8, "replay_max_length": 16,
                 "replay_batch_size": 2, "extract_batch_size": 2},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 0.01, "max_length": 32,
                     "optim": "adamw_torch"},
        "evaluation": {"perplexity_sets": {"heldout": str(root / "heldout.jsonl")}},
    }  # fmt: skip
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root / "run.yaml"


def gere_run(config: Path, out: Path, *flags: str, fault: str | None = None,
             signal_name: str | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("GERE_FAULT", "GERE_FAULT_SIGNAL")}
    if signal_name:
        env["GERE_FAULT_SIGNAL"] = signal_name
    # One thread: the same arithmetic in every process, and no oversubscription on a busy machine.
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if fault:
        env["GERE_FAULT"] = fault
    return subprocess.run(
        [GERE, "run", str(config), "--output-dir", str(out), "--no-progress", *flags],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def comparable(out: Path) -> dict:
    """Everything of a finished run that must not depend on interruptions (timings excluded)."""
    results = json.loads((out / "results.json").read_text())
    store = json.loads((out / "gere_store" / "manifest.json").read_text())
    return {
        "accuracy_matrix": results["accuracy_matrix"],
        "metrics": results["metrics"],
        "general": results["general"],
        "loss_history": results["loss_history"],
        "store_files": store["files"],  # size and sha256 of every store file
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    config = build_run_folder(root)
    done = gere_run(config, root / "whole")
    assert done.returncode == 0, done.stderr[-2000:]
    return config, comparable(root / "whole")


def test_fault_spec_is_checked(monkeypatch):
    from gere.faults import maybe_fail, parse_fault

    assert parse_fault("extract_batch:2") == ("extract_batch", 2)
    for bad in ("train_step", "train_step:0", "train_step:x", "nowhere:1"):
        with pytest.raises(ValueError, match="<point>:<n>.*extract_batch, train_step, evaluate_task"):
            parse_fault(bad)
    monkeypatch.setenv("GERE_FAULT", "evaluate_task:1")
    maybe_fail("train_step")  # another point: counts nothing, kills nothing
    monkeypatch.delenv("GERE_FAULT")
    maybe_fail("evaluate_task")  # unset: a no-op


def test_kill_during_extraction_then_resume(reference, tmp_path):
    config, whole = reference
    out = tmp_path / "run"
    killed = gere_run(config, out, fault="extract_batch:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    partial = out / "gere_store" / "partial"
    assert json.loads((partial / "progress.json").read_text())["done"] == [0, 1]
    assert not (out / "gere_store" / "manifest.json").exists()  # an unfinished store is never trusted
    assert not (out / "run_state.json").exists()
    # Resuming must continue the forward pass at batch 3, not start over: a fault at the 3rd extracted batch
    # of the resumed process would fire if batches 1-2 were redone (only batches 3 and 4 remain).
    resumed = gere_run(config, out, "--resume", fault="extract_batch:3")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not partial.exists()
    assert comparable(out) == whole


def test_kill_during_second_task_then_resume(reference, tmp_path, capsys):
    config, whole = reference
    out = tmp_path / "run"
    killed = gere_run(config, out, fault="train_step:3")  # task 1 takes steps 1-2: this is task 2's first
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = json.loads((out / "run_state.json").read_text())
    assert state["stages_done"] == 1
    assert (out / "checkpoints" / "stage-1" / "checkpoint.json").exists()
    assert not (out / "checkpoints" / "stage-2").exists()
    # A plain rerun is refused before anything is loaded (in-process: no model is touched); --resume
    # redoes task 2 only.
    assert main(["run", str(config), "--output-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    resumed = gere_run(config, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert comparable(out) == whole


def test_a_resume_removes_the_temporary_files_a_killed_write_left(reference, tmp_path):
    config, whole = reference
    out = tmp_path / "run"
    assert gere_run(config, out, fault="train_step:3").returncode == -signal.SIGKILL
    # What a process killed between atomic_path's temporary file and its rename leaves (mkstemp's names).
    left = [out / ".general.png.k2j4x9.tmp", out / ".run_state.json.a8b7c6.tmp", out / ".report.md.zz.tmp"]
    for path in left:
        path.write_bytes(b"half")
    mine = [out / ".my notes.tmp", out / "general.png.tmp"]  # not a name atomic_path makes for a run file
    for path in mine:
        path.write_text("keep")
    resumed = gere_run(config, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not any(p.exists() for p in left) and all(p.read_text() == "keep" for p in mine)
    assert comparable(out) == whole


def test_kill_during_evaluation_then_resume(reference, tmp_path):
    config, whole = reference
    out = tmp_path / "run"
    killed = gere_run(config, out, fault="evaluate_task:3")  # base: 2 tasks; this is the first after task 1
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = json.loads((out / "run_state.json").read_text())
    assert state["stages_done"] == 0 and len(state["accuracy_matrix"]) == 1  # only the base evaluation
    # The checkpoint is written while the stage is evaluated: killed then, it is at most a temporary folder.
    assert not list((out / "checkpoints").glob("stage-*"))
    resumed = gere_run(config, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert comparable(out) == whole
    assert not list((out / "checkpoints").glob(".*"))  # the temporary folder went with the next write


@pytest.mark.parametrize(("signal_name", "status", "why"), [("TERM", 143, "SIGTERM"), ("INT", 130, "Ctrl-C")])
def test_sigterm_and_ctrl_c_stop_with_one_line_and_resume_cleanly(reference, tmp_path, signal_name, status, why):
    """A stop in task 2 ends with one line (what was kept, the command that continues), no traceback; the
    resumed run equals an uninterrupted one, logs each step once and leaves no temporary file."""
    config, whole = reference
    out = tmp_path / "run"
    stopped = gere_run(config, out, fault="train_step:4", signal_name=signal_name)  # task 2's second step
    assert stopped.returncode == status, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gere: stopped by {why}; every finished task is kept"), last
    assert last.endswith(f"--output-dir {out} --no-progress --resume"), last
    assert json.loads((out / "run_state.json").read_text())["stages_done"] == 1
    steps_before = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any(s["task"].endswith("compass") for s in steps_before), "task 2 had logged a step before the stop"
    resumed = gere_run(config, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert comparable(out) == whole
    # One line per logged step and one summary line per task (the Trainer's train_runtime line).
    logged = [(s["task"], s["step"], "train_runtime" in s)
              for s in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())]  # fmt: skip
    assert len(logged) == len(set(logged)) == 6, logged
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
