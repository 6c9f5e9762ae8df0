"""The gradient-share table of finished runs (docs/study.md, section 6): per run and task, each loss part's
median gradient norm and cosine with the total over the task's measured steps, its value at the task's
first two steps, the median margin weight and the Trainer's gradient norm (median, max).

    .venv/bin/python benchmarks/grad_share_table.py runs/gshare/3e-5/*/seed-0 runs/gshare/1e-4/*/seed-0

Reads each folder's results.json (runs made with ``gere.grad_share_every``); prints a markdown table.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

PARTS = ("task_ce", "replay_ce", "replay_margin")


def rows(run: Path) -> list[str]:
    results = json.loads((run / "results.json").read_text())
    label = f"{run.parent.parent.name}/{run.parent.name}"
    out = []
    for task in results["tasks"]:
        steps = [h for h in results["loss_history"] if h["task"] == task]
        cells = []
        for part in PARTS:
            norms = [h.get(f"grad_norm_{part}") for h in steps if h.get(f"grad_norm_{part}") is not None]
            cos = [h[f"grad_cos_{part}"] for h in steps if h.get(f"grad_cos_{part}") is not None]
            if not norms:
                cells.append("-")
                continue
            first = "/".join(f"{v:.3g}" for v in norms[:2])
            cells.append(f"{statistics.median(norms):.3g} ({first}); cos {statistics.median(cos):.2f}" if cos else
                         f"{statistics.median(norms):.3g} ({first})")  # fmt: skip
        weights = [h["margin_weight"] for h in steps if h.get("margin_weight") is not None]
        grad = [h["grad_norm"] for h in steps if h.get("grad_norm") is not None]
        w = f"{statistics.median(weights):.3g} (max {max(weights):.3g})" if weights else "-"
        g = f"{statistics.median(grad):.3g} (max {max(grad):.3g})" if grad else "-"
        out.append(f"| {label} | {task} | " + " | ".join(cells) + f" | {w} | {g} |")
    return out


def main(argv: list[str]) -> int:
    print("| run | task | task_ce: median (steps 1/2); cosine | replay_ce | replay_margin (weighted) | margin "
          "weight median (max) | Trainer grad_norm median (max) |")
    print("|---|---|---|---|---|---|---|")
    for folder in argv:
        for line in rows(Path(folder)):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
