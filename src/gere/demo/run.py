"""`gere demo`: a real pretrained LLM, real text, three continual tasks, methods side by side.

SmolLM2-135M-Instruct is fine-tuned on three tasks in a row (movie-review sentiment, a grammar relation
between two words, word similarity) with the same seeds under each method:

- ``none``: plain sequential fine-tuning;
- ``ce``: replay of general Wikipedia paragraphs with cross-entropy (the paper's BaselineR);
- ``ce+tm``: BaselineR plus the threshold-based margin loss (GeRe).

After every task each method is evaluated on all tasks, on a general-knowledge multiple-choice probe
(capitals) and on the perplexity of held-out Wikipedia and news text, and a comparison table is printed.
The default size finishes in about 10 minutes on a 2-core CPU with a warm cache (see docs/demo.md for the
measured figures); ``--full`` runs larger settings through the same code for a GPU.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from gere.continual.compare import compare_runs
from gere.continual.run_config import load_run_config
from gere.continual.runner import run_continual
from gere.demo.assets import DemoSizes, build_demo_assets

METHODS = {
    "none": {"objective": "none"},
    "ce": {"objective": "ce"},
    "ce+tm": {"objective": "ce+tm", "margin_weight": "dy"},
}

# Sizes: "default" fits ~10 minutes on a 2-core CPU; "smallest" is for the integration test; "full" is for
# a GPU. Each entry: asset sizes, per-task training, evaluation sizes, replay settings.
SIZES: dict[str, dict[str, Any]] = {
    "default": {
        "assets": {"replay": 128, "heldout_wiki": 32, "heldout_news": 32, "probe": 150, "task_train": 200,
                   "task_test": 100},
        "task_train": 96, "task_test": 24,
        "training": {"max_steps": 12, "per_device_train_batch_size": 8, "learning_rate": 3e-4, "max_length": 96},
        "evaluation": {"mc_limit": 40, "perplexity_limit": 8, "perplexity_max_length": 96, "batch_size": 16},
        "gere": {"num_replay_samples": 64, "replay_max_length": 64, "replay_batch_size": 4},
    },
    "smallest": {
        "assets": {"replay": 16, "heldout_wiki": 4, "heldout_news": 4, "probe": 8, "task_train": 16,
                   "task_test": 8},
        "task_train": 8, "task_test": 4,
        "training": {"max_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 3e-4, "max_length": 64},
        "evaluation": {"mc_limit": 4, "perplexity_limit": 2, "perplexity_max_length": 32, "batch_size": 8},
        "gere": {"num_replay_samples": 8, "replay_max_length": 32, "replay_batch_size": 2},
    },
    "full": {
        "assets": {"replay": 256, "heldout_wiki": 64, "heldout_news": 64, "probe": 200, "task_train": 400,
                   "task_test": 100},
        "task_train": 400, "task_test": 100,
        "training": {"num_train_epochs": 2, "per_device_train_batch_size": 16, "learning_rate": 3e-4,
                     "max_length": 160},
        "evaluation": {"perplexity_max_length": 256, "batch_size": 32},
        "gere": {"num_replay_samples": 256, "replay_max_length": 256, "replay_batch_size": 8},
    },
}  # fmt: skip


def demo_config(assets, method: str, size: str, output_dir: Path, seed: int = 0) -> dict[str, Any]:
    """The run config (as a mapping) of one method of the demo."""
    s = SIZES[size]
    training = {"optim": "adamw_torch_fused", "logging_steps": 1, **s["training"]}
    return {
        "name": f"demo-{method}",
        "output_dir": str(output_dir / method.replace("+", "_")),
        "model": str(assets.model_dir),
        "seed": seed,
        "finetuning": "full",
        "tasks": [
            {"source": str(d), "train_size": s["task_train"], "test_size": s["task_test"], "seed": seed}
            for d in assets.task_dirs
        ],
        "gere": {"replay_source": str(assets.replay), "replay_seed": seed, **s["gere"], **METHODS[method]},
        "training": training,
        "evaluation": {
            "general_mc": str(assets.probe),
            "perplexity_sets": {"wiki": str(assets.heldout_wiki), "news": str(assets.heldout_news)},
            **s["evaluation"],
        },
    }


def _row(results: dict[str, Any]) -> list[str]:
    m, general = results["metrics"], results["general"][-1]
    ppl = general["perplexity"]

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    return [
        results["method"],
        pct(m["ap"]),
        pct(m["bwt"]),
        pct(general["mc_accuracy"]),
        f"{ppl.get('wiki', float('nan')):.1f}",
        f"{ppl.get('news', float('nan')):.1f}",
        pct(m["f1_avg"]),
        f"{results['timing']['total_s']:.0f}",
    ]


def format_table(all_results: list[dict[str, Any]], base: dict[str, Any]) -> str:
    header = ["method", "AP %", "BWT %", "probe acc %", "ppl wiki", "ppl news", "F1 Avg %", "wall s"]
    base_ppl = base["perplexity"]
    first = [
        "base model",
        "-",
        "-",
        f"{100 * base['mc_accuracy']:.1f}" if base["mc_accuracy"] is not None else "-",
        f"{base_ppl.get('wiki', float('nan')):.1f}",
        f"{base_ppl.get('news', float('nan')):.1f}",
        "-",
        "-",
    ]
    rows = [first] + [_row(r) for r in all_results]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def run_demo(
    output_dir: str | Path = "runs/demo",
    cache_dir: str | Path | None = None,
    smollm2_wheel: str | None = None,
    gensim_wheel: str | None = None,
    size: str = "default",
    methods: list[str] | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
    seed: int = 0,
) -> list[dict[str, Any]]:
    from gere.errors import GeReError

    if size not in SIZES:
        raise GeReError(f"demo size {size!r} is not one of {', '.join(SIZES)}")
    methods = methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise GeReError(f"unknown demo method(s) {unknown}; choose from {', '.join(METHODS)}")
    started = time.time()
    assets = build_demo_assets(
        cache_dir, smollm_wheel=smollm2_wheel, gensim_wheel=gensim_wheel, seed=seed,
        sizes=DemoSizes(**SIZES[size]["assets"]),
    )  # fmt: skip
    print(f"assets ready in {time.time() - started:.1f} s under {assets.root}")
    output_dir = Path(output_dir)
    all_results = []
    for method in methods:
        cfg = load_run_config(
            None, overrides, base=copy.deepcopy(demo_config(assets, method, size, output_dir, seed))
        )
        print(f"\n== {method}: {len(cfg.tasks)} tasks, {cfg.training.max_steps} steps each ==")
        results = run_continual(
            cfg, overwrite=True, progress=progress, base_eval_cache=output_dir / "base_eval.json"
        )
        all_results.append(results)
    compare_runs([Path(r["config"]["output_dir"]) for r in all_results], output_dir / "comparison")
    print(
        "\nTasks:", ", ".join(all_results[0]["tasks"]), "| probe: capitals (4 options) | ppl: held-out text"
    )
    print(format_table(all_results, all_results[0]["general"][0]))
    print(f"\ntotal {time.time() - started:.0f} s; reports in {output_dir}/<method>/report.md, comparison in "
          f"{output_dir}/comparison/comparison.md")  # fmt: skip
    return all_results
