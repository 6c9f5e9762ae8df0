"""Experiment tracking: one tracked run per task sequence, in TensorBoard, MLflow or Weights & Biases.

``report_to`` in a run config takes the names the Trainer takes (``tensorboard``, ``mlflow``, ``wandb``).
gere logs to them itself rather than through each stage's Trainer, so that a whole sequence is one tracked
run: the training loss parts (`gere.parts.LOGGED`) at the sequence's step, after each stage
``eval/<task>/acc``, ``eval/general`` and ``eval/ppl/<set>`` with the stage (0 = base model) as the step,
and at the end AP / BWT / FWT / forgetting / general / F1 Avg as the summary, the accuracy matrix as a
table, and report.md, results.json and the plots as artifacts.

- TensorBoard: event files under ``<run>/tensorboard`` (``$TENSORBOARD_LOGGING_DIR`` to move them).
- MLflow: the tracking URI and experiment from ``$MLFLOW_TRACKING_URI`` / ``$MLFLOW_EXPERIMENT_NAME``.
- W&B: project from ``$WANDB_PROJECT`` (default ``gere``); ``WANDB_MODE=offline`` works without a network.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from gere.continual.metrics import general_score
from gere.errors import GeReError, shown
from gere.parts import LOGGED
from gere.reading import read_text

BACKENDS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # name -> module it needs
SUMMARY = {"ap": "AP", "bwt": "BWT", "fwt": "FWT", "forgetting": "forgetting", "general_final": "general",
           "f1_avg": "F1 Avg"}  # fmt: skip


def check_report_to(names: list[str]) -> list[str]:
    """The backends asked for (``all``: those installed; ``none`` or empty: none), each importable."""
    if not names or names == ["none"]:
        return []
    if names == ["all"]:
        return [n for n, module in BACKENDS.items() if importlib.util.find_spec(module)]
    for name in names:
        if name not in BACKENDS:
            raise GeReError(f"report_to: {shown(name)} is not one of {', '.join(BACKENDS)}, 'all' or 'none'")
        if importlib.util.find_spec(BACKENDS[name]) is None:
            raise GeReError(f"report_to: {name} is not installed; pip install {BACKENDS[name]}, or leave it out")
    return list(names)


def stage_metrics(tasks: list[str], accuracies: list[float], general: dict[str, Any]) -> dict[str, float]:
    """The metrics of one evaluated stage, by tracked name."""
    metrics = {f"eval/{t}/acc": float(a) for t, a in zip(tasks, accuracies, strict=True)}
    if general_score(general) is not None:
        metrics["eval/general"] = float(general_score(general))
    metrics.update({f"eval/lm_eval/{t}": float(v) for t, v in (general.get("lm_eval") or {}).items()})
    for name, value in (general.get("perplexity") or {}).items():
        metrics[f"eval/ppl/{name}"] = float(value)
    return metrics


class SequenceTracker:
    """Logs one task sequence to each backend of ``report_to``; a no-op without backends."""

    def __init__(self, backends: list[str], name: str, out: Path, config: dict[str, Any]):
        self.backends, self.out = backends, out
        self._tb = self._mlflow = self._wandb = None
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.environ.get("TENSORBOARD_LOGGING_DIR") or str(out / "tensorboard"))
        if "mlflow" in backends:
            import mlflow

            self._mlflow = mlflow
            self._mlflow_run = mlflow.start_run(run_name=name)
            mlflow.log_params({k: str(v)[:250] for k, v in _flat(config).items()})
        if "wandb" in backends:
            import wandb

            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "gere"), name=name, config=config,
                                     dir=str(out), reinit="finish_previous")  # fmt: skip
            self._wandb.define_metric("stage")
            self._wandb.define_metric("eval/*", step_metric="stage")

    def log_training(self, rows: list[dict[str, Any]]) -> None:
        """Loss-history rows (``{"step", "task", <LOGGED>...}``) at the sequence's step."""
        for row in rows:
            values = {f"train/{k}": float(row[k]) for k in LOGGED if row.get(k) is not None}
            self._log(values, step=int(row["step"]))

    def log_stage(self, stage: int, metrics: dict[str, float]) -> None:
        self._log(metrics, step=stage, stage=True)

    def _log(self, values: dict[str, float], step: int, stage: bool = False) -> None:
        for key, value in values.items():
            if self._tb is not None:
                self._tb.add_scalar(key, value, step)
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()}, step=step)
        if self._wandb is not None:
            self._wandb.log({**values, "stage": step} if stage else values, **({} if stage else {"step": step}))

    def finish(self, results: dict[str, Any], files: list[Path]) -> None:
        """Summary metrics, the accuracy matrix as a table, the report files as artifacts; closes the run."""
        m = results["metrics"]
        summary = {f"summary/{label}": float(m[key]) for key, label in SUMMARY.items() if m.get(key) is not None}
        table = {"stage": results["stages"], **{t: [row[j] for row in results["accuracy_matrix"]]
                                                for j, t in enumerate(results["tasks"])}}  # fmt: skip
        if self._tb is not None:
            for key, value in summary.items():
                self._tb.add_scalar(key, value, len(results["tasks"]))
            self._tb.add_text("accuracy_matrix", _markdown_table(table))
            for path in files:
                if path.suffix == ".md":
                    self._tb.add_text(path.stem, read_text(path, what="report", kind="state"))
            self._tb.close()
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("/", "."): v for k, v in summary.items()})
            self._mlflow.log_table(table, "accuracy_matrix.json")
            for path in files:
                self._mlflow.log_artifact(str(path))
            self._mlflow.end_run()
        if self._wandb is not None:
            self._wandb.summary.update(summary)
            columns = list(table)
            rows = [[table[c][i] for c in columns] for i in range(len(table["stage"]))]
            self._wandb.log({"accuracy_matrix": __import__("wandb").Table(columns=columns, data=rows)})
            for path in files:
                self._wandb.save(str(path), base_path=str(path.parent), policy="now")
            self._wandb.finish()


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _markdown_table(table: dict[str, list]) -> str:
    columns = list(table)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for i in range(len(table["stage"])):
        lines.append("| " + " | ".join(str(table[c][i]) if c == "stage" else f"{100 * table[c][i]:.1f}"
                                       for c in columns) + " |")  # fmt: skip
    return "\n".join(lines)
