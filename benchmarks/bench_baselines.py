"""Costs of the continual-learning baselines (`gere.baselines`): time per training step and memory.

EWC: (1) the Fisher estimate, seconds per example (one forward and backward pass each); (2) the
training-step time with the EWC penalty relative to the same step without it (GeReTrainer.training_step
plus a fused AdamW step, no replay, the same batches, interleaved ABBA); (3) the memory EWC holds, counted
from its tensors (Fisher and anchor), per trainable parameter.

LwF: (1) the previous stage's top-k logits, seconds per training row (one no-grad forward pass over the
task's rows, once per task); (2) the step time with the distillation relative to the same step without it;
(3) the memory its targets hold, bytes per training token.

Task replay, ``batch`` mixing: the step time with a separate batch of buffered rows relative to the step
alone (the other mixings put buffered rows in place of task rows, at no cost per step).

O-LoRA: the step time of the third task (two frozen adapters in the forward pass, the orthogonality and L2
penalties) relative to plain LoRA (one adapter, no penalty), same rank and modules; the adapter parameters
each task adds.

Run from the repository root::

    .venv/bin/python benchmarks/bench_baselines.py --model smollm   # SmolLM2-135M from its wheel, ~6 min
    .venv/bin/python benchmarks/bench_baselines.py --model tiny     # a small Llama built in code, ~1 min
    .venv/bin/python benchmarks/bench_baselines.py --model smollm --baselines lwf olora   # some of them

It prints one table per baseline with the command, machine and versions, and writes each into a section of
``benchmarks/RESULTS.md`` keyed by baseline and model (other sections are kept).
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
from gere.baselines.lwf import INDEX, LwF  # noqa: E402
from gere.baselines.olora import OLoRA, adapter_name  # noqa: E402
from gere.baselines.task_replay import SeparateBufferBatches  # noqa: E402
from gere.batching import IGNORE_INDEX, pad_token_id  # noqa: E402
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


def paired_steps(models, batches: list[dict], trainers: dict, args) -> tuple[dict[str, float], float]:
    """Median step time of each trainer on the same batches, interleaved ABBA, and the median ratio of the
    second's time to the first's (each trainer's step plus a fused AdamW step on what trains). ``models``: the
    model every trainer steps, or a dict of one per trainer (trainers on one model share its optimizer)."""
    models = models if isinstance(models, dict) else dict.fromkeys(trainers, models)
    optimizers = {id(m): torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5, fused=True)
                  for m in models.values()}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for step in range(args.warmup + args.steps):
        for name in list(trainers) if step % 2 == 0 else list(trainers)[::-1]:
            start = clock()
            trainers[name].training_step(models[name], dict(batches[step % len(batches)]))
            optimizer = optimizers[id(models[name])]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= args.warmup:
                times[name].append(since(start)[0])
    first, second = list(trainers)
    ratio = median([b / a for a, b in zip(times[first], times[second], strict=True)])
    return {k: median(v) for k, v in times.items()}, ratio


def lwf_figures(model, tokenizer, texts: list[str], args, work: Path) -> dict:
    sizes = sizes_for(args.model, quick=False)
    batches = task_batches(tokenizer, texts, sizes)
    rows, indexed = [], []
    for b in batches:
        first = len(rows)
        rows += [{"input_ids": ids[: int(m.sum())].tolist()} for ids, m in zip(b["input_ids"], b["attention_mask"], strict=True)]
        indexed.append({**b, INDEX: torch.arange(first, len(rows))})
    lwf = LwF(weight=1.0, temperature=2.0, topk=args.lwf_topk, batch_size=sizes.task_batch)
    lwf.prepare(model, rows[:1], pad_token_id(tokenizer))  # warm-up
    start = time.perf_counter()
    lwf.prepare(model, rows, pad_token_id(tokenizer))
    prepare_s = (time.perf_counter() - start) / len(rows)
    tokens = sum(len(r["input_ids"]) for r in rows)
    held = sum(v.numel() * v.element_size() + i.numel() * i.element_size() for v, i in lwf._targets)
    trainers = {"none": plain_trainer(model, tokenizer, sizes.task_batch, work),
                "lwf": plain_trainer(model, tokenizer, sizes.task_batch, work, [lwf])}  # fmt: skip
    step_s, ratio = paired_steps(model, indexed, trainers, args)
    return {"prepare_s_per_row": prepare_s, "rows": len(rows), "bytes_per_token": held / tokens, "topk": lwf.topk,
            "step_s": step_s, "ratio": ratio, "steps": args.steps, "batch": (sizes.task_batch, sizes.task_length)}  # fmt: skip


def task_replay_figures(model, tokenizer, texts: list[str], args, work: Path) -> dict:
    """Task replay's ``batch`` mixing: the step with a separate batch of buffered rows against the step alone.
    (``concat`` and ``interpolate`` put buffered rows in place of task rows: no cost per step.)"""
    from transformers import DataCollatorForSeq2Seq

    sizes = sizes_for(args.model, quick=False)
    batches = task_batches(tokenizer, texts, sizes)
    rows = [{"input_ids": ids[: int(m.sum())].tolist(), "labels": ids[: int(m.sum())].tolist()}
            for b in batches for ids, m in zip(b["input_ids"], b["attention_mask"], strict=True)]  # fmt: skip
    buffer = SeparateBufferBatches(rows, sizes.task_batch, DataCollatorForSeq2Seq(tokenizer, padding=True), seed=0)
    trainers = {"none": plain_trainer(model, tokenizer, sizes.task_batch, work),
                "batch": plain_trainer(model, tokenizer, sizes.task_batch, work, [buffer])}  # fmt: skip
    step_s, ratio = paired_steps(model, batches, trainers, args)
    return {"step_s": step_s, "ratio": ratio, "steps": args.steps, "batch": (sizes.task_batch, sizes.task_length)}


def task_replay_rows(r: dict) -> list[str]:
    return [
        *step_rows(r, "batch", f"a separate buffered batch of {r['batch'][0]}"),
        "| memory: the buffer's (task, example) positions | a few bytes per buffered example |",
    ]


def olora_figures(model, tokenizer, texts: list[str], args, work: Path) -> dict:
    """Plain LoRA (one adapter) against O-LoRA's third task (two frozen adapters and the new one)."""
    import copy

    from peft import LoraConfig, get_peft_model

    sizes = sizes_for(args.model, quick=False)
    batches = task_batches(tokenizer, texts, sizes)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    plain = get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    olora_model = get_peft_model(model, copy.deepcopy(config), adapter_name=adapter_name(0))
    olora = OLoRA(orthogonal=0.5, l2=0.0, lora_config=copy.deepcopy(config))
    olora.begin_task(olora_model, 2)
    per_task = sum(p.numel() for p in olora_model.parameters() if p.requires_grad)
    # Two separate models, alternated step by step (ABBA) for the paired ratio.
    trainers = {"lora": plain_trainer(plain, tokenizer, sizes.task_batch, work / "p"),
                "olora": plain_trainer(olora_model, tokenizer, sizes.task_batch, work / "o", [olora])}  # fmt: skip
    step_s, ratio = paired_steps({"lora": plain, "olora": olora_model}, batches, trainers, args)
    return {"step_s": step_s, "ratio": ratio, "per_task": per_task, "rank": 8,
            "steps": args.steps, "batch": (sizes.task_batch, sizes.task_length)}  # fmt: skip


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
    step_s, ratio = paired_steps(model, batches, trainers, args)
    return {
        "fisher_s_per_example": fisher_s, "fisher_examples": len(rows), "trainable": trainable,
        "held_bytes": held, "bytes_per_param": held / trainable, "step_s": step_s,
        "ratio": ratio, "steps": args.steps, "batch": (sizes.task_batch, sizes.task_length),
    }  # fmt: skip


def step_rows(r: dict, key: str, title: str) -> list[str]:
    """The step times without and with a baseline's loss part (``r['step_s']['none']`` / ``[key]``), and their ratio."""
    return [
        f"| training step without {title}, median s ({r['steps']} steps) | {r['step_s']['none']:.3f} |",
        f"| training step with {title}, median s | {r['step_s'][key]:.3f} |",
        f"| step time with / without {title} (median of paired ratios) | {r['ratio']:.3f} |",
    ]


def ewc_rows(r: dict) -> list[str]:
    return [
        f"| Fisher estimate, s per example (median over {r['fisher_examples']}) | {r['fisher_s_per_example']:.3f} |",
        *step_rows(r, "ewc", "EWC"),
        f"| trainable parameters | {r['trainable']:,} |",
        f"| EWC memory (Fisher + anchor), MiB | {r['held_bytes'] / 2**20:.1f} |",
        f"| EWC memory per trainable parameter, bytes | {r['bytes_per_param']:.1f} |",
    ]  # fmt: skip


def lwf_rows(r: dict) -> list[str]:
    return [
        f"| previous stage's top-{r['topk']} logits, s per training row (over {r['rows']} rows) | {r['prepare_s_per_row']:.3f} |",
        *step_rows(r, "lwf", "LwF"),
        f"| LwF memory, bytes per training token | {r['bytes_per_token']:.1f} |",
    ]  # fmt: skip


def olora_rows(r: dict) -> list[str]:
    return [
        f"| LoRA step (one adapter, r = {r['rank']}, q/k/v/o), median s ({r['steps']} steps) | {r['step_s']['lora']:.3f} |",
        f"| O-LoRA step, third task (two frozen adapters, penalties), median s | {r['step_s']['olora']:.3f} |",
        f"| step time O-LoRA / LoRA (median of paired ratios) | {r['ratio']:.3f} |",
        f"| adapter parameters added per task | {r['per_task']:,} |",
    ]  # fmt: skip


BASELINES = {"ewc": ("EWC", ewc_figures, ewc_rows, "baselines"), "lwf": ("LwF", lwf_figures, lwf_rows, "baselines-lwf"),
             "task-replay": ("task replay (batch mixing)", task_replay_figures, task_replay_rows,
                             "baselines-task-replay"),
             "olora": ("O-LoRA", olora_figures, olora_rows, "baselines-olora")}  # fmt: skip


def render(title: str, rows: list[str], args, env: dict, prov: dict, model_desc: str, text_desc: str, r: dict,
           command: str, pressure: list[str]) -> str:  # fmt: skip
    lines = [
        f"## Baselines: {title} costs ({args.model})", "",
        f"Model: {model_desc}. Task batches: {r['batch'][0]} x {r['batch'][1]} tokens of {text_desc}.", "",
        "| figure | value |", "|---|---|",
        *rows,
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
    p.add_argument("--baselines", nargs="+", choices=list(BASELINES), default=list(BASELINES))
    p.add_argument("--fisher-samples", type=int, default=16)
    p.add_argument("--lwf-topk", type=int, default=64)
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
    python = os.path.relpath(sys.executable) if not os.path.relpath(sys.executable).startswith("..") else "python"
    command = shlex.join([python, os.path.relpath(__file__), *(argv or sys.argv[1:])])
    # O-LoRA turns the model into a peft model: it runs last.
    for name in sorted(args.baselines, key=lambda b: b == "olora"):
        title, figures, rows, key = BASELINES[name]
        pressure = [cpu_pressure()]
        with tempfile.TemporaryDirectory(prefix="gere-bench-") as tmp:
            results = figures(model, tokenizer, task_pool, args, Path(tmp))
        pressure.append(cpu_pressure())
        section = render(title, rows(results), args, environment(), provenance(), model_desc, text_desc, results,
                         command, pressure)  # fmt: skip
        print(section, flush=True)
        if not args.no_write:
            write_results(Path(args.results), f"{key}-{args.model}", section)
            print(f"wrote section '{key}-{args.model}' of {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
