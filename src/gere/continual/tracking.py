"""Experiment tracking: one tracked run per task sequence, in TensorBoard, MLflow or Weights & Biases.

``report_to`` in a run config takes the names the Trainer takes (``tensorboard``, ``mlflow``, ``wandb``).
gere logs to them itself rather than through each stage's Trainer, so that a whole sequence is one tracked
run: the training loss parts (`gere.parts.LOGGED`), the learning rate and the gradient norm
(``train/learning_rate``, ``train/grad_norm``; with the gradient-share diagnostic on, its values too) at the
sequence's step; after each stage ``eval/<task>/acc``,
``eval/general``, ``eval/lm_eval/<task>`` and ``eval/ppl/<set>`` with the stage (0 = base model) as the
step, and the same values as ``eval_at_step/...`` at the sequence's step where that stage ended (beside the
training curves); at the end AP / BWT / FWT / forgetting / general / F1 Avg as the summary, the accuracy
matrix as a table, and report.md, results.json and the plots as artifacts.

- TensorBoard: event files under ``<run>/tensorboard`` (``$TENSORBOARD_LOGGING_DIR`` to move them).
- MLflow: ``$MLFLOW_TRACKING_URI`` (a server ``http://host:5000``, ``sqlite:///path/mlflow.db``,
  ``databricks``) and ``$MLFLOW_EXPERIMENT_NAME``; unset, an SQLite store ``mlflow.db`` with artifacts in
  ``mlruns/`` (MLflow 2: the file store ``mlruns/``), both in the folder that holds the run folder (the output
  root: ``runs/`` for ``runs/demo``, the sweep's folder for its cells), so that the runs kept there are one
  store to compare (``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``), in the experiment ``gere``
  (``gere[track]`` installs the SQLAlchemy and Alembic that store needs). Metric names are the same as in
  TensorBoard and W&B (``train/loss``, ``eval/<task>/acc``, ``summary/F1 Avg``), a character MLflow refuses
  replaced by ``_``. A store MLflow would refuse (the file store, which MLflow 3 keeps only behind
  ``MLFLOW_ALLOW_FILE_STORE=true``; SQLite without SQLAlchemy) or a local store that cannot be written is
  refused when the config is read, before anything is written, with the fix.
- W&B: project from ``$WANDB_PROJECT`` (default ``gere``); ``WANDB_MODE=offline`` works without a network.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from gere.continual.metrics import METRICS, general_score
from gere.errors import GeReError, shown
from gere.parts import GRAD_SHARE, LOGGED, TRAINER_LOGGED
from gere.reading import read_text

logger = logging.getLogger(__name__)

BACKENDS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # name -> module it needs
AT_STEP = "eval_at_step/"  # evaluation metrics at the sequence's step where their stage ended
#: MLflow's store where ``$MLFLOW_TRACKING_URI`` is unset: these names in the folder that holds the run folder.
MLFLOW_DB, MLFLOW_ARTIFACTS, MLFLOW_EXPERIMENT = "mlflow.db", "mlruns", "gere"
_MLFLOW_REFUSED = re.compile(r"[^/\w.\- :]")  # what MLflow's metric and param names may not hold
SUMMARY = {info.key: info.label for info in METRICS}  # results.json's metric -> summary/<label>


def check_report_to(names: list[str], out: str | Path = "runs/run") -> list[str]:
    """The backends asked for (``all``: those installed, and MLflow only where its store will work; ``none``
    or empty: none), each importable; ``out``: the run folder (MLflow's default store is beside it)."""
    if not names or names == ["none"]:
        return []
    if names == ["all"]:
        found = [n for n, module in BACKENDS.items() if importlib.util.find_spec(module)]
        problem = "mlflow" in found and mlflow_store_problem(*mlflow_store(out)[::2])
        if problem:
            logger.warning("report_to: all leaves mlflow out: %s", problem)
        return [n for n in found if n != "mlflow" or not problem]
    for name in names:
        if name not in BACKENDS:
            raise GeReError(f"report_to: {shown(name)} is not one of {', '.join(BACKENDS)}, 'all' or 'none'")
        if importlib.util.find_spec(BACKENDS[name]) is None:
            raise GeReError(f"report_to: {name} is not installed; pip install {BACKENDS[name]}, or leave it out")
    if "mlflow" in names:
        problem = mlflow_store_problem(*mlflow_store(out)[::2])
        if problem:
            raise GeReError(f"report_to: mlflow: {problem}")
    return list(names)


def _mlflow_major() -> int:
    for dist in ("mlflow", "mlflow-skinny"):
        try:
            return int(importlib.metadata.version(dist).split(".")[0])
        except (importlib.metadata.PackageNotFoundError, ValueError):
            continue
    return 0


def mlflow_store(out: str | Path) -> tuple[str, str | None, bool]:
    """``(tracking URI, artifact folder for the experiment gere creates or None, whether gere chose the store)``
    of a run in ``out``: ``$MLFLOW_TRACKING_URI`` as set, else `MLFLOW_DB` (MLflow 2: the file store
    `MLFLOW_ARTIFACTS`) with artifacts in `MLFLOW_ARTIFACTS`, in the folder that holds ``out``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri, None, False
    root = Path(out).expanduser().resolve().parent
    if _mlflow_major() < 3:
        return (root / MLFLOW_ARTIFACTS).as_uri(), None, True
    return f"sqlite:///{root / MLFLOW_DB}", (root / MLFLOW_ARTIFACTS).as_uri(), True


def mlflow_store_problem(uri: str, chosen: bool = False) -> str | None:
    """Why MLflow would refuse the tracking store ``uri`` (``""``: MLflow's own default; ``chosen``: gere's
    default, `mlflow_store`), or could not write it, with the fix; None when it will work. Checked when the
    config is read, so a run does not stop at its first logged value, with its folder and store written."""
    problem = _store_refused(uri, chosen)
    folder = None if problem else _local_store_folder(uri)
    if folder is not None and (unwritable := _write_problem(folder)):
        how = f"gere's default store ({uri})" if chosen else f"the tracking store {uri}"
        fix = ("put the run where it can be written, or set MLFLOW_TRACKING_URI" if chosen else
               "set MLFLOW_TRACKING_URI to a store in a folder you can write (unset, gere keeps mlflow.db "
               "in the folder that holds the run folder)")  # fmt: skip
        return f"{how} cannot be written: {unwritable}; {fix}"
    return problem


def _local_store_folder(uri: str) -> Path | None:
    """The folder a local store (SQLite file, file store) writes into; None for servers and in-memory SQLite."""
    if uri.startswith("sqlite:"):
        path = unquote(uri.removeprefix("sqlite:").removeprefix("///").split("?", 1)[0])
        return Path(path).expanduser().parent if path and path != ":memory:" else None
    if uri.startswith("file:"):
        return Path(unquote(urlparse(uri).path))
    return Path(uri).expanduser() if uri.startswith(("/", ".", "~")) else None  # a path: MLflow's file store


def _write_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot hold a new file (None when it can): tried with a temporary file, in folders made
    for the try and removed after it, so that nothing is left behind."""
    made: list[Path] = []
    try:
        missing, at = [], folder.absolute()
        while not at.exists():
            missing.append(at)
            at = at.parent
        for path in reversed(missing):
            path.mkdir()
            made.append(path)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".gere-write-check-"):
            pass
    except OSError as err:
        return f"{getattr(err, 'filename', None) or folder}: {err.strerror or err}"
    finally:
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.rmdir()
    return None


