"""Several seeds of several methods: mean +- sd per method, and paired differences with a 95% interval.

A group is the runs of one method (a sweep cell) over seeds. For every metric of `run_values` the
aggregate gives the mean and the sample standard deviation over the group's seeds, and, against a
baseline group, the paired difference: for each seed both groups ran, method minus baseline; their mean,
sd and the 95% interval ``mean +- t(0.975, n - 1) * sd / sqrt(n)`` (Student's t; none with one seed).
Pairing by seed removes what the seed changes in both alike (data order, replay order), so the interval is
about the method. Accuracy-like metrics are in percentage points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gere.continual.metrics import METRICS
from gere.continual.plots import new_figure, save_figure
from gere.continual.report import table
from gere.errors import GeReError
from gere.io_utils import atomic_write_json, atomic_write_text

# Two-sided 95% quantiles of Student's t by degrees of freedom; between entries the smaller df is used
# (a slightly wider, conservative interval).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000,
         120: 1.980}  # fmt: skip
PLOTTED = ("AP %", "BWT %", "general %", "F1 Avg %")


def t975(df: int) -> float:
    """Student's t quantile 0.975 for ``df`` >= 1 degrees of freedom (table above; 1.96 beyond 120)."""
    if df < 1:
        raise ValueError("an interval needs at least two paired values (one degree of freedom)")
    known = [d for d in _T975 if d <= df]
    return _T975[max(known)] if df <= 120 else 1.96


def run_values(results: dict[str, Any]) -> dict[str, float | None]:
    """The metrics of one run that a sweep compares, by display name."""
    m = results["metrics"]

    def points(value):
        return None if value is None else 100.0 * value

    values = {f"{info.label} %": points(m.get(info.key)) for info in METRICS}
    general = results.get("general") or []
    final = general[-1] if general else {}
    if final.get("mc_accuracy_sum") is not None:
        values["general (sum) %"] = points(final["mc_accuracy_sum"])
    for name, scores in (final.get("suite") or {}).items():  # the general suite's benchmarks, each
        values[f"{name} %"] = points(scores["score"])
    for name, value in sorted((final.get("perplexity") or {}).items()):
        values[f"ppl {name}"] = value
    timing = results.get("timing") or {}
    steps = timing.get("train_steps")
    if steps:
        values["s / step"] = sum(timing.get("per_task_s") or []) / steps
    return values


def _summary(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "sd": sd, "n": n, "values": values}


def paired_difference(values: dict[int, float], baseline: dict[int, float]) -> dict[str, Any] | None:
    """Method minus baseline over the seeds both have: mean, sd, n and the 95% interval (None when n < 2)."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return None
    out = _summary([values[s] - baseline[s] for s in seeds])
    out["seeds"] = seeds
    if out["n"] > 1:
        half = t975(out["n"] - 1) * out["sd"] / math.sqrt(out["n"])
        out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    else:
        out["low"] = out["high"] = None
    return out


def _by_seed(runs: Sequence[dict[str, Any]], metric: str) -> dict[int, float]:
    found = {}
    for r in runs:
        value = run_values(r).get(metric)
        if value is not None:
            seed = int(r["config"]["seed"])
            if seed in found:
                raise GeReError(f"two runs of one method ({r.get('name')!r}) have seed {seed}; give each one seed")
            found[seed] = value
    return found


def aggregate_runs(groups: dict[str, Sequence[dict[str, Any]]], baseline: str | None = None) -> dict[str, Any]:
    """``{label: [results of each seed]}`` -> mean +- sd per metric and paired differences vs ``baseline``."""
    if not groups or not all(groups.values()):
        raise GeReError("nothing to aggregate: give at least one run per method")
    baseline = baseline or next(iter(groups))
    metrics: list[str] = []
    for runs in groups.values():
        for r in runs:
            metrics += [k for k in run_values(r) if k not in metrics]
    cells: dict[str, dict[str, Any]] = {}
    differences: dict[str, dict[str, Any]] = {}
    for label, runs in groups.items():
        cells[label] = {}
        differences[label] = {}
        for metric in metrics:
            per_seed = _by_seed(runs, metric)
            cells[label][metric] = _summary(list(per_seed.values())) if per_seed else None
            if label != baseline:
                differences[label][metric] = paired_difference(per_seed, _by_seed(groups[baseline], metric))
    produced = [r.get("provenance") for runs in groups.values() for r in runs if r.get("provenance")]
    return {"metrics": metrics, "baseline": baseline, "cells": cells, "differences": differences,
            "provenance": _common_provenance(produced)}  # fmt: skip


def _common_provenance(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the runs were made with; a field that differs between runs lists every value seen."""
    if not entries:
        return None
    out: dict[str, Any] = {}
    for key in ("argv", "commit", "dirty", "gere", "torch", "transformers", "python", "machine", "threads"):
        seen = []
        for e in entries:
            if e.get(key) not in seen:
                seen.append(e.get(key))
        out[key] = seen[0] if len(seen) == 1 else seen
    return out


