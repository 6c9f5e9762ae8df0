"""Task batches on long, uneven prompts: padded share, real tokens per second and step time, before and after.

Reads O-LoRA's CL_Benchmark training files (``<data>/<group>/<Dataset>/train.json``, JSON lists of
``{"sentence", "label"}``, with ``labels.json`` beside them) and builds gere's training rows from them as a
continual run does (`gere.continual.prompts.build_train_features`, the cl15 benchmark's instructions, the options
from ``labels.json``, ``max_length`` 512 and per-device batch 8 as ``configs/cl15_order4.yaml``). Then:

1. the padded share of the batches: padding / all positions of right-padded batches of 8, over one epoch of
   the first ``--rows`` rows of every task found, in the Trainer's random order against
   `gere.task_batches.LengthGroupedSampler` (``training.group_by_length``);
2. training steps of the real model (`GeReTrainer`, objective ``none``, bf16 autocast where the CPU computes
   bf16 natively, fused AdamW, lr 1e-5) on ``--tasks``, three ways: ``before`` (random order, logits at every
   position), ``answer logits`` (the same batches, logits at the answer positions only: an exact change) and
   ``after`` (answer logits and length-grouped batches); each way trains ``--steps`` steps after one dropped
   warm-up step. Real (non-pad) tokens per second, against the matrix-product peak measured in the
   same run in the precision it trains in (2048 x 2048 products; a training token costs about 6 x parameters FLOP).

Run from the repository root (about 10 minutes on a 2-core CPU)::

    nice -n 10 .venv/bin/python benchmarks/bench_padding.py --data data/olora/CL_Benchmark --model <folder>

It prints its section and writes it into ``benchmarks/RESULTS.md`` (section ``padding``).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch.utils.data import RandomSampler
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import HERE, command_line, made_by, write_results  # noqa: E402
from bench_precision import StepClock  # noqa: E402

from gere.batching import IGNORE_INDEX  # noqa: E402
from gere.config import GeReConfig  # noqa: E402
from gere.continual.prompts import build_train_features  # noqa: E402
from gere.continual.tasks import Example, TaskSpec  # noqa: E402
from gere.precision import native_bf16  # noqa: E402
from gere.task_batches import LengthGroupedSampler, padded_share, row_lengths  # noqa: E402
from gere.trainer import GeReTrainer  # noqa: E402

#: O-LoRA's folder name -> the cl15 benchmark's task name (src/gere/benchmarks/cl15.yaml).
TASKS = {"SST-2": "sst2", "WiC": "wic", "QQP": "qqp", "COPA": "copa", "MNLI": "mnli", "agnews": "agnews",
         "RTE": "rte", "CB": "cb", "dbpedia": "dbpedia", "amazon": "amazon", "yelp": "yelp", "BoolQA": "boolq",
         "IMDB": "imdb", "MultiRC": "multirc", "yahoo": "yahoo"}  # fmt: skip
WAYS = {"before": (False, False), "answer logits": (True, False), "after": (True, True)}


def task_rows(data: Path, folder: str, tokenizer, rows: int, max_length: int) -> list[dict]:
    """gere's training rows of the first ``rows`` training examples of O-LoRA's task ``folder``."""
    found = sorted(data.glob(f"*/{folder}/train.json"))
    if not found:
        raise SystemExit(f"no {data}/<group>/{folder}/train.json; give --data the CL_Benchmark folder")
    path = found[0]
    labels = json.loads((path.parent / "labels.json").read_text())
    benchmark = yaml.safe_load(importlib.resources.files("gere.benchmarks").joinpath("cl15.yaml").read_text())
    spec = TaskSpec(name=TASKS[folder], instruction=benchmark["tasks"][TASKS[folder]]["instruction"],
                    labels=[str(word) for word in labels], source=str(path))  # fmt: skip
    items = [i for i in json.loads(path.read_text()) if str(i["label"]) in spec.labels][:rows]
    examples = [Example(input=i["sentence"], label=str(i["label"])) for i in items]
    return build_train_features(spec, examples, tokenizer, max_length)


def share_rows(data: Path, tokenizer, args) -> list[str]:
    """Padded share of one epoch, random order and length-grouped, for every task in ``data``."""
    lines = []
    for folder in TASKS:
        if not list(data.glob(f"*/{folder}/train.json")):
            continue
        lengths = row_lengths(task_rows(data, folder, tokenizer, args.rows, args.max_length))
        random_order = list(RandomSampler(lengths, generator=torch.Generator().manual_seed(0)))
        grouped = list(LengthGroupedSampler(lengths, args.batch, seed=0))
        before, after = padded_share(lengths, random_order, args.batch), padded_share(lengths, grouped, args.batch)
        lines.append(f"| {folder} | {len(lengths)} | {statistics.median(lengths):.0f} | {max(lengths)} | "
                     f"{100 * before:.1f}% | {100 * after:.1f}% |")  # fmt: skip
        print(lines[-1], flush=True)
    return lines


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 20) -> float:
    """GFLOP/s of ``size`` x ``size`` matrix products in ``dtype`` (3 warm-ups, then ``repeats`` timed)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def peaks(bf16: bool) -> dict[str, float]:
    """The matrix-product peaks: bf16 at 2048 where the CPU computes bf16 natively; where it emulates bf16 (a
    product of 2048 takes seconds) at 512, 5 products; fp32 at 2048."""
    return {"bf16": matmul_peak(torch.bfloat16, 2048 if bf16 else 512, 20 if bf16 else 5),
            "fp32": matmul_peak(torch.float32)}  # fmt: skip