def _store_refused(uri: str, chosen: bool) -> str | None:
    major = _mlflow_major()
    scheme = uri.split(":", 1)[0].lower() if "://" in uri or uri.startswith("sqlite:") else ("file" if uri else "")
    if uri in ("databricks", "databricks-uc", "uc"):  # MLflow's names for Databricks' servers, not paths
        return None
    if scheme == "" and major < 3:
        return None  # MLflow 2's default is the ./mlruns file store, which it still writes
    if scheme in ("", "sqlite", "postgresql", "mysql", "mssql") or "+" in scheme:
        missing = [m for m in ("sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
        if missing:
            where = ("MLflow's default store (sqlite:///mlflow.db)" if not uri else
                     f"gere's default store ({uri})" if chosen else f"the store {uri}")  # fmt: skip
            return (f"{where} needs {' and '.join(missing)}, which mlflow-skinny leaves out; pip install "
                    "'gere[track]' (or sqlalchemy alembic), or point MLFLOW_TRACKING_URI at a server (http://...)")  # fmt: skip
        return None
    allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true", "yes")
    if scheme == "file" and major >= 3 and not allowed:
        return (f"MLflow {major} keeps the file store ({uri}) in maintenance mode and refuses it; set "
                "MLFLOW_TRACKING_URI=sqlite:///<folder>/mlflow.db (or a server), or MLFLOW_ALLOW_FILE_STORE=true "
                "to keep the file store")  # fmt: skip
    return None


def stage_metrics(tasks: list[str], accuracies: list[float], general: dict[str, Any]) -> dict[str, float]:
    """The metrics of one evaluated stage, by tracked name (a cell not evaluated is not logged)."""
    metrics = {f"eval/{t}/acc": float(a) for t, a in zip(tasks, accuracies, strict=True) if a is not None}
    if general_score(general) is not None:
        metrics["eval/general"] = float(general_score(general))
    metrics.update({f"eval/lm_eval/{t}": float(v) for t, v in (general.get("lm_eval") or {}).items()})
    metrics.update({f"eval/suite/{b}": float(v["score"]) for b, v in (general.get("suite") or {}).items()})
    for name, value in (general.get("perplexity") or {}).items():
        metrics[f"eval/ppl/{name}"] = float(value)
    return metrics


class SequenceTracker:
    """Logs one task sequence to each backend of ``report_to`` (one `TrackedRun` each, made by `TRACKERS`); a
    no-op without backends."""

    def __init__(self, backends: list[str], name: str, out: Path, config: dict[str, Any]):
        self.backends, self.out = backends, out
        self.runs: list[TrackedRun] = [TRACKERS[b](name, out, config) for b in backends]

    def log_training(self, rows: list[dict[str, Any]]) -> None:
        """Loss-history rows (``{"step", "task", <LOGGED>..., "learning_rate", "grad_norm", <GRAD_SHARE>...}``)
        at the sequence's step."""
        for row in rows:
            names = (*LOGGED, *TRAINER_LOGGED, *GRAD_SHARE)
            values = {f"train/{k}": float(row[k]) for k in names if row.get(k) is not None}
            self._log(values, step=int(row["step"]), axis="global_step")

    def log_stage(self, stage: int, metrics: dict[str, float], global_step: int | None = None) -> None:
        """A stage's evaluation with the stage as the step, and again as ``eval_at_step/...`` at
        ``global_step``, the sequence's step where the stage ended (0 for the base model)."""
        self._log(metrics, step=stage, axis="stage")
        if global_step is not None:
            at_step = {AT_STEP + k.removeprefix("eval/"): v for k, v in metrics.items()}
            self._log(at_step, step=global_step, axis="global_step")

    def _log(self, values: dict[str, float], step: int, axis: str) -> None:
        for run in self.runs:
            run.log(values, step, axis)

    def finish(self, results: dict[str, Any], files: list[Path]) -> None:
        """Summary metrics, the accuracy matrix as a table, the report files as artifacts; closes the runs."""
        m = results["metrics"]
        summary = {f"summary/{label}": float(m[key]) for key, label in SUMMARY.items() if m.get(key) is not None}
        table = {"stage": results["stages"], **{t: [row[j] for row in results["accuracy_matrix"]]
                                                for j, t in enumerate(results["tasks"])}}  # fmt: skip
        for run in self.runs:
            run.finish(summary, table, files, len(results["tasks"]))


class TrackedRun:
    """One backend's run of a sequence: what `SequenceTracker` calls. A new backend is one subclass and one
    entry of `TRACKERS` (and of `BACKENDS`, the module it needs)."""

    def log(self, values: dict[str, float], step: int, axis: str) -> None:
        """Scalars at ``step`` of ``axis`` (``"global_step"``: the sequence's step; ``"stage"``: 0 = base)."""
        raise NotImplementedError

    def finish(self, summary: dict[str, float], table: dict[str, list], files: list[Path], stages: int) -> None:
        """The summary metrics, the accuracy matrix (``{"stage": [...], task: [...]}``), the report files."""
        raise NotImplementedError


class TensorBoardRun(TrackedRun):
    """Event files under ``<run>/tensorboard`` (``$TENSORBOARD_LOGGING_DIR`` to move them)."""

    def __init__(self, name: str, out: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=os.environ.get("TENSORBOARD_LOGGING_DIR") or str(out / "tensorboard"))

    def log(self, values: dict[str, float], step: int, axis: str) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, summary: dict[str, float], table: dict[str, list], files: list[Path], stages: int) -> None:
        for key, value in summary.items():
            self.writer.add_scalar(key, value, stages)
        self.writer.add_text("accuracy_matrix", _markdown_table(table))
        for path in files:
            if path.suffix == ".md":
                self.writer.add_text(path.stem, read_text(path, what="report", kind="state"))
        self.writer.close()


class WandbRun(TrackedRun):
    """A W&B run in ``$WANDB_PROJECT`` (default ``gere``); ``WANDB_MODE=offline`` works without a network."""

    def __init__(self, name: str, out: Path, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gere"), name=name, config=config,
                              dir=str(out), reinit="finish_previous")  # fmt: skip
        # Each family on its own axis: training and eval_at_step on the sequence's step, eval on the stage.
        self.run.define_metric("stage")
        self.run.define_metric("global_step")
        self.run.define_metric("eval/*", step_metric="stage")
        for family in ("train/*", f"{AT_STEP}*"):
            self.run.define_metric(family, step_metric="global_step")

    def log(self, values: dict[str, float], step: int, axis: str) -> None:
        self.run.log({**values, axis: step})

    def finish(self, summary: dict[str, float], table: dict[str, list], files: list[Path], stages: int) -> None:
        import wandb

        self.run.summary.update(summary)
        columns = list(table)
        rows = [[table[c][i] for c in columns] for i in range(len(table["stage"]))]
        self.run.log({"accuracy_matrix": wandb.Table(columns=columns, data=rows)})
        for path in files:
            self.run.save(str(path), base_path=str(path.parent), policy="now")
        self.run.finish()


class MlflowRun(TrackedRun):
    """One MLflow run in the store `mlflow_store` names, through MLflow's client (no process-wide state)."""

    def __init__(self, name: str, out: Path, config: dict[str, Any]):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri, artifacts, _ = mlflow_store(out)
        self.client = MlflowClient(tracking_uri=uri)
        try:  # the tags MLflow's own start_run sets (user, source, git commit)
            from mlflow.tracking.context.registry import resolve_tags

            tags = resolve_tags()
        except ImportError:
            tags = {}
        run = self.client.create_run(self._experiment(artifacts), run_name=name, tags=tags)
        self.run_id = run.info.run_id
        params = {mlflow_name(k): str(v)[:250] for k, v in _flat(config).items()}
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])

    def _experiment(self, artifacts: str | None) -> str:
        """``$MLFLOW_EXPERIMENT_ID``, or the experiment ``$MLFLOW_EXPERIMENT_NAME`` (default: `MLFLOW_EXPERIMENT`
        in gere's store, MLflow's ``Default`` in one the user set), created when missing."""
        if os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or (MLFLOW_EXPERIMENT if artifacts else "Default")
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name, artifact_location=artifacts)
        except MlflowException:  # another run created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log(self, values: dict[str, float], step: int, axis: str = "global_step") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_name(k), float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary: dict[str, float], table: dict[str, list], files: list[Path], stages: int = 0) -> None:
        self.log(summary, 0)
        self.client.log_table(self.run_id, table, "accuracy_matrix.json")
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id)


#: The tracked run of each ``report_to`` backend.
TRACKERS: dict[str, type[TrackedRun]] = {"tensorboard": TensorBoardRun, "mlflow": MlflowRun, "wandb": WandbRun}


def mlflow_name(key: str) -> str:
    """``key`` as MLflow takes a metric or param name: the same as TensorBoard's and W&B's (``train/loss``), a
    character MLflow refuses (outside letters, digits, ``_-. :/``) replaced by ``_``."""
    return _MLFLOW_REFUSED.sub("_", key)


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
        lines.append("| " + " | ".join(str(table[c][i]) if c == "stage" else _cell(table[c][i])
                                       for c in columns) + " |")  # fmt: skip
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"
