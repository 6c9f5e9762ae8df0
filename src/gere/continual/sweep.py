"""Sweeps: one run per cell of a grid and per seed, then mean +- sd over seeds and paired differences.

``gere sweep CONFIG --grid gere.objective=ce,ce+tm --grid gere.margin_weight=1,dy --seeds 0,1,2`` runs the
Cartesian product of the grid's values, each with every seed, as ordinary run folders
``<out>/<cell>/seed-<s>/``. A finished cell (its ``results.json`` written under the same config) is skipped
and an interrupted one resumed, so the same command continues a sweep. The aggregate
(`gere.continual.aggregate`) is written as ``sweep.md``, ``sweep.json`` and ``sweep.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gere.config_reading import literal
from gere.continual.aggregate import aggregate_runs, write_aggregate
from gere.continual.run_config import RunConfig, load_run_config
from gere.errors import GeReError, shown

#: Longest cell folder name (ASCII), well under the 255 bytes of common file systems.
FOLDER_MAX = 200
#: Runs (cells x seeds) ``gere sweep`` starts without ``--yes``: a few keys of five values each are thousands.
MAX_RUNS_UNASKED = 50


@dataclass(frozen=True)
class Cell:
    """One point of a sweep: a label and the ``--set`` overrides that make it."""

    label: str
    overrides: tuple[str, ...]

    @property
    def folder(self) -> str:
        """A folder name for the cell: its label with anything but ``[A-Za-z0-9_.+=-]`` replaced; a label
        longer than `FOLDER_MAX` keeps its start and gets a hash of the whole (file systems allow 255 bytes)."""
        name = re.sub(r"[^A-Za-z0-9_.+=-]+", "_", self.label) or "cell"
        if len(name) > FOLDER_MAX:
            name = f"{name[: FOLDER_MAX - 13]}-{hashlib.sha256(self.label.encode()).hexdigest()[:12]}"
        return name


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["gere.objective=ce,ce+tm", "training.learning_rate=1e-5,3e-5"]`` -> ``{key: [values]}``."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        options = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not options:
            raise GeReError(f"--grid {shown(item)}: write it as section.key=value1,value2,...")
        if key == "seed":
            raise GeReError(f"--grid {shown(item)}: seeds are given with --seeds {','.join(options)} (every cell runs "
                            "once per seed); leave seed out of the grid")  # fmt: skip
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
    max_runs: int | None = None,
) -> dict[str, Any]:
    """Run every cell with every seed (skipping finished runs), then aggregate; returns the aggregate.

    ``load_config(overrides)`` builds a cell's config from ``--set``-style overrides (the cell's, then
    ``seed`` and ``output_dir``). ``baseline``: the label of the cell the others are compared with
    (default: the first). ``run`` replaces `gere.continual.runner.run_continual` (called with ``resume``, ``overwrite`` and
    ``progress``).
    ``fresh``: run every cell anew, replacing runs already in ``out_dir``. ``max_runs``: refuse, before any
    cell is built, a sweep of more runs than this (``gere sweep`` passes `MAX_RUNS_UNASKED` unless ``--yes``).
    """
    check_sweep_size(len(cells), len(seeds), max_runs, out_dir)
    if run is None:
        from gere.continual.runner import run_continual as run
    out_dir = Path(out_dir)
    labels = [c.label for c in cells]
    if baseline is not None and baseline not in labels:
        raise GeReError(f"baseline {shown(baseline)} is not a cell of this sweep; cells: {shown(labels, 300)}")
    plan = plan_sweep(load_config, cells, seeds, out_dir)  # every cell is checked before the first one runs
    groups: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for cell, _, folder, cfg in plan:
        if fresh:
            groups[cell.label].append(run(cfg, resume=False, overwrite=True, progress=progress))
        else:
            groups[cell.label].append(_run_or_reuse(cfg, folder, run, progress, out_dir))
    result = aggregate_runs(groups, baseline=baseline or labels[0])
    write_aggregate(result, out_dir, title="Sweep")
    return result


def check_sweep_size(cells: int, seeds: int, max_runs: int | None, out_dir: str | Path | None = None) -> None:
    """Refuse more than ``max_runs`` runs (None: any number), saying how many the grid makes and the flag."""
    runs = cells * seeds
    if max_runs is not None and runs > max_runs:
        found = time_estimate(out_dir, runs) if out_dir is not None else ""
        estimate = f" ({found})" if found.startswith("about") else ""
        raise GeReError(f"this sweep is {cells:,} cell(s) x {seeds} seed(s) = {runs:,} runs{estimate}, more than "
                        f"the {max_runs} gere sweep starts unasked (each is a whole continual run); give fewer "
                        "--grid values, or --yes to run them all")  # fmt: skip


def time_estimate(out_dir: str | Path, runs: int) -> str:
    """How long ``runs`` runs take, from the wall time of the finished runs already in ``out_dir``
    (``<cell>/seed-<s>/results.json``): their mean times the runs not finished. Runs of other sizes in the
    folder make it rough, and the line says what it rests on."""
    from gere.reading import read_json

    times = []
    for path in sorted(Path(out_dir).glob("*/seed-*/results.json")):
        try:
            total = (read_json(path, what="results file").get("timing") or {}).get("total_s")
        except GeReError:
            continue
        if isinstance(total, (int, float)) and total > 0:
            times.append(float(total))
    if not times:
        return f"no finished run in {out_dir} to estimate the time from"
    left = max(runs - len(times), 0)
    mean = sum(times) / len(times)
    return (f"about {_duration(left * mean)} for the {left:,} not finished, from the mean wall time of the "
            f"{len(times)} finished here, {_duration(mean)} each")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_sweep(
    load_config: Callable[[list[str]], RunConfig], cells: Sequence[Cell], seeds: Sequence[int], out_dir: Path
) -> list[tuple[Cell, int, Path, RunConfig]]:
    """``(cell, seed, folder, config)`` for every run of the sweep, each config built and checked
    (`gere.continual.preflight.check_run`: settings, model, tasks, output path) before any run starts. Two
    cells whose values mean the same once parsed (``0.01`` and ``1e-2``) are refused: they would run one
    config twice."""
    from gere.continual.preflight import check_run
    from gere.continual.run_folder import config_digest

    folders = [c.folder for c in cells]
    if len(set(folders)) != len(folders):
        raise GeReError(f"two cells would share a folder ({shown(folders, 300)}); make their values differ in "
                        "more than punctuation")  # fmt: skip
    plan, seen = [], {}
    for cell in cells:
        for seed in seeds:
            folder = out_dir / cell.folder / f"seed-{seed}"
            try:
                cfg = load_config([*cell.overrides, f"seed={seed}", f"output_dir={literal(str(folder))}"])
                check_run(cfg)
            except GeReError as err:
                raise GeReError(f"sweep cell {shown(cell.label, 200)} (seed {seed}): {err}") from None
            inert, raw = inert_settings(cfg), config_digest(cfg)
            twin, twin_raw = seen.setdefault((seed, config_digest(_with_defaults(cfg, inert))), (cell.label, raw))
            if twin != cell.label:
                what = ("gere.margin_weight weights tm, kl, l1 and l2 only" if "gere.margin_weight" in inert
                        else "gere.threshold_k and gere.margin_reduction shape the margin (tm) only")  # fmt: skip
                why = ("their values are equal once read" if raw == twin_raw else
                       f"{', '.join(inert)} change nothing for gere.objective {cfg.gere.objective!r}: {what}")
                raise GeReError(
                    f"the sweep cells {shown(twin, 200)} and {shown(cell.label, 200)} give the same run ({why}); "
                    "give each value once, or sweep a setting only with objectives it acts on"
                )
            plan.append((cell, seed, folder, cfg))
    return plan


def inert_settings(cfg: RunConfig) -> list[str]:
    """The replay settings that change nothing in ``cfg``'s training: the regularisers' weight without a
    regulariser (``ce`` or ``none``), the margin's bands and reduction without the margin."""
    parts = set(cfg.gere.parts)
    inert = [] if parts - {"ce"} else ["gere.margin_weight"]
    return inert + ([] if "tm" in parts else ["gere.threshold_k", "gere.margin_reduction"])


