"""The regime rule of docs/cl15_study.md section 2, applied to the finished baseline runs (seed 0).

A candidate learning rate qualifies when (a) `none` and `ce` learn every task (no task in the run's
`metrics.not_learned`: accuracy right after a task's own training at least 5 points above just before it)
and (b) `none` forgets clearly: its BWT at or below -10 points, or its final general score (the suite's
mean) 3 or more points below the base model's. The choice is the smallest qualifying rate. Fallback,
written with the rule: if no rate qualifies, the rate where `none` forgets clearly with the fewest tasks not
learned by `none` and `ce` together (ties: the smaller rate); if `none` forgets clearly at no rate, the
rate of its largest forgetting (lowest BWT), and the rule is reported as not met.

    .venv/bin/python benchmarks/cl15_regime_rule.py runs/cl15

Prints every figure the rule reads and the choice.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RATES = ("3e-5", "1e-4", "3e-4")
BWT_AT_MOST = -0.10
GENERAL_DROP = 0.03


def _results(out: Path, rate: str, method: str) -> dict | None:
    path = out / "order-4" / f"lr-{rate}" / method / "seed-0" / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def figures(out: Path, rate: str) -> dict | None:
    """What the rule reads at one rate, or None when a baseline run has not finished."""
    none, ce = _results(out, rate, "none"), _results(out, rate, "ce")
    if none is None or ce is None:
        return None
    m = none["metrics"]
    scores = m["general_scores"]
    drop = scores[0] - m["general_final"] if scores and scores[0] is not None and m["general_final"] is not None else None
    return {"rate": rate, "bwt": m["bwt"], "general_drop": drop,
            "not_learned": {"none": [none["tasks"][i] for i in m["not_learned"]],
                            "ce": [ce["tasks"][i] for i in ce["metrics"]["not_learned"]]},
            "forgets": m["bwt"] <= BWT_AT_MOST + 1e-12 or (drop is not None and drop >= GENERAL_DROP - 1e-12)}  # fmt: skip


def choose(found: list[dict]) -> tuple[str, str]:
    """The chosen rate and how it was chosen (rule, first fallback, second fallback)."""
    qualified = [f for f in found if f["forgets"] and not f["not_learned"]["none"] and not f["not_learned"]["ce"]]
    if qualified:
        return qualified[0]["rate"], "the rule: the smallest qualifying rate"
    forgetting = [f for f in found if f["forgets"]]
    if forgetting:
        best = min(forgetting, key=lambda f: len(set(f["not_learned"]["none"]) | set(f["not_learned"]["ce"])))
        return best["rate"], "fallback 1: no rate qualifies; none forgets clearly here with the fewest tasks not learned"
    best = min(found, key=lambda f: f["bwt"])
    return best["rate"], "fallback 2: the rule is not met (none forgets clearly at no rate); its largest forgetting"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    out = Path(argv[0])
    found = []
    for rate in RATES:
        f = figures(out, rate)
        if f is None:
            print(f"learning rate {rate}: none or ce not finished under {out}")
            continue
        drop = "-" if f["general_drop"] is None else f"{100 * f['general_drop']:+.1f}"
        print(f"learning rate {rate}: none BWT {100 * f['bwt']:+.1f} points, general drop {drop} points "
              f"({'forgets clearly' if f['forgets'] else 'does not forget clearly'}); not learned: none "
              f"{f['not_learned']['none'] or '-'}, ce {f['not_learned']['ce'] or '-'}")  # fmt: skip
        found.append(f)
    if len(found) < len(RATES):
        print("the rule needs every rate: run benchmarks/cl15_study.sh regime to the end")
        return 1
    rate, how = choose(found)
    print(f"regime: learning rate {rate} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
