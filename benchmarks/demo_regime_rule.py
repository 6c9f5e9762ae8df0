"""The demo regime's rule of docs/study.md section 6, applied to finished runs; decided on the baselines only.

The larger of the candidate learning rates at which `none` forgets (mean BWT over the seeds at or below -2
points) and at which `none` and `ce` learn every task on every seed (the runner's rule: accuracy right after
a task's own training at least 5 points above just before it, `metrics.not_learned`); else the smallest.

    .venv/bin/python benchmarks/demo_regime_rule.py 3e-5=runs/map/r1 1e-4=runs/map/r2

Each argument is ``LEARNING_RATE=SWEEP_FOLDER`` (a folder holding ``none/seed-N`` and ``ce/seed-N``).
Prints every figure the rule reads and the choice.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

SEEDS = (0, 1, 2)
BWT_AT_MOST = -0.02


def check(folder: Path) -> tuple[bool, list[str]]:
    """Whether the regime in ``folder`` qualifies, and the lines that say why."""
    lines, ok = [], True
    for method in ("none", "ce"):
        for seed in SEEDS:
            path = folder / method / f"seed-{seed}" / "results.json"
            if not path.is_file():
                return False, [*lines, f"  {method} seed {seed}: no finished run at {path}"]
            metrics = json.loads(path.read_text())["metrics"]
            if metrics["not_learned"]:
                ok = False
            lines.append(f"  {method} seed {seed}: BWT {100 * metrics['bwt']:+.1f}, tasks not learned "
                         f"{metrics['not_learned'] or 'none'}")  # fmt: skip
    bwt = statistics.mean(json.loads((folder / "none" / f"seed-{s}" / "results.json").read_text())["metrics"]["bwt"]
                          for s in SEEDS)  # fmt: skip
    forgets = bwt <= BWT_AT_MOST + 1e-12
    lines.append(f"  none mean BWT {100 * bwt:+.2f} points: {'forgets' if forgets else 'does not forget'} (rule: <= -2)")
    return ok and forgets, lines


def main(argv: list[str]) -> int:
    regimes = sorted(((float(a.split("=", 1)[0]), Path(a.split("=", 1)[1])) for a in argv), reverse=True)
    if not regimes:
        print(__doc__)
        return 2
    chosen = None
    for rate, folder in regimes:
        ok, lines = check(folder)
        print(f"learning rate {rate:g} ({folder}): {'qualifies' if ok else 'does not qualify'}")
        print("\n".join(lines))
        if ok and chosen is None:
            chosen = rate
    smallest = regimes[-1][0]
    print(f"demo regime: {chosen if chosen is not None else smallest:g}"
          f"{'' if chosen is not None else ' (none qualifies: the smallest stays)'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
