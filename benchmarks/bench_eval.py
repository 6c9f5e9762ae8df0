"""Where a demo evaluation's time goes: every task's label scoring, the probe, each perplexity set.

One evaluation of the demo (after a stage) is timed piece by piece on the demo's model and data, with the
demo's evaluation settings (`gere.demo.run.SIZES["default"]`), through the functions the run's `Evaluator`
calls. Each piece is repeated and the median taken; wall and process CPU time are both given (CPU time is
the steadier of the two on a shared machine, with one thread the default here). The scores are printed
with every digit, so two versions of the code can be checked to score identically.

Run from the repository root (the demo's assets must be built: ``make demo`` once, or any ``gere demo``)::

    .venv/bin/python benchmarks/bench_eval.py                 # ~2 min on a 2-core CPU, one thread
    .venv/bin/python benchmarks/bench_eval.py --threads 2

It writes its table into ``benchmarks/RESULTS.md`` (section ``eval-<threads>t``) unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import command_line, made_by  # noqa: E402
from bench_engine import HERE, median, write_results  # noqa: E402

from gere.continual.evaluation import evaluate_task, perplexity  # noqa: E402
from gere.continual.multiple_choice import evaluate_multiple_choice, load_multiple_choice  # noqa: E402
from gere.continual.run_config import load_run_config  # noqa: E402
from gere.continual.tasks import load_task  # noqa: E402
from gere.demo.assets import DemoSizes, build_demo_assets  # noqa: E402
from gere.demo.run import SIZES, demo_config  # noqa: E402
from gere.modeling import load_model_and_tokenizer  # noqa: E402
from gere.replay.replay_set import load_replay_records  # noqa: E402


def timed(fn, repeats: int):
    """``(result, median wall s, median CPU s)`` of ``fn()`` over ``repeats`` calls (after one warm-up)."""
    result = fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return result, median(walls), median(cpus)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--scores", default=None, help="also write the scores as JSON here")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    command = command_line(__file__, argv)
    torch.set_num_threads(args.threads)

    assets = build_demo_assets(args.cache_dir, sizes=DemoSizes(**SIZES["default"]["assets"]))
    cfg = load_run_config(None, [], base=copy.deepcopy(demo_config(assets, "default", Path("/tmp/bench_eval"))))
    ev = cfg.evaluation
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    tokenizer.padding_side = "right"
    rows, scores = [], {}
    for spec in cfg.task_specs():
        task = load_task(spec)
        examples = task.test[: ev.test_limit] if ev.test_limit else task.test
        result, wall, cpu = timed(lambda t=task, e=examples: evaluate_task(
            model, tokenizer, t.spec, e, method=ev.method, batch_size=ev.batch_size, max_length=ev.max_length
        ), args.repeats)  # fmt: skip
        rows.append((f"task {spec.name} ({len(examples)} x {len(spec.labels)} labels)", wall, cpu))
        scores[f"task {spec.name}"] = result["predictions"]
    questions = load_multiple_choice(ev.general_mc, limit=ev.mc_limit)
    mc, wall, cpu = timed(lambda: evaluate_multiple_choice(
        model, tokenizer, questions, batch_size=ev.batch_size, mc_format=ev.mc_format
    ), args.repeats)  # fmt: skip
    rows.append((f"probe ({len(questions)} x 4 options, {ev.mc_format})", wall, cpu))
    scores["probe"] = [mc["predictions"], mc.get("predictions_sum")]
    for name, path in ev.perplexity_sets.items():
        texts = [text for _, text in load_replay_records(path)][: ev.perplexity_limit]
        value, wall, cpu = timed(lambda t=texts: perplexity(
            model, tokenizer, t, max_length=ev.perplexity_max_length, batch_size=ev.batch_size
        ), args.repeats)  # fmt: skip
        rows.append((f"perplexity {name} ({len(texts)} texts)", wall, cpu))
        scores[f"ppl {name}"] = value
    total_wall, total_cpu = sum(r[1] for r in rows), sum(r[2] for r in rows)
    section = "\n".join([
        f"### One evaluation of the demo, piece by piece ({args.threads} thread{'s' if args.threads > 1 else ''})",
        "",
        made_by(command, f" Median of {args.repeats} repeats after a warm-up."),
        "",
        "| piece | wall s | CPU s | share of CPU |",
        "|---|---|---|---|",
        *[f"| {name} | {w:.2f} | {c:.2f} | {c / total_cpu:.0%} |" for name, w, c in rows],
        f"| **one evaluation** | **{total_wall:.2f}** | **{total_cpu:.2f}** | |",
        "",
        "Perplexities: " + ", ".join(f"{k[4:]} {v!r}" for k, v in scores.items() if k.startswith("ppl ")),
        "",
    ])  # fmt: skip
    print(section)
    if args.scores:
        Path(args.scores).write_text(json.dumps(scores))
    if not args.no_write:
        write_results(Path(args.results), f"eval-{args.threads}t", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
