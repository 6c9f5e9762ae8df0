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
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import DataCollatorForSeq2Seq, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import command_line, made_by  # noqa: E402
from bench_engine import HERE, median, write_results  # noqa: E402

from gere.batching import IGNORE_INDEX  # noqa: E402
from gere.continual.prompts import build_train_features  # noqa: E402
from gere.continual.run_config import load_run_config  # noqa: E402
from gere.continual.tasks import load_task  # noqa: E402
from gere.continual.training_args import stage_training_args  # noqa: E402
from gere.demo.assets import DemoSizes, build_demo_assets  # noqa: E402
from gere.demo.run import METHODS, SIZES, demo_config  # noqa: E402
from gere.modeling import load_model_and_tokenizer  # noqa: E402
from gere.precision import native_bf16  # noqa: E402
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


class DemoStep:
    """One method's training step on the demo's first task, ready to time: config, model, store, features."""

    def __init__(self, overrides: list[str], base, work: Path):
        self.cfg = load_run_config(None, overrides, base=copy.deepcopy(base))
        self.model, self.tokenizer = load_model_and_tokenizer(self.cfg.model)
        self.tokenizer.padding_side = "right"
        self.work = work
        self.store = None
        if self.cfg.gere.needs_reference:
            self.store = extract_store(self.model, self.tokenizer, self.cfg.gere.load_replay_set(), work / "store",
                                       StoreSpec.for_config(self.cfg.gere), progress=False)  # fmt: skip
        self.task = load_task(self.cfg.task_specs()[0])
        self.features = build_train_features(self.task.spec, self.task.train, self.tokenizer,
                                             self.cfg.training.max_length)  # fmt: skip
        self.collator = DataCollatorForSeq2Seq(self.tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)

    def train(self, model, gere_config, name: str, steps: int, bf16: bool) -> list[float]:
        """``steps`` optimisation steps of ``model`` under ``gere_config``; each step's seconds."""
        self.cfg.training.max_steps = steps
        clock = StepClock()
        trainer = GeReTrainer(
            model=model, args=stage_training_args(self.cfg, self.task.spec.name, self.work / name, False, bf16),
            train_dataset=self.features, data_collator=self.collator, processing_class=self.tokenizer,
            gere_config=gere_config, activation_store=self.store, check_store_model=False, callbacks=[clock],
        )  # fmt: skip
        trainer.train()
        return clock.times


def take_turns(names: list[str], turns: int, run) -> dict[str, list[float]]:
    """``run(name)`` for every name, in turns that alternate the order (ABBA), so drift on a shared machine
    hits each alike; the first step of every turn is dropped."""
    times: dict[str, list[float]] = {name: [] for name in names}
    for turn in range(turns):
        for name in names if turn % 2 == 0 else names[::-1]:
            step_times = run(name)
            times[name] += step_times[1:]
            print(f"{name} turn {turn}: {[round(t, 2) for t in step_times]}", flush=True)
    return times


def precision_turns(step: DemoStep, method: str, turns: int, steps: int) -> dict[str, list[float]]:
    """Step times of ``method`` in fp32 and under bf16 autocast, each precision training its own copy of the
    model (the Trainer wraps a model's forward in autocast for bf16)."""
    copies = {"fp32": step.model, "bf16": copy.deepcopy(step.model)}
    return take_turns(["fp32", "bf16"], 2 * turns,
                      lambda name: step.train(copies[name], step.cfg.gere, f"{method}-{name}", steps, name == "bf16"))  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["none", "ce+tm"], choices=["none", "ce", "ce+tm"])
    p.add_argument("--turns", type=int, default=2, help="ABBA turns per precision")
    p.add_argument("--steps", type=int, default=4, help="steps per turn (the first is dropped)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    command = command_line(__file__, argv)

    assets = build_demo_assets(args.cache_dir, sizes=DemoSizes(**SIZES["default"]["assets"]))
    work = Path(tempfile.mkdtemp(prefix="bench_precision_"))
    base = demo_config(assets, "default", work)
    rows = []
    native, why = native_bf16("cpu" if not torch.cuda.is_available() else "cuda")
    for method in args.methods:
        times = precision_turns(DemoStep([f"{k}={v}" for k, v in METHODS[method].items()], base, work), method,
                                args.turns, args.steps)  # fmt: skip
        fp32, bf16 = median(times["fp32"]), median(times["bf16"])
        rows.append(f"| {method} | {fp32:.2f} | {bf16:.2f} | {fp32 / bf16:.2f}x | {len(times['fp32'])} |")
    section = "\n".join([
        "### Training step: fp32 against bf16 autocast (the demo's model and settings)",
        "",
        made_by(command),
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
