"""What a continual run's task evaluations cost under ``evaluation.schedule: full`` and ``needed``.

Each task of a cl15 data folder (``gere data cl15 ... --out DIR``) is evaluated once on the given model, with
``--test-size`` test rows and the default evaluation settings (label scoring, batch 16, prompts cut to 512
tokens), through the function a run's `Evaluator` calls. A run of the T tasks given evaluates task j as
often as `gere.continual.schedule` says, so its task-evaluation time is the sum over its cells of task j's
measured time; the script prints the counts and that sum for both schedules. The general score's
evaluations (3 under ``needed``, T+1 under ``full``) are counted, not timed: their cost depends on the
general sets chosen. Times scale with the test size (to a first approximation: each row is one forward pass
per batch).

Run from the repository root::

    .venv/bin/gere data cl15 --from-olora data/olora/CL_Benchmark --out data/cl15 --tasks ...
    nice -n 10 .venv/bin/python benchmarks/bench_schedule.py --data data/cl15 --model MODEL_FOLDER --test-size 20

It writes its table into ``benchmarks/RESULTS.md`` (section ``schedule``) unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import HERE, command_line, made_by, write_results  # noqa: E402

from gere.continual.evaluation import evaluate_task  # noqa: E402
from gere.continual.run_config import EvalSettings  # noqa: E402
from gere.continual.schedule import SCHEDULES, counts, tasks_at  # noqa: E402
from gere.continual.tasks import load_benchmark, load_task  # noqa: E402
from gere.modeling import load_model_and_tokenizer  # noqa: E402


def measure(model, tokenizer, data: str, order: int, test_size: int, names: list[str] | None) -> list[tuple]:
    """``[(task, rows, wall s, CPU s)]``: one evaluation of each task, in the order's sequence."""
    ev = EvalSettings()
    specs = load_benchmark("cl15", order=order, data_dir=data, test_size=test_size, train_size=8, tasks=names)
    out = []
    warm = load_task(specs[0])  # the first call's one-off costs (allocations, kernels) belong to no task
    evaluate_task(model, tokenizer, warm.spec, warm.test[:2], method=ev.method, batch_size=ev.batch_size,
                  max_length=ev.max_length)  # fmt: skip
    for spec in specs:
        task = load_task(spec)
        wall, cpu = time.perf_counter(), time.process_time()
        evaluate_task(model, tokenizer, task.spec, task.test, method=ev.method, batch_size=ev.batch_size,
                      max_length=ev.max_length)  # fmt: skip
        out.append((spec.name, len(task.test), time.perf_counter() - wall, time.process_time() - cpu))
        print(f"{spec.name}: {len(task.test)} rows, {out[-1][2]:.1f} s wall, {out[-1][3]:.1f} s CPU", flush=True)
    return out


def schedule_cost(schedule: str, per_task: list[float]) -> float:
    """The task-evaluation seconds of a whole run: each task's time times the stages that evaluate it."""
    t = len(per_task)
    return sum(per_task[j] for s in range(t + 1) for j in tasks_at(schedule, s, t))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a cl15 data folder (gere data cl15 --out)")
    p.add_argument("--model", required=True, help="a model folder or Hugging Face id")
    p.add_argument("--order", type=int, default=4)
    p.add_argument("--tasks", nargs="*", default=None, help="only these tasks (default: every task of the order)")
    p.add_argument("--test-size", type=int, default=20)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    command = command_line(__file__, argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    rows = measure(model, tokenizer, args.data, args.order, args.test_size, args.tasks)
    t = len(rows)
    lines = [
        f"### Task evaluations of a {t}-task run: full against needed ({args.test_size} test rows per task)",
        "",
        made_by(command, f" {args.threads} threads; model {Path(args.model).name}."),
        "",
        "| task | test rows | one evaluation, wall s | CPU s |",
        "|---|---|---|---|",
        *[f"| {name} | {n} | {w:.2f} | {c:.2f} |" for name, n, w, c in rows],
        f"| **all {t} tasks once** | {sum(r[1] for r in rows)} | **{sum(r[2] for r in rows):.1f}** | "
        f"**{sum(r[3] for r in rows):.1f}** |",
        "",
        "| schedule | task evaluations | general evaluations | task evaluation time of the run, wall s | CPU s |",
        "|---|---|---|---|---|",
    ]
    for schedule in SCHEDULES:
        made = counts(schedule, t)
        lines.append(f"| {schedule} | {made['task_evaluations']} | {made['general_evaluations']} | "
                     f"{schedule_cost(schedule, [r[2] for r in rows]):.0f} | "
                     f"{schedule_cost(schedule, [r[3] for r in rows]):.0f} |")  # fmt: skip
    lines += ["", "Run times are each task's measured evaluation times its number of evaluations "
              "(`gere.continual.schedule`); the general evaluations are counted, not timed.", ""]  # fmt: skip
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_results(Path(args.results), "schedule", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
