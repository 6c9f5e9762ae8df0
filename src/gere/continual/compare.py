"""Several finished runs side by side: ``comparison.md`` and ``comparison.png``.

Each run is named by its folder (as given, less the part all folders share), so two runs of one method and
model stay apart. Runs whose task lists differ are compared with a note saying so at the top: their AP,
BWT and forgetting average over different tasks (or the same tasks in another order).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gere.continual.aggregate import aggregate_runs, render_aggregate, write_aggregate
from gere.continual.metrics import METRICS, check_matrix, compute_metrics, general_source
from gere.continual.plots import new_figure, save_figure
from gere.continual.report import num, pct, table
from gere.errors import GeReError
from gere.io_utils import atomic_write_text, check_output_dir
from gere.reading import read_json


def _final_perplexity(results: dict[str, Any]) -> float | None:
    general = results.get("general") or []
    ppl = (general[-1].get("perplexity") or {}) if general else {}
    return sum(ppl.values()) / len(ppl) if ppl else None


COMPARE_COLUMNS = tuple(info.label for info in METRICS)


def compare_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Read each run's results.json and write ``comparison.md`` and ``comparison.png`` to `out_dir`.

    The table has one row per run: method, the metrics of `gere.continual.metrics.METRICS` (in %), final
    perplexity (mean over held-out sets) and wall time (s).
    """
    runs = read_runs(run_dirs)
    values = [_metric_values(r) for r in runs]
    check_output_dir(out_dir, inside=64, what="--out")
    out_dir = Path(out_dir)
    md_path, png_path = out_dir / "comparison.md", out_dir / "comparison.png"
    note = task_list_note(runs) + general_source_note(runs)
    text = "# Comparison of runs\n\n" + note + "All metrics in %, except perplexity (final stage) and wall time.\n\n"
    groups = group_by_method(runs)
    if any(len(g) > 1 for g in groups.values()) and all(_distinct_seeds(g) for g in groups.values()):
        # Several seeds of one method: the mean +- sd and paired differences say more than single runs.
        result = aggregate_runs(groups)
        aggregate = render_aggregate(result, "Comparison of runs")
        title, _, rest = aggregate.partition("\n")
        text = title + "\n\n" + note + rest.lstrip("\n") + "\n## Each run\n\n"
        write_aggregate(result, out_dir, "Comparison of runs", stem="comparison_seeds")
    atomic_write_text(md_path, text + _comparison_table(runs, values) + "\n")
    _plot_comparison(runs, values, png_path)
    return [md_path, png_path]


_NOT_METHOD = ("seed", "output_dir", "name", "cache_dir", "keep_checkpoints")


def _distinct_seeds(runs: Sequence[dict[str, Any]]) -> bool:
    seeds = [(r.get("config") or {}).get("seed") for r in runs]
    return None not in seeds and len(set(seeds)) == len(seeds)