def _mean_sd(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    if entry["sd"] is None:
        return f"{entry['mean']:.2f}"
    return f"{entry['mean']:.2f} ± {entry['sd']:.2f}"


def _interval(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    if entry["low"] is None:
        return f"{entry['mean']:+.2f} (n=1)"
    return f"{entry['mean']:+.2f} [{entry['low']:+.2f}, {entry['high']:+.2f}]"


def render_aggregate(result: dict[str, Any], title: str) -> str:
    metrics, cells = result["metrics"], result["cells"]
    seeds = {label: max((c["n"] for c in row.values() if c), default=0) for label, row in cells.items()}
    lines = [f"# {title}", "", "Mean ± sd over seeds; accuracy-like metrics in %, perplexity as is.", ""]
    rows = [[label, str(seeds[label]), *[_mean_sd(cells[label][m]) for m in metrics]] for label in cells]
    lines.append(table(["method", "seeds", *metrics], rows))
    others = [label for label in cells if label != result["baseline"]]
    if others:
        lines += ["", f"## Paired differences against `{result['baseline']}`", "",
                  "Method minus baseline on the same seeds: mean [95% interval, Student's t].", ""]  # fmt: skip
        rows = [[label, *[_interval(result["differences"][label][m]) for m in metrics]] for label in others]
        lines.append(table(["method", *metrics], rows))
    made = result.get("provenance")
    if made:
        dirty = " (with uncommitted changes)" if made["dirty"] is True else ""
        lines += ["", f"Command: `{made['argv']}`.", "",
                  f"Made by gere {made['gere']}, commit {made['commit']}{dirty}; torch {made['torch']}, "
                  f"transformers {made['transformers']}; {made['machine']}, {made['threads']} threads."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_aggregate(result: dict[str, Any], path: Path) -> Path:
    """Bars of the mean with sd error bars, one panel per metric of `PLOTTED` and per perplexity."""
    shown = [m for m in result["metrics"] if m in PLOTTED or m.startswith("ppl ")]
    labels = list(result["cells"])
    columns = min(3, len(shown))
    rows = -(-len(shown) // columns)
    fig = new_figure(max(6.0, 2.2 * columns + 0.25 * len(labels) * columns), 3.6 * rows)
    for k, metric in enumerate(shown):
        ax = fig.add_subplot(rows, columns, k + 1)
        entries = [result["cells"][label][metric] for label in labels]
        means = [e["mean"] if e else 0.0 for e in entries]
        errors = [e["sd"] or 0.0 if e else 0.0 for e in entries]
        ax.bar(range(len(labels)), means, yerr=errors, capsize=3, color=[f"C{i}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
    return save_figure(fig, path)


def write_aggregate(result: dict[str, Any], out_dir: str | Path, title: str, stem: str = "sweep") -> list[Path]:
    """``<stem>.md``, ``<stem>.json`` and ``<stem>.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    paths = [out_dir / f"{stem}.md", out_dir / f"{stem}.json", out_dir / f"{stem}.png"]
    atomic_write_text(paths[0], render_aggregate(result, title))
    atomic_write_json(paths[1], result)
    plot_aggregate(result, paths[2])
    return paths
