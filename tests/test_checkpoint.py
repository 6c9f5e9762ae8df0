"""Checkpoints on a disk that fills up: one line naming the disk, the stage and the resume command, nothing
half-written left, every finished stage kept, and the run resumed once there is room."""

from __future__ import annotations

import json
import subprocess

from gere.cli import main

from tiny_runs import run, tmpfs


def test_a_full_disk_in_a_checkpoint_write_is_one_line_and_the_run_resumes(setup, tmp_path, capsys):
    """A real 160 KiB tmpfs: the config, the state and stage 1's checkpoint (92,744 bytes of weights) fit,
    stage 2's does not. Before: a SafetensorError traceback from the writing thread."""
    reference = run(setup, tmp_path / "reference")
    with tmpfs(tmp_path / "disk", "size=160k") as disk:
        out = disk / "run"
        capsys.readouterr()
        assert main(["run", str(setup / "run.yaml"), "--output-dir", str(out), "--no-progress"]) == 2
        (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("gere: error:")]
        assert line.startswith(f"gere: error: the disk is full: the checkpoint of stage 2 did not fit in {out}/"
                               "checkpoints/.stage-2.tmp (its weights are about 90.8 kB; "), line  # fmt: skip
        assert " is free now, the half-written one removed); nothing" in line
        assert line.endswith("nothing finished was lost (every finished stage's checkpoint and run_state.json are "
                             f"as they were): free space on that disk, then continue with: gere run {out}/config.yaml "
                             "--resume")  # fmt: skip
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["stage-1"]  # no .stage-2.tmp
        assert (out / "checkpoints" / "stage-1" / "checkpoint.json").is_file()
        assert json.loads((out / "run_state.json").read_text())["stages_done"] == 1
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)  # space freed
        assert main(["run", str(out / "config.yaml"), "--resume", "--no-progress"]) == 0
        results = json.loads((out / "results.json").read_text())
    assert results["accuracy_matrix"] == reference["accuracy_matrix"]
