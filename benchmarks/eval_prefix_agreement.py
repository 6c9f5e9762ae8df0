"""Does running the prompts' shared prefix once change an answer? Every prediction of the demo's evaluation,
with and without the shared prefix, on the base model and on trained checkpoints.

`gere.continual.evaluation.continuation_logprobs` runs the tokens all prompts of a call start with (a task's
instruction and options) once and copies their key/value cache for every batch. That is equal to running
every prompt whole up to float rounding; this script measures how far "up to" goes on real models: for each
model, the demo's three tasks (label scoring) and its probe (cloze, both picks) are scored both ways, and it
counts the predictions that differ and the largest difference of a log-likelihood.

Run from the repository root, after a demo (its assets) and with run folders whose final checkpoints to
check (any `gere demo` or docs/study.md run of the demo's model; full fine-tuning only)::

    .venv/bin/python benchmarks/eval_prefix_agreement.py runs/demo/*/seed-*
    .venv/bin/python benchmarks/eval_prefix_agreement.py runs/map/r1/*/seed-* runs/map/r2/*/seed-*

It prints a table and writes it into ``benchmarks/RESULTS.md`` (section ``eval-prefix``) unless
``--no-write``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import HERE, command_line, made_by, write_results  # noqa: E402

from gere.continual import evaluation, multiple_choice  # noqa: E402
from gere.continual.checkpoint import load_checkpoint  # noqa: E402
from gere.continual.evaluation import evaluate_task  # noqa: E402
from gere.continual.multiple_choice import evaluate_multiple_choice, load_multiple_choice  # noqa: E402
from gere.continual.run_config import load_run_config  # noqa: E402
from gere.continual.tasks import load_task  # noqa: E402
from gere.demo.assets import DemoSizes, build_demo_assets  # noqa: E402
from gere.demo.run import SIZES, demo_config  # noqa: E402
from gere.modeling import load_model_and_tokenizer  # noqa: E402


class Recorded:
    """Wraps `continuation_logprobs` to keep every score it returns (to compare the two ways)."""

    def __init__(self):
        self.scores: list[float] = []
        self.original = evaluation.continuation_logprobs

    def __call__(self, *args, **kwargs):
        result = self.original(*args, **kwargs)
        self.scores += [s for row in result for s in row]
        return result


def evaluate_both_ways(model, tokenizer, cfg, tasks, questions) -> dict:
    """Every prediction and score of the demo's evaluation, with the shared prefix run once and without."""
    ev = cfg.evaluation
    shared_minimum = evaluation.MIN_SHARED_PREFIX
    out = {}
    for way, minimum in (("shared", shared_minimum), ("whole", 10**9)):
        recorder = Recorded()
        evaluation.MIN_SHARED_PREFIX = minimum
        evaluation.continuation_logprobs = multiple_choice.continuation_logprobs = recorder
        try:
            predictions = [evaluate_task(model, tokenizer, t.spec, t.test, method=ev.method, batch_size=ev.batch_size,
                                         max_length=ev.max_length)["predictions"] for t in tasks]  # fmt: skip
            mc = evaluate_multiple_choice(model, tokenizer, questions, batch_size=ev.batch_size, mc_format=ev.mc_format)
            predictions += [mc["predictions"], mc.get("predictions_sum") or []]
        finally:
            evaluation.MIN_SHARED_PREFIX = shared_minimum
            evaluation.continuation_logprobs = multiple_choice.continuation_logprobs = recorder.original
        out[way] = (predictions, recorder.scores)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="run folders (with checkpoints/stage-<last>/) to check beside the base model")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    command = command_line(__file__, argv)

    assets = build_demo_assets(args.cache_dir, sizes=DemoSizes(**SIZES["default"]["assets"]))
    cfg = load_run_config(None, [], base=copy.deepcopy(demo_config(assets, "default", Path("/tmp/eval_prefix"))))
    ev = cfg.evaluation
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    tokenizer.padding_side = "right"
    tasks = [load_task(spec) for spec in cfg.task_specs()]
    for task in tasks:
        task.test = task.test[: ev.test_limit] if ev.test_limit else task.test
    questions = load_multiple_choice(ev.general_mc, limit=ev.mc_limit)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    models = [("base model", None)]
    for run in map(Path, args.runs):
        stages = sorted((run / "checkpoints").glob("stage-*"), key=lambda d: int(d.name.split("-")[1]))
        if stages:
            models.append((f"{run} {stages[-1].name}", stages[-1]))
        else:
            print(f"skipped {run}: no checkpoint", flush=True)
    rows, total, differ, largest = [], 0, 0, 0.0
    for name, stage in models:
        model.load_state_dict(base_state)
        if stage is not None:
            load_checkpoint(stage, model, load_run_config(stage.parent.parent / "config.yaml"))
        both = evaluate_both_ways(model, tokenizer, cfg, tasks, questions)
        (shared_preds, shared_scores), (whole_preds, whole_scores) = both["shared"], both["whole"]
        n = sum(len(p) for p in whole_preds)
        d = sum(a != b for sp, wp in zip(shared_preds, whole_preds, strict=True) for a, b in zip(sp, wp, strict=True))
        gap = float((torch.tensor(shared_scores) - torch.tensor(whole_scores)).abs().max())
        total, differ, largest = total + n, differ + d, max(largest, gap)
        rows.append(f"| {name} | {n} | {d} | {gap:.2e} |")
        print(rows[-1], flush=True)
    section = "\n".join([
        "### Evaluation: the prompts' shared prefix run once against every prompt run whole",
        "",
        made_by(command),
        "",
        "Predictions: the demo's three tasks (label scoring) and its probe (cloze: per-character and summed pick).",
        "",
        "| model | predictions | differing | largest log-likelihood difference |",
        "|---|---|---|---|",
        *rows,
        f"| **all {len(models)}** | **{total}** | **{differ}** | **{largest:.2e}** |",
        "",
    ])  # fmt: skip
    print(section)
    if not args.no_write:
        write_results(Path(args.results), "eval-prefix", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
