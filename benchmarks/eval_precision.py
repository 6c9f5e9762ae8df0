"""How much an evaluation under bf16 autocast moves the demo's scores against the same evaluation in fp32.

The runner evaluates in fp32. Until the fix that gives the model back unprepared after each task, a run
trained under bf16 evaluated every stage after the first task under the Trainer's autocast wrapper, while
its base evaluation ran in fp32; this measures what that changed, on the demo's base model and, when given,
on a stage checkpoint of a finished run::

    .venv/bin/python benchmarks/eval_precision.py [--checkpoint runs/map/r1/none/seed-0/checkpoints/stage-3]

Prints each score in fp32 and under autocast, and the command.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from gere.continual.evaluator import Evaluator
from gere.continual.run_config import load_run_config
from gere.continual.tasks import load_task
from gere.demo.assets import DemoSizes, build_demo_assets
from gere.demo.run import SIZES, demo_config
from gere.modeling import load_model_and_tokenizer


def _flat(result: dict, names: list[str]) -> dict[str, float]:
    out = {f"acc {name}": 100 * a for name, a in zip(names, result["accuracies"], strict=True)}
    out["probe"] = 100 * result["general"]["mc_accuracy"]
    out.update({f"ppl {name}": p for name, p in result["general"]["perplexity"].items()})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="a stage checkpoint folder (weights.safetensors) to load")
    args = p.parse_args(argv)
    assets = build_demo_assets(sizes=DemoSizes(**SIZES["default"]["assets"]), seed=0)
    with tempfile.TemporaryDirectory() as work:
        cfg = load_run_config(None, [], base=demo_config(assets, "default", Path(work)))
        tasks = [load_task(spec) for spec in cfg.task_specs()]
        evaluator = Evaluator(cfg, tasks)
        model, tokenizer = load_model_and_tokenizer(cfg.model)
        if args.checkpoint:
            from safetensors.torch import load_file

            missing, unexpected = model.load_state_dict(load_file(args.checkpoint / "weights.safetensors"), strict=False)
            if unexpected or [k for k in missing if "lm_head" not in k]:
                raise SystemExit(f"the checkpoint does not fit the demo's model: {missing[:3]} {unexpected[:3]}")
        names = [t.spec.name for t in tasks]
        fp32 = _flat(evaluator(model, tokenizer, "fp32", False), names)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = _flat(evaluator(model, tokenizer, "bf16", False), names)
    print(f"model: {'base' if not args.checkpoint else args.checkpoint}")
    print("| score | fp32 | bf16 autocast | difference |\n|---|---|---|---|")
    for key in fp32:
        print(f"| {key} | {fp32[key]:.2f} | {bf16[key]:.2f} | {bf16[key] - fp32[key]:+.2f} |")
    print(f"\nCommand: `python {' '.join(shlex.quote(a) for a in sys.argv)}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
