"""Sweeps: one run per cell of a grid and per seed, then mean +- sd over seeds and paired differences.

``gere sweep CONFIG --grid gere.objective=ce,ce+tm --grid gere.margin_weight=1,dy --seeds 0,1,2`` runs the
Cartesian product of the grid's values, each with every seed, as ordinary run folders
``<out>/<cell>/seed-<s>/``. A finished cell (its ``results.json`` written under the same config) is skipped
and an interrupted one resumed, so the same command continues a sweep. The aggregate
(`gere.continual.aggregate`) is written as ``sweep.md``, ``sweep.json`` and ``sweep.png``.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gere.continual.aggregate import aggregate_runs, write_aggregate
from gere.continual.run_config import RunConfig, load_run_config
from gere.errors import GeReError, shown


@dataclass(frozen=True)
class Cell:
    """One point of a sweep: a label and the ``--set`` overrides that make it."""

    label: str
    overrides: tuple[str, ...]

    @property
    def folder(self) -> str:
        """A folder name for the cell: its label with anything but ``[A-Za-z0-9_.+=-]`` replaced."""
        return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", self.label) or "cell"


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["gere.objective=ce,ce+tm", "training.learning_rate=1e-5,3e-5"]`` -> ``{key: [values]}``."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        options = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not options:
            raise GeReError(f"--grid {shown(item)}: write it as section.key=value1,value2,...")
        if key in grid:
            raise GeReError(f"--grid names {shown(key)} twice; give all its values in one --grid {key}=a,b,c")
        if len(set(options)) != len(options):
            raise GeReError(f"--grid {shown(item)} lists a value twice")
        grid[key] = options
    if not grid:
        raise GeReError("a sweep needs at least one --grid key=value1,value2")
    return grid


def grid_cells(grid: dict[str, list[str]]) -> list[Cell]:
    """The Cartesian product of the grid, in the order the keys and values were given."""
    keys = list(grid)
    cells = []
    for values in itertools.product(*(grid[k] for k in keys)):
        pairs = [f"{k}={v}" for k, v in zip(keys, values, strict=True)]
        cells.append(Cell(",".join(pairs), tuple(pairs)))
    return cells


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``."""
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise GeReError(f"--seeds {shown(text)}: give whole numbers separated by commas, e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise GeReError(f"--seeds {shown(text)}: give one or more distinct seeds, e.g. --seeds 0,1,2")
    return seeds


def run_sweep(
    load_config: Callable[[list[str]], RunConfig],
    cells: Sequence[Cell],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    baseline: str | None = None,
    progress: bool = True,
    run: Callable[..., dict[str, Any]] | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run every cell with every seed (skipping finished runs), then aggregate; returns the aggregate.

    ``load_config(overrides)`` builds a cell's config from ``--set``-style overrides (the cell's, then
    ``seed`` and ``output_dir``). ``baseline``: the label of the cell the others are compared with
    (default: the first). ``run`` replaces `gere.continual.runner.run_continual` (called with ``resume``, ``overwrite`` and
    ``progress``).
    ``fresh``: run every cell anew, replacing runs already in ``out_dir``.
    """
    if run is None:
        from gere.continual.runner import run_continual as run
    out_dir = Path(out_dir)
    labels = [c.label for c in cells]
    if baseline is not None and baseline not in labels:
        raise GeReError(f"baseline {shown(baseline)} is not a cell of this sweep; cells: {labels}")
    folders = [c.folder for c in cells]
    if len(set(folders)) != len(folders):
        raise GeReError(f"two cells would share a folder ({folders}); make their values differ in more than punctuation")
    groups: dict[str, list[dict[str, Any]]] = {}
    for cell in cells:
        groups[cell.label] = []
        for seed in seeds:
            folder = out_dir / cell.folder / f"seed-{seed}"
            cfg = load_config([*cell.overrides, f"seed={seed}", f"output_dir={folder}"])
            if fresh:
                groups[cell.label].append(run(cfg, resume=False, overwrite=True, progress=progress))
            else:
                groups[cell.label].append(_run_or_reuse(cfg, folder, run, progress, out_dir))
    result = aggregate_runs(groups, baseline=baseline or labels[0])
    write_aggregate(result, out_dir, title="Sweep")
    return result


def _run_or_reuse(cfg: RunConfig, folder: Path, run, progress: bool, out_dir: Path) -> dict[str, Any]:
    """A finished run's results (same config), or the run resumed or started."""
    from gere.continual.run_folder import config_digest

    results_path, state_path = folder / "results.json", folder / "run_state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else None
    if state is not None and state.get("config_digest") != config_digest(cfg):
        raise GeReError(
            f"{folder} holds a run of another config (the sweep's base config or its grid changed); "
            f"use a new --out than {out_dir}, or delete that folder to rerun it"
        )
    if state is not None and results_path.exists() and state["stages_done"] == len(cfg.task_specs()):
        return json.loads(results_path.read_text())
    return run(cfg, resume=state is not None, overwrite=False, progress=progress)


def sweep_loader(config_path: str | Path, overrides: Sequence[str]) -> Callable[[list[str]], RunConfig]:
    """``load_config`` for `run_sweep` from a YAML run config and the command line's ``--set`` overrides.
    The base config is read once here, so a bad file or key is refused before any run starts."""
    load_run_config(config_path, list(overrides))
    return lambda cell_overrides: load_run_config(config_path, [*overrides, *cell_overrides])
