"""Costs of the continual-learning baselines (`gere.baselines`): time per training step and memory.

EWC: (1) the Fisher estimate, seconds per example (one forward and backward pass each); (2) the
training-step time with the EWC penalty relative to the same step without it (GeReTrainer.training_step
plus a fused AdamW step, no replay, the same batches, interleaved ABBA); (3) the memory EWC holds, counted
from its tensors (Fisher and anchor), per trainable parameter.

Run from the repository root::

    .venv/bin/python benchmarks/bench_baselines.py --model smollm   # SmolLM2-135M from its wheel, ~3 min
    .venv/bin/python benchmarks/bench_baselines.py --model tiny     # a small Llama built in code, ~1 min

It prints its table with the command, machine and versions, and writes it into a section of
``benchmarks/RESULTS.md`` keyed by model (other sections are kept).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import (  # noqa: E402  (the engine benchmark's inputs, model loading and output)
    GENSIM_WHEELS,
    HERE,
    SMOLLM_WHEEL,
    clock,
    cpu_pressure,
    environment,
    general_texts,
    load_model,
    median,
    since,
    sizes_for,
    task_batches,
    write_results,
)

from gere.baselines.ewc import EWC, diagonal_fisher, trainable_parameters  # noqa: E402
from gere.batching import IGNORE_INDEX  # noqa: E402
from gere.provenance import provenance  # noqa: E402


def plain_trainer(model, tokenizer, batch: int, work: Path, penalties=()):
    from transformers import TrainingArguments

    from gere.config import GeReConfig
    from gere.trainer import GeReTrainer

    args = TrainingArguments(
        output_dir=str(work / f"trainer-{len(penalties)}"), per_device_train_batch_size=batch, max_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = GeReTrainer(model=model, args=args, train_dataset=[{"input_ids": [0]}], processing_class=tokenizer,
                          gere_config=GeReConfig(objective="none"), penalties=list(penalties))  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def ewc_figures(model, tokenizer, texts: list[str], args, work: Path) -> dict:
    sizes = sizes_for(args.model, quick=False)
    batches = task_batches(tokenizer, texts, sizes)
    rows = []
    for b in batches:
        for ids, labels in zip(b["input_ids"].tolist(), b["labels"].tolist(), strict=True):
            rows.append({"input_ids": [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX],
                         "labels": [lab for lab in labels if lab != IGNORE_INDEX]})  # fmt: skip
    rows = rows[: args.fisher_samples]
    diagonal_fisher(model, rows[:1])  # warm-up: the first backward pass allocates
    per_example = []
    for row in rows:
        start = time.perf_counter()
        diagonal_fisher(model, [row])
        per_example.append(time.perf_counter() - start)
    fisher_s = median(per_example)
    ewc = EWC(strength=1000.0)
    ewc.consolidate(model, rows)
    trainable = sum(p.numel() for p in trainable_parameters(model).values())
    held = sum(t.numel() * t.element_size() for d in (ewc.fisher, ewc.anchor) for t in d.values())
    trainers = {"none": plain_trainer(model, tokenizer, sizes.task_batch, work),
                "ewc": plain_trainer(model, tokenizer, sizes.task_batch, work, [ewc])}  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for step in range(args.warmup + args.steps):
        for name in list(trainers) if step % 2 == 0 else list(trainers)[::-1]:
            start = clock()
            trainers[name].training_step(model, dict(batches[step % len(batches)]))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= args.warmup:
                times[name].append(since(start)[0])
    pairs = [b / a for a, b in zip(times["none"], times["ewc"], strict=True)]
    return {
        "fisher_s_per_example": fisher_s, "fisher_examples": len(rows), "trainable": trainable,
        "held_bytes": held, "bytes_per_param": held / trainable, "step_s": {k: median(v) for k, v in times.items()},
        "ratio": median(pairs), "steps": args.steps, "batch": (sizes.task_batch, sizes.task_length),
    }  # fmt: skip


def render(args, env: dict, prov: dict, model_desc: str, text_desc: str, r: dict, command: str, pressure: list[str]) -> str:
    lines = [
        f"## Baselines: EWC costs ({args.model})", "",
        f"Model: {model_desc}. Task batches: {r['batch'][0]} x {r['batch'][1]} tokens of {text_desc}.", "",
        "| figure | value |", "|---|---|",
        f"| Fisher estimate, s per example (median over {r['fisher_examples']}) | {r['fisher_s_per_example']:.3f} |",
        f"| training step without EWC, median s ({r['steps']} steps) | {r['step_s']['none']:.3f} |",
        f"| training step with EWC, median s | {r['step_s']['ewc']:.3f} |",
        f"| step time with / without EWC (median of paired ratios) | {r['ratio']:.3f} |",
        f"| trainable parameters | {r['trainable']:,} |",
        f"| EWC memory (Fisher + anchor), MiB | {r['held_bytes'] / 2**20:.1f} |",
        f"| EWC memory per trainable parameter, bytes | {r['bytes_per_param']:.1f} |",
        "",
        f"Command: `{command}`. CPU load before / after: {' / '.join(pressure)}.", "",
        f"Machine: {env['machine']}; torch {env['torch']}, transformers {env['transformers']}; "
        f"commit {prov['commit']}{' (with uncommitted changes)' if prov['dirty'] else ''}; {env['date']}.", "",
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "smollm"), default="tiny")
    p.add_argument("--smollm-wheel", default=os.environ.get("GERE_SMOLLM_WHEEL", SMOLLM_WHEEL))
    p.add_argument("--gensim-wheel", default=os.environ.get("GERE_GENSIM_WHEEL", GENSIM_WHEELS))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--fisher-samples", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    replay_pool, task_pool, text_desc = general_texts(args.gensim_wheel)
    model, tokenizer, model_desc = load_model(args, replay_pool + task_pool)
    pressure = [cpu_pressure()]
    with tempfile.TemporaryDirectory(prefix="gere-bench-") as tmp:
        results = ewc_figures(model, tokenizer, task_pool, args, Path(tmp))
    pressure.append(cpu_pressure())
    python = os.path.relpath(sys.executable) if not os.path.relpath(sys.executable).startswith("..") else "python"
    command = shlex.join([python, os.path.relpath(__file__), *(argv or sys.argv[1:])])
    section = render(args, environment(), provenance(), model_desc, text_desc, results, command, pressure)
    print(section)
    if not args.no_write:
        write_results(Path(args.results), f"baselines-{args.model}", section)
        print(f"wrote section 'baselines-{args.model}' of {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