class CountingCollator(DataCollatorForSeq2Seq):
    """The runner's collator, counting the real tokens and all positions of every batch it makes."""

    def __call__(self, features, return_tensors=None):
        batch = super().__call__(features, return_tensors)
        self.counts.append((int(batch["attention_mask"].sum()), batch["attention_mask"].numel()))
        return batch


def train_way(model, tokenizer, rows, way: str, args, work: Path, bf16: bool) -> dict:
    answer_logits, grouped = WAYS[way]
    collator = CountingCollator(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    collator.counts = []
    training = TrainingArguments(
        output_dir=str(work / way), per_device_train_batch_size=args.step_batch, max_steps=args.steps + 1,
        learning_rate=1e-5, optim="adamw_torch_fused", lr_scheduler_type="constant", bf16=bf16,
        use_cpu=bf16 and not torch.cuda.is_available(), save_strategy="no", report_to=[], seed=0,
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, logging_steps=1,
        train_sampling_strategy="group_by_length" if grouped else "random",
    )  # fmt: skip
    clock = StepClock()
    trainer = GeReTrainer(model=model, args=training, train_dataset=rows, data_collator=collator,
                          processing_class=tokenizer, gere_config=GeReConfig(objective="none"),
                          answer_logits_only=answer_logits, callbacks=[clock])  # fmt: skip
    trainer.train()
    times, counts = clock.times[1:], collator.counts[1 : args.steps + 1]
    real, positions = sum(c[0] for c in counts), sum(c[1] for c in counts)
    return {"step_s": statistics.median(times), "real_tps": real / sum(times), "padded": 1 - real / positions,
            "tokens": real / len(counts)}  # fmt: skip


def step_rows(data: Path, tokenizer, model, args, peak: float, bf16: bool) -> list[str]:
    params = sum(p.numel() for p in model.parameters())
    lines, work = [], Path(tempfile.mkdtemp(prefix="bench_padding_"))
    for folder in args.tasks:
        rows = task_rows(data, folder, tokenizer, args.rows, args.max_length)
        for way in WAYS:
            r = train_way(model, tokenizer, rows, way, args, work, bf16)
            lines.append(f"| {folder} | {way} | {100 * r['padded']:.1f}% | {r['tokens']:.0f} | {r['step_s']:.2f} | "
                         f"{r['real_tps']:.0f} | {100 * 6 * params * r['real_tps'] / (peak * 1e9):.1f}% |")
            print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="O-LoRA's CL_Benchmark folder")
    p.add_argument("--model", required=True, help="a causal LM folder (SmolLM2-135M-Instruct as safetensors)")
    p.add_argument("--tasks", nargs="+", default=["SST-2", "BoolQA", "MultiRC"], choices=list(TASKS))
    p.add_argument("--rows", type=int, default=300, help="first training rows of each task")
    p.add_argument("--batch", type=int, default=8, help="batch size of the padded-share table")
    p.add_argument("--step-batch", type=int, default=8, help="per-device batch of the timed steps")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps per way (after one dropped warm-up step)")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    command, data = command_line(__file__, argv), Path(args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "right"
    shares = share_rows(data, tokenizer, args)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    bf16, why = native_bf16("cpu") if not torch.cuda.is_available() else (True, "a CUDA device")
    precision = "bf16" if bf16 else "fp32"
    before = peaks(bf16)
    steps = step_rows(data, tokenizer, model, args, before[precision], bf16)
    after = peaks(bf16)
    section = "\n".join([
        f"### Task batches on O-LoRA's CL_Benchmark: padding, answer-only logits, length grouping ({Path(args.model).name})",
        "",
        made_by(command, f" Matrix-product peak before / after the steps: bf16 {before['bf16']:.1f} / "
                         f"{after['bf16']:.1f} GFLOP/s, fp32 {before['fp32']:.1f} / {after['fp32']:.1f} GFLOP/s. "
                         f"Training precision ({'training.bf16: auto'}): {precision} ({why}); the share of peak "
                         f"below is of the {precision} peak before the steps."),
        "",
        f"Padded share of one epoch of the first {args.rows} training rows, batches of {args.batch}, max_length "
        f"{args.max_length} (gere's cl15 prompts):",
        "",
        "| task | rows | median tokens | max tokens | random order | length-grouped |",
        "|---|---|---|---|---|---|",
        *shares,
        "",
        f"Training steps (objective none, {precision}, batch {args.step_batch}, {args.steps} timed steps after one "
        "warm-up): `before` "
        "random order and logits at every position; `answer logits` the same batches with the vocabulary projection "
        "at the answer positions only (exact); `after` that and length-grouped batches (a change of batch "
        "composition). Real tokens are non-pad tokens; share of peak = 6 x parameters x real tokens/s / peak.",
        "",
        f"| task | way | padded share | real tokens / step | s / step | real tokens / s | share of {precision} peak |",
        "|---|---|---|---|---|---|---|",
        *steps,
        "",
    ])  # fmt: skip
    print(section)
    if not args.no_write:
        write_results(Path(args.results), "padding", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