def _with_defaults(cfg: RunConfig, names: list[str]) -> RunConfig:
    """``cfg`` with the ``gere.<name>`` settings in ``names`` at their defaults (for comparing runs)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg.gere) if f"gere.{f.name}" in names}
    return dataclasses.replace(cfg, gere=dataclasses.replace(cfg.gere, **defaults)) if defaults else cfg


def _run_or_reuse(cfg: RunConfig, folder: Path, run, progress: bool, out_dir: Path) -> dict[str, Any]:
    """A finished run's results (same config), or the run resumed or started. A run is finished when its
    ``results.json`` exists, which `gere.continual.report.write_report` writes after the report and the
    plots; a report file missing beside it (deleted, or a folder of an older version) is written again."""
    from gere.continual.report import REPORT_FILES, write_report
    from gere.continual.run_folder import differences_from, read_state, same_config
    from gere.reading import read_json

    results_path = folder / "results.json"
    state = read_state(folder)
    if state is not None and not same_config(state, cfg):
        raise GeReError(
            f"{folder} holds a run of another config ({differences_from(folder, cfg)}): the sweep's base config or "
            f"its grid changed since that run; use a new --out than {out_dir}, or restore the settings that differ"
        )
    if state is not None and results_path.exists() and state["stages_done"] == len(cfg.task_specs()):
        results = read_json(results_path, what="results file")
        if not all((folder / name).exists() for name in REPORT_FILES):
            write_report(folder, results)
        return results
    return run(cfg, resume=state is not None, overwrite=False, progress=progress)


def sweep_loader(config_path: str | Path, overrides: Sequence[str]) -> Callable[[list[str]], RunConfig]:
    """``load_config`` for `run_sweep` from a YAML run config and the command line's ``--set`` overrides.
    The base config is read once here, so a bad file or key is refused before any run starts."""
    load_run_config(config_path, list(overrides))
    return lambda cell_overrides: load_run_config(config_path, [*overrides, *cell_overrides])