def group_by_method(runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs whose configs differ only in seed (and where they were written) form one group, labelled by the
    run name, or by the method when names repeat across groups."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        config = {k: v for k, v in (r.get("config") or {}).items() if k not in _NOT_METHOD}
        key = json.dumps([r.get("method"), config], sort_keys=True)
        groups.setdefault(key, []).append(r)
    names = [g[0].get("name", "run") for g in groups.values()]
    methods = [g[0].get("method", "?") for g in groups.values()]
    labels = names if len(set(names)) == len(names) else methods
    if len(set(labels)) != len(labels):
        labels = [f"{m} #{i + 1}" for i, m in enumerate(methods)]
    return dict(zip(labels, groups.values(), strict=True))


def task_list_note(runs: Sequence[dict[str, Any]]) -> str:
    """A paragraph for the top of a comparison when the runs' task lists differ (``""`` when they agree)."""
    lists = {r["folder"]: list(r["tasks"]) for r in runs}
    if len({tuple(t) for t in lists.values()}) <= 1:
        return ""
    each = "; ".join(f"`{folder}`: {', '.join(tasks)}" for folder, tasks in lists.items())
    if len({tuple(sorted(t)) for t in lists.values()}) == 1:
        return (f"**Note: the runs trained the same tasks in different orders** ({each}). Their metrics average "
                "over the same tasks, but BWT, FWT and forgetting depend on the order.\n\n")  # fmt: skip
    return (f"**Note: the runs' task lists differ** ({each}). Their AP, BWT, FWT and forgetting average over "
            "different tasks and do not compare directly; compare runs of one task list, or read each run's "
            "report.\n\n")  # fmt: skip


def general_source_note(runs: Sequence[dict[str, Any]]) -> str:
    """A paragraph for the top of a comparison when the runs' general scores come from different sources
    (lm-eval tasks, the general suite or its sample sizes, the built-in multiple choice): ``""`` when they agree."""
    sources = {r["folder"]: general_source(r.get("general")) or "none" for r in runs}
    if len(set(sources.values())) <= 1:
        return ""
    each = "; ".join(f"`{folder}`: {source}" for folder, source in sources.items())
    return (f"**Note: the runs' general scores come from different sources** ({each}). Their general score and "
            "F1 Avg do not compare directly; compare runs evaluated alike.\n\n")  # fmt: skip


def _folder_names(run_dirs: Sequence[str | Path]) -> list[str]:
    """Each run's folder less the part all of them share (``runs/a/s0``, ``runs/b/s0`` -> ``a/s0``, ``b/s0``)."""
    paths = [Path(d).resolve() for d in run_dirs]
    if len(paths) == 1:
        return [paths[0].name or str(paths[0])]
    common = Path(os.path.commonpath(paths))
    return [str(p.relative_to(common)) if p != common else p.name for p in paths]


def read_runs(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The results.json of each run folder, with clear errors for a missing or broken one; each run's
    ``folder`` is its name in the comparison."""
    if not run_dirs:
        raise GeReError("compare_runs needs at least one run folder; pass the folders holding results.json")
    runs = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "results.json"
        if not path.is_file():
            raise GeReError(f"{path} does not exist; pass run folders written by write_report")
        data = read_json(path, what="results file", fix="rerun write_report for that run")
        runs.append(_checked_results(data, path))
    for run, folder in zip(runs, _folder_names(run_dirs), strict=True):
        run["folder"] = folder
    return runs


def _checked_results(data: Any, path: Path) -> dict[str, Any]:
    """A results dict with what the comparison reads, or an error naming the file and what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list) or "accuracy_matrix" not in data:
        raise GeReError(f"{path} is not a results file written by gere (no 'tasks' list and 'accuracy_matrix'); "
                        "pass the folders of finished runs")  # fmt: skip
    try:
        matrix = check_matrix(data["accuracy_matrix"])
        if not isinstance(data.get("metrics"), dict):
            data["metrics"] = compute_metrics(matrix, data.get("test_sizes"), data.get("general"))
    except (TypeError, ValueError) as err:
        raise GeReError(f"{path}: the accuracy matrix or general scores are not numbers ({err})") from None
    except GeReError as err:
        raise GeReError(f"{path}: {err}") from None
    return data


def _metric_values(run: dict[str, Any]) -> list[float | None]:
    """The run's values of `COMPARE_COLUMNS`, as fractions."""
    m = run["metrics"]
    return [m.get(info.key) for info in METRICS]


def _comparison_table(runs: list[dict[str, Any]], values: list[list[float | None]]) -> str:
    header = ["run folder", "method", "name", *COMPARE_COLUMNS, "perplexity", "wall time (s)"]
    rows = [
        [f"`{r['folder']}`", str(r.get("method", "?")), str(r.get("name", "")), *map(pct, numbers),
         num(_final_perplexity(r)), num((r.get("timing") or {}).get("total_s"), 1)]  # fmt: skip
        for r, numbers in zip(runs, values, strict=True)
    ]
    return table(header, rows)


def _plot_comparison(runs: list[dict[str, Any]], values: list[list[float | None]], path: Path) -> None:
    fig = new_figure(max(7.0, 1.2 * len(COMPARE_COLUMNS) + 0.4 * len(runs)), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    for k, (r, numbers) in enumerate(zip(runs, values, strict=True)):
        xs = [c + (k - (len(runs) - 1) / 2) * width for c in range(len(COMPARE_COLUMNS))]
        heights = [0.0 if v is None else 100 * v for v in numbers]
        ax.bar(xs, heights, width, label=f"{r['folder']}: {r.get('method', '?')}")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(COMPARE_COLUMNS)), COMPARE_COLUMNS, rotation=20)
    ax.set_ylabel("%")
    ax.set_title("Methods compared")
    ax.legend(fontsize=7)
    save_figure(fig, path)
