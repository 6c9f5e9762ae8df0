"""The regime rule of docs/cl15_study.md section 2, applied to the finished baseline runs (seed 0).

A candidate learning rate qualifies when (a) `none` and `ce` learn every task (no task in the run's
`metrics.not_learned`: accuracy right after a task's own training at least 5 points above just before it)
and (b) `none` forgets clearly: its BWT at or below -10 points, or its final general score (the suite's
mean) 3 or more points below the base model's. The choice is the smallest qualifying rate. Fallback,
written with the rule: if no rate qualifies, the rate where `none` forgets clearly with the fewest tasks not
learned by `none` and `ce` together (ties: the smaller rate); if `none` forgets clearly at no rate, the
rate of its largest forgetting (lowest BWT), and the rule is reported as not met.

`ce` is read only at a rate where `none` forgets clearly: at any other rate the rule and both fallbacks
pass the rate by whatever `ce` does, so `ce` is not run there (`--ce-rates` names the rates that need it).

    .venv/bin/python benchmarks/cl15_regime_rule.py runs/cl15              every figure read, and the choice
    .venv/bin/python benchmarks/cl15_regime_rule.py runs/cl15 --ce-rates   the rates where ce must run
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


def _forgets(none: dict) -> tuple[bool, float | None]:
    """Whether `none` forgets clearly (part b), and its general drop (base minus final, None if unscored)."""
    m = none["metrics"]
    scores = m["general_scores"]
    drop = scores[0] - m["general_final"] if scores and scores[0] is not None and m["general_final"] is not None else None
    return m["bwt"] <= BWT_AT_MOST + 1e-12 or (drop is not None and drop >= GENERAL_DROP - 1e-12), drop


def figures(out: Path, rate: str) -> dict | None:
    """What the rule reads at one rate, or None when a run it needs has not finished (`ce` is needed only
    where `none` forgets clearly; elsewhere its entry is None: not run, not read)."""
    none = _results(out, rate, "none")
    if none is None:
        return None
    forgets, drop = _forgets(none)
    ce = _results(out, rate, "ce")
    if forgets and ce is None:
        return None
    return {"rate": rate, "bwt": none["metrics"]["bwt"], "general_drop": drop, "forgets": forgets,
            "not_learned": {"none": [none["tasks"][i] for i in none["metrics"]["not_learned"]],
                            "ce": None if ce is None else [ce["tasks"][i] for i in ce["metrics"]["not_learned"]]}}  # fmt: skip


def ce_rates(out: Path) -> list[str]:
    """The rates whose `none` run has finished and forgets clearly: where the rule reads `ce`."""
    return [rate for rate in RATES if (none := _results(out, rate, "none")) is not None and _forgets(none)[0]]


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
    if len(argv) not in (1, 2) or (len(argv) == 2 and argv[1] != "--ce-rates"):
        print(__doc__)
        return 2
    out = Path(argv[0])
    if len(argv) == 2:
        print(" ".join(ce_rates(out)))
        return 0
    found = []
    for rate in RATES:
        f = figures(out, rate)
        if f is None:
            print(f"learning rate {rate}: none, or ce where none forgets clearly, not finished under {out}")
            continue
        drop = "-" if f["general_drop"] is None else f"{100 * f['general_drop']:+.1f}"
        print(f"learning rate {rate}: none BWT {100 * f['bwt']:+.1f} points, general drop {drop} points "
              f"({'forgets clearly' if f['forgets'] else 'does not forget clearly'}); not learned: none "
              f"{f['not_learned']['none'] or '-'}, ce "
              f"{'not needed' if f['not_learned']['ce'] is None else f['not_learned']['ce'] or '-'}")  # fmt: skip
        found.append(f)
    if len(found) < len(RATES):
        print("the rule needs every rate: run benchmarks/cl15_study.sh regime to the end")
        return 1
    rate, how = choose(found)
    print(f"regime: learning rate {rate} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
