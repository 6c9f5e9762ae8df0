"""What the gradient-share diagnostic and the gradient-balanced margin weight cost per training step.

`ce+tm` on the demo's model, data and settings (`bench_precision.DemoStep`), in the precision
`training.bf16: auto` picks on this machine, three ways, each training its own copy of the model and taking
turns (ABBA) so drift on a shared machine hits each alike:

- ``dy``: the paper's dynamic weight, no diagnostic (the demo's `ce+tm`);
- ``dy, grad share every step``: the same with `gere.grad_share_every: 1`, so every step is a measured one
  (a measured step costs this row minus the first);
- ``gb:1``: the gradient-balanced weight (`gere.balance`), which computes each part's gradient on every step.

Run from the repository root, the demo's assets built (``make demo`` once, or any ``gere demo``)::

    .venv/bin/python benchmarks/bench_weights.py              # ~5 min on a 2-core CPU
    .venv/bin/python benchmarks/bench_weights.py --turns 1 --steps 3 --no-write

It prints a table with the command and the machine and writes it into ``benchmarks/RESULTS.md`` (section
``weights``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import command_line, made_by  # noqa: E402
from bench_engine import HERE, median, write_results  # noqa: E402
from bench_precision import DemoStep, take_turns  # noqa: E402

from gere.demo.assets import DemoSizes, build_demo_assets  # noqa: E402
from gere.demo.run import METHODS, SIZES, demo_config  # noqa: E402
from gere.precision import resolve_bf16  # noqa: E402

#: Each variant's changes to the demo's `ce+tm` settings.
VARIANTS = {
    "dy": {},
    "dy, grad share every step": {"grad_share_every": 1},
    "gb:1": {"margin_weight": "gb:1"},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--turns", type=int, default=2, help="ABBA turns")
    p.add_argument("--steps", type=int, default=4, help="steps per turn (the first is dropped)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    command = command_line(__file__, argv)

    assets = build_demo_assets(args.cache_dir, sizes=DemoSizes(**SIZES["default"]["assets"]))
    work = Path(tempfile.mkdtemp(prefix="bench_weights_"))
    step = DemoStep([f"{k}={v}" for k, v in METHODS["ce+tm"].items()], demo_config(assets, "default", work), work)
    precision = resolve_bf16("auto", "cuda" if torch.cuda.is_available() else "cpu")
    models = {name: step.model if i == 0 else copy.deepcopy(step.model) for i, name in enumerate(VARIANTS)}
    configs = {name: dataclasses.replace(step.cfg.gere, **changes) for name, changes in VARIANTS.items()}

    def run(name: str) -> list[float]:
        return step.train(models[name], configs[name], name.replace(" ", "_"), args.steps, precision.bf16)

    times = take_turns(list(VARIANTS), 2 * args.turns, run)
    first = median(times["dy"])
    rows = [f"| {name} | {median(t):.2f} | {median(t) / first:.2f}x | {len(t)} |" for name, t in times.items()]
    section = "\n".join([
        "### Training step of ce+tm: the gradient-share diagnostic and the gradient-balanced weight",
        "",
        made_by(command, f" Precision: {precision.describe()}."),
        "",
        "| ce+tm weight | s / step | against dy | steps |",
        "|---|---|---|---|",
        *rows,
        "",
    ])  # fmt: skip
    print(section)
    if not args.no_write:
        write_results(Path(args.results), "weights", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
