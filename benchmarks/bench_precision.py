"""Training-step time in fp32 and under bf16 autocast, on the demo's model, data and settings.

The step is what `gere demo` runs: `GeReTrainer` with the TrainingArguments the runner builds
(`gere.continual.training_args.stage_training_args`, so ``bf16`` / ``use_cpu`` exactly as a run sets them), the demo's
first task (batch 8, up to 96 tokens), fused AdamW, and for ``ce+tm`` a separate replay batch of 4 x 48
tokens with the activation store of the base model. Each precision trains its own copy of the model (the
Trainer wraps a model's forward in autocast for bf16), and the copies take turns, ABBA, a few steps each,
so drift on a shared machine hits both alike. Step times come from a callback (optimizer step included);
the first step of each turn is dropped.

Run from the repository root (the demo's assets must be built: ``make demo`` once, or any ``gere demo``)::

    .venv/bin/python benchmarks/bench_precision.py            # none and ce+tm, ~5 min on a 2-core CPU
    .venv/bin/python benchmarks/bench_precision.py --methods none --turns 2 --steps 3

It prints a table with the command, the machine and whether its CPU computes bf16 natively
(`gere.precision.native_bf16`), and writes it into ``benchmarks/RESULTS.md`` (section ``precision``).
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import DataCollatorForSeq2Seq, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import HERE, cpu_pressure, environment, median, write_results  # noqa: E402

from gere.batching import IGNORE_INDEX  # noqa: E402
from gere.continual.prompts import build_train_features  # noqa: E402
from gere.continual.run_config import load_run_config  # noqa: E402
from gere.continual.tasks import load_task  # noqa: E402
from gere.continual.training_args import stage_training_args  # noqa: E402
from gere.demo.assets import DemoSizes, build_demo_assets  # noqa: E402
from gere.demo.run import METHODS, SIZES, demo_config  # noqa: E402
from gere.modeling import load_model_and_tokenizer  # noqa: E402
from gere.precision import native_bf16  # noqa: E402
from gere.provenance import provenance  # noqa: E402
from gere.store.extract import extract_store  # noqa: E402
from gere.store.format import StoreSpec  # noqa: E402
from gere.trainer import GeReTrainer  # noqa: E402


class StepClock(TrainerCallback):
    """Wall time of every optimisation step (from step begin to step end, optimizer included)."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["none", "ce+tm"], choices=["none", "ce", "ce+tm"])
    p.add_argument("--turns", type=int, default=2, help="ABBA turns per precision")
    p.add_argument("--steps", type=int, default=4, help="steps per turn (the first is dropped)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    command = "python benchmarks/bench_precision.py " + shlex.join(argv if argv is not None else sys.argv[1:])

    assets = build_demo_assets(args.cache_dir, sizes=DemoSizes(**SIZES["default"]["assets"]))
    work = Path(tempfile.mkdtemp(prefix="bench_precision_"))
    base = demo_config(assets, "default", work)
    rows, env = [], environment()
    native, why = native_bf16("cpu" if not torch.cuda.is_available() else "cuda")
    for method in args.methods:
        overrides = [f"{k}={v}" for k, v in METHODS[method].items()]
        cfg = load_run_config(None, overrides, base=copy.deepcopy(base))
        model, tokenizer = load_model_and_tokenizer(cfg.model)
        tokenizer.padding_side = "right"
        store = None
        if cfg.gere.needs_reference:
            store = extract_store(model, tokenizer, cfg.gere.load_replay_set(), work / "store", StoreSpec.for_config(cfg.gere),
                                  progress=False)  # fmt: skip
        task = load_task(cfg.task_specs()[0])
        features = build_train_features(task.spec, task.train, tokenizer, cfg.training.max_length)
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
        copies = {"fp32": model, "bf16": copy.deepcopy(model)}
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        order = ["fp32", "bf16"]
        for turn in range(2 * args.turns):
            for name in order if turn % 2 == 0 else order[::-1]:
                cfg.training.max_steps = args.steps
                clock = StepClock()
                trainer = GeReTrainer(
                    model=copies[name],
                    args=stage_training_args(cfg, task.spec.name, work / f"{method}-{name}", False, name == "bf16"),
                    train_dataset=features, data_collator=collator, processing_class=tokenizer,
                    gere_config=cfg.gere, activation_store=store, check_store_model=False, callbacks=[clock],
                )  # fmt: skip
                trainer.train()
                times[name] += clock.times[1:]
                print(f"{method} {name} turn {turn}: {[round(t, 2) for t in clock.times]}", flush=True)
        fp32, bf16 = median(times["fp32"]), median(times["bf16"])
        rows.append(f"| {method} | {fp32:.2f} | {bf16:.2f} | {fp32 / bf16:.2f}x | {len(times['fp32'])} |")
        del copies, model
    prov = provenance()
    section = "\n".join([
        "### Training step: fp32 against bf16 autocast (the demo's model and settings)",
        "",
        f"Command: `{command}`; commit {prov['commit']}{' (uncommitted changes)' if prov['dirty'] else ''}.",
        f"Machine: {env['machine']}; torch {env['torch']}, transformers {env['transformers']}; {env['date']}; "
        f"CPU pressure avg60 at the end {cpu_pressure()}.",
        f"Native bf16 here: {'yes' if native else 'no'} ({why}); `training.bf16: auto` picks "
        f"{'bf16' if native else 'fp32'} on this machine.",
        "",
        "| method | fp32 s / step | bf16 s / step | fp32 / bf16 (above 1: bf16 faster) | steps each |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])  # fmt: skip
    print(section)
    if not args.no_write:
        write_results(Path(args.results), "precision", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
