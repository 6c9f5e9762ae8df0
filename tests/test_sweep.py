"""gere sweep: the grid, one ordinary run folder per cell and seed, skipping and resuming, the aggregate."""

from __future__ import annotations

import json

import pytest

from gere.cli import main
from gere.continual.compare import compare_runs
from gere.continual.runner import run_continual
from gere.continual.sweep import (
    Cell,
    grid_cells,
    parse_grid,
    parse_seeds,
    run_sweep,
    sweep_loader,
    time_estimate,
)
from gere.errors import GeReError


def test_grid_is_the_product_in_the_order_given():
    grid = parse_grid(["gere.objective=ce,ce+tm", "gere.margin_weight=1, 100 ,dy"])
    assert grid == {"gere.objective": ["ce", "ce+tm"], "gere.margin_weight": ["1", "100", "dy"]}
    cells = grid_cells(grid)
    assert [c.label for c in cells][:4] == [
        "gere.objective=ce,gere.margin_weight=1",
        "gere.objective=ce,gere.margin_weight=100",
        "gere.objective=ce,gere.margin_weight=dy",
        "gere.objective=ce+tm,gere.margin_weight=1",
    ]
    assert len(cells) == 6 and cells[3].overrides == ("gere.objective=ce+tm", "gere.margin_weight=1")
    assert Cell("a=b c/d", ()).folder == "a=b_c_d"
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in (["gere.objective"], ["x=a", "x=b"], ["x=a,a"], []):
        with pytest.raises(GeReError):
            parse_grid(bad)
    with pytest.raises(GeReError, match="--seeds"):
        parse_seeds("0,x")


def test_sweep_runs_every_cell_and_seed_then_skips_and_resumes(setup, tmp_path):
    calls = []

    def counting_run(cfg, resume=False, overwrite=False, progress=True):
        calls.append((cfg.output_dir, resume))
        return run_continual(cfg, resume=resume, overwrite=overwrite, progress=False)

    load = sweep_loader(setup / "run.yaml", ["training.max_steps=1"])
    cells = grid_cells(parse_grid(["gere.objective=none,ce"]))
    out = tmp_path / "sweep"
    result = run_sweep(load, cells, [0, 1], out, run=counting_run, progress=False)
    assert len(calls) == 4 and not any(resume for _, resume in calls)
    for cell in ("gere.objective=none", "gere.objective=ce"):
        for seed in (0, 1):
            data = json.loads((out / cell / f"seed-{seed}" / "results.json").read_text())
            assert data["config"]["seed"] == seed and data["config"]["training"]["max_steps"] == 1
    assert result["baseline"] == "gere.objective=none" and result["cells"]["gere.objective=ce"]["AP %"]["n"] == 2
    assert (out / "sweep.md").exists() and (out / "sweep.png").exists()
    assert "## Paired differences against `gere.objective=none`" in (out / "sweep.md").read_text()

    estimate = time_estimate(out, 8)  # the four finished runs' mean wall time, for the four left of eight
    assert "for the 4 not finished, from the mean wall time of the 4 finished here" in estimate
    assert estimate.startswith("about ") and time_estimate(tmp_path / "none", 2).startswith("no finished run in")
    calls.clear()
    again = run_sweep(load, cells, [0, 1], out, run=counting_run, progress=False)
    assert calls == [] and again["cells"] == result["cells"]  # finished cells are read, not rerun

    (out / "gere.objective=ce" / "seed-1" / "results.json").unlink()  # as if killed before the report
    run_sweep(load, cells, [0, 1], out, run=counting_run, progress=False)
    assert calls == [(str(out / "gere.objective=ce" / "seed-1"), True)]

    other = sweep_loader(setup / "run.yaml", ["training.max_steps=2"])
    with pytest.raises(GeReError, match="another config"):
        run_sweep(other, cells, [0], out, progress=False)


def test_cli_sweep_and_compare_of_seeds(setup, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["sweep", str(setup / "run.yaml"), "--grid", "gere.objective=none,ce", "--seeds", "3,4",
            "--set", "training.max_steps=1", "--baseline", "gere.objective=ce", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Paired differences against `gere.objective=ce`" in text and "| gere.objective=none |" in text
    runs = [out / f"gere.objective={o}" / f"seed-{s}" for o in ("none", "ce") for s in (3, 4)]
    compare_runs(runs, tmp_path / "cmp")
    seeds = (tmp_path / "cmp" / "comparison_seeds.md").read_text()
    assert "| none | 2 |" in seeds and "| ce | 2 |" in seeds
    assert main(["sweep", str(setup / "run.yaml"), "--grid", "gere.objective=ce", "--baseline", "x",
                 "--out", str(out)]) == 2  # fmt: skip


class Started(Exception):
    """Raised by a run function: the sweep got past its checks to the first run."""


def test_a_huge_sweep_says_its_size_and_is_refused_unless_yes(setup, tmp_path, capsys):
    """75 runs (5 x 5 x 3 cells, one seed): the count is printed first, and nothing runs or is written without
    --yes (a 3,125-cell grid used to start with no count)."""
    grid = ["training.learning_rate=1e-3,2e-3,3e-3,4e-3,5e-3", "training.warmup_steps=0,1,2,3,4",
            "training.max_steps=1,2,3"]  # fmt: skip
    out = tmp_path / "big"
    argv = ["sweep", str(setup / "run.yaml"), *[x for g in grid for x in ("--grid", g)], "--out", str(out)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "sweep: 75 cell(s) x 1 seed(s) = 75 runs; no finished run in" in captured.out
    assert "this sweep is 75 cell(s) x 1 seed(s) = 75 runs, more than the 50 gere sweep starts unasked" in captured.err
    assert "--yes to run them all" in captured.err and not out.exists()
    # With --yes the cells are built and checked: a bad value among them is the refusal now, not the size.
    bad = [*argv[:-2], "--grid", "training.num_train_epochs=1,0", "--out", str(out), "--yes"]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "training.num_train_epochs = 0" in err and "more than the 50" not in err and not out.exists()

    def first_run(cfg, **kwargs):
        raise Started(cfg.output_dir)

    cells, load = grid_cells(parse_grid(grid)), sweep_loader(setup / "run.yaml", [])
    with pytest.raises(GeReError, match=r"2 seed\(s\) = 150 runs, more than the 50"):
        run_sweep(load, cells, [0, 1], out, progress=False, run=first_run, max_runs=50)
    with pytest.raises(Started):  # --yes: every cell is checked, then the first runs
        run_sweep(load, cells, [0], out, progress=False, run=first_run, max_runs=None)
    with pytest.raises(Started):  # 50 runs are not asked about
        run_sweep(load, cells[:25], [0, 1], out, progress=False, run=first_run, max_runs=50)
