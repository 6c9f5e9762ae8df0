"""A sweep killed between any two writes (SIGKILL of a real `gere sweep` process, via
``GERE_FAULT=write:<n>``) and run again ends exactly where an uninterrupted one ends, every file present.

A cell counts as finished only once its ``results.json`` exists, and `write_report` writes it after the
report and the plots, so a kill anywhere in between leaves the cell to be finished by the next run; a
report file missing beside a ``results.json`` (deleted, or a folder of an older version) is written again
without training. The write positions come from ``GERE_FAULT_LOG`` of an uninterrupted run: the default
run kills after the first plot, after report.md and after results.json; ``-m slow`` kills after every write.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gere.continual.report import REPORT_FILES
from gere.continual.sweep import grid_cells, parse_grid, run_sweep, sweep_loader

from tiny import write_tiny_run_files

GERE = str(Path(sys.executable).with_name("gere"))
CELL = "gere.objective=none"
SWEEP_FILES = ("sweep.md", "sweep.json", "sweep.png")


def gere_sweep(config: Path, out: Path, fault: str | None = None, log: Path | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("GERE_FAULT", "GERE_FAULT_LOG")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if fault:
        env["GERE_FAULT"] = fault
    if log:
        env["GERE_FAULT_LOG"] = str(log)
    argv = [GERE, "sweep", str(config), "--grid", CELL, "--out", str(out), "--no-progress"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def comparable(cell: Path) -> dict:
    results = json.loads((cell / "results.json").read_text())
    return {k: results[k] for k in ("accuracy_matrix", "metrics", "general", "loss_history", "input_warnings")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted sweep of one tiny one-task run, and the files it wrote, in order."""
    root = tmp_path_factory.mktemp("kills")
    model_dir = write_tiny_run_files(root)
    config = {
        "name": "tiny", "model": str(model_dir), "tasks": [{"source": str(root / "mood")}],
        "training": {"max_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 0.01, "max_length": 32,
                     "optim": "adamw_torch"},
        "evaluation": {"perplexity_sets": {"heldout": str(root / "heldout.jsonl")}},
    }  # fmt: skip
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    log = root / "writes.log"
    done = gere_sweep(root / "run.yaml", root / "whole", log=log)
    assert done.returncode == 0, done.stderr[-2000:]
    writes = [line.split(" ", 1)[1] for line in log.read_text().splitlines() if line.startswith("write ")]
    names = [Path(w).name for w in writes]
    assert names[-len(REPORT_FILES) - 3 :] == [*REPORT_FILES[2:], *REPORT_FILES[:2][::-1], *SWEEP_FILES]
    return root, writes, comparable(root / "whole" / CELL / "seed-0")


def kill_and_rerun(reference, tmp_path, n: int) -> None:
    root, writes, whole = reference
    out = tmp_path / "sweep"
    killed = gere_sweep(root / "run.yaml", out, fault=f"write:{n}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert f"at write #{n} (after {writes[n - 1].replace(str(root / 'whole'), str(out))})" in killed.stderr
    cell = out / CELL / "seed-0"
    if not (cell / "results.json").exists():
        assert not all((out / f).exists() for f in SWEEP_FILES)
    again = gere_sweep(root / "run.yaml", out)
    assert again.returncode == 0, again.stderr[-2000:]
    for name in REPORT_FILES:
        assert (cell / name).stat().st_size > 0, name
    for name in SWEEP_FILES:
        assert (out / name).stat().st_size > 0, name
    assert comparable(cell) == whole
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", ["accuracy_matrix.png", "report.md", "results.json"])
def test_a_sweep_killed_while_a_cell_writes_its_report_is_finished_by_the_next_run(reference, tmp_path, name):
    _, writes, _ = reference
    n = 1 + max(i for i, w in enumerate(writes) if Path(w).name == name and "seed-0" in w)
    kill_and_rerun(reference, tmp_path, n)


@pytest.mark.slow
@pytest.mark.parametrize("n", range(1, 40))
def test_a_sweep_killed_after_any_write_is_finished_by_the_next_run(reference, tmp_path, n):
    _, writes, _ = reference
    if n > len(writes):
        pytest.skip(f"the sweep writes {len(writes)} files")
    kill_and_rerun(reference, tmp_path, n)


def _missing_sets() -> list[tuple[str, ...]]:
    others = [n for n in REPORT_FILES if n != "results.json"]
    rng = random.Random(0)
    sets = [(n,) for n in others] + [tuple(others)]
    sets += [tuple(rng.sample(others, rng.randint(2, len(others) - 1))) for _ in range(3)]
    return sets


@pytest.mark.parametrize("missing", _missing_sets(), ids=lambda m: "+".join(Path(n).stem for n in m))
def test_report_files_missing_beside_results_are_written_again_without_training(reference, tmp_path, missing):
    root, _, whole = reference
    out = tmp_path / "sweep"
    shutil.copytree(root / "whole", out)
    cell = out / CELL / "seed-0"
    # The copy is the same run in another folder: its config names the new one.
    config = yaml.safe_load((cell / "config.yaml").read_text())
    config["output_dir"] = str(cell)
    (cell / "config.yaml").write_text(yaml.safe_dump(config))
    for name in missing:
        (cell / name).unlink()

    def never_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    run_sweep(sweep_loader(root / "run.yaml", []), grid_cells(parse_grid([CELL])), [0], out, progress=False,
              run=never_train)  # fmt: skip
    for name in REPORT_FILES:
        assert (cell / name).stat().st_size > 0
    assert comparable(cell) == whole
