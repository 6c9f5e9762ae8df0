"""Training-step time with freed host memory kept for reuse (`gere.allocator`, what the `gere` command does on
a CPU-only machine) against glibc's default, on the demo's model, data and settings.

The setting changes the whole process, so each side runs in its own process (``GERE_CPU_MALLOC=keep`` or
``system``), in turns that alternate the order (ABBA) so drift on a shared machine hits both alike. Each
process trains the demo's first task under bf16 autocast as `gere demo` does (`bench_precision.DemoStep`):
a first turn of steps (the process warming up, as every run's first task does), then a second turn whose
steps are the steady figure; it reports both, the page faults and the peak resident memory.

Run from the repository root (the demo's assets must be built: ``make demo`` once, or any ``gere demo``)::

    .venv/bin/python benchmarks/bench_allocator.py                    # none and ce+tm-w1, ~4 min on 2 cores
    .venv/bin/python benchmarks/bench_allocator.py --methods ce --turns 1 --steps 6

It prints a table with the command and the machine, and writes it into ``benchmarks/RESULTS.md`` (section
``allocator``) unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ("none", "ce", "ce+tm-w1")


def child(method: str, steps: int) -> dict:
    """One process: the allocator as GERE_CPU_MALLOC says (as the `gere` command sets it), two turns of steps."""
    from gere.allocator import for_cpu_training

    kept = for_cpu_training()
    sys.path.insert(0, str(HERE))
    from bench_precision import DemoStep

    from gere.demo.assets import DemoSizes, build_demo_assets
    from gere.demo.run import METHODS as DEMO_METHODS
    from gere.demo.run import SIZES, demo_config

    assets = build_demo_assets(None, sizes=DemoSizes(**SIZES["default"]["assets"]))
    work = Path(tempfile.mkdtemp(prefix="bench_allocator_"))
    step = DemoStep([f"{k}={v}" for k, v in DEMO_METHODS[method].items()], demo_config(assets, "default", work), work)
    turns = []
    for turn in range(2):
        start, faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = step.train(step.model, step.cfg.gere, f"{method}-{turn}", steps, True)
        turns.append({"times": times, "wall": time.perf_counter() - start,
                      "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults})  # fmt: skip
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kept": kept, "turns": turns, "peak_mb": peak_mb}


def run_child(method: str, steps: int, mode: str) -> dict:
    env = {**os.environ, "GERE_CPU_MALLOC": mode, "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, __file__, "--child", method, "--steps", str(steps)], env=env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["none", "ce+tm-w1"], choices=METHODS)
    p.add_argument("--turns", type=int, default=2, help="ABBA turns: processes per setting and method")
    p.add_argument("--steps", type=int, default=8, help="steps in each of a process's two turns")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return 0
    sys.path.insert(0, str(HERE))
    from bench_common import command_line, made_by, write_results

    command = command_line(__file__, argv)
    rows = []
    for method in args.methods:
        got: dict[str, list[dict]] = {"system": [], "keep": []}
        for turn in range(args.turns):
            for mode in ("system", "keep") if turn % 2 == 0 else ("keep", "system"):
                got[mode].append(run_child(method, args.steps, mode))
                last = got[mode][-1]
                print(f"{method} {mode}: first turn {last['turns'][0]['wall']:.1f} s, steps "
                      f"{[round(t, 2) for t in last['turns'][1]['times']]}", flush=True)  # fmt: skip

        def figures(mode, got=got):
            runs = got[mode]
            steady = statistics.median(t for r in runs for t in r["turns"][1]["times"][1:])
            first = statistics.median(r["turns"][0]["wall"] for r in runs)
            faults = statistics.median(r["turns"][1]["faults"] / args.steps for r in runs)
            return steady, first, faults, max(r["peak_mb"] for r in runs), all(r["kept"] for r in runs)

        (s_sys, f_sys, pf_sys, mb_sys, _), (s_keep, f_keep, pf_keep, mb_keep, kept) = figures("system"), figures("keep")
        if not kept:
            print("note: the C library is not glibc here, so 'keep' changed nothing", flush=True)
        rows.append(f"| {method} | {s_sys:.2f} | {s_keep:.2f} | {s_sys / s_keep:.2f}x | {f_sys:.1f} | {f_keep:.1f} | "
                    f"{pf_sys:,.0f} | {pf_keep:,.0f} | {mb_sys:,.0f} | {mb_keep:,.0f} |")  # fmt: skip
    section = "\n".join([
        "### Training step: freed host memory kept for reuse against glibc's default (the demo's model, bf16)",
        "",
        made_by(command),
        f"Each figure from {args.turns} processes per setting; steady = median step of a process's second turn of "
        f"{args.steps} (its first step dropped); first turn = the {args.steps} steps a process trains first.",
        "",
        "| method | default s / step | kept s / step | default / kept | default first turn s | kept first turn s "
        "| default page faults / step | kept page faults / step | default peak MB | kept peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])  # fmt: skip
    print(section)
    if not args.no_write:
        write_results(Path(args.results), "allocator", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
