"""One tracked run per task sequence, read back from real TensorBoard event files and an MLflow store."""

from __future__ import annotations

import importlib.util
import os

import pytest

from gere.continual.tracking import (
    _mlflow_major,
    check_report_to,
    mlflow_name,
    mlflow_store,
    mlflow_store_problem,
)
from gere.errors import GeReError

from tiny_runs import run

# MLflow 3's default store is SQLite, which needs SQLAlchemy and Alembic (gere[track] installs them).
SQL_STORE = all(importlib.util.find_spec(m) for m in ("sqlalchemy", "alembic"))


def test_tensorboard_holds_the_sequence_stage_metrics_losses_and_summary(setup, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = run(setup, tmp_path / "r", "report_to=[tensorboard]", "gere.objective=ce+tm")
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    mood = [(e.step, e.value) for e in events.Scalars("eval/mood/acc")]
    assert [s for s, _ in mood] == [0, 1, 2]  # base, after mood, after compass
    assert [v for _, v in mood] == pytest.approx([row[0] for row in results["accuracy_matrix"]])
    assert {"train/task_ce", "train/replay_margin", "train/margin_weight", "eval/ppl/heldout"} <= set(scalars)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]  # one step axis over both tasks
    # The learning rate and gradient norm of every step, as the loss history holds them.
    lr = [(e.step, e.value) for e in events.Scalars("train/learning_rate")]
    assert lr == [(h["step"], pytest.approx(h["learning_rate"])) for h in results["loss_history"]]
    assert lr[0][1] == pytest.approx(0.01)
    grad = [e.value for e in events.Scalars("train/grad_norm")]
    assert grad == pytest.approx([h["grad_norm"] for h in results["loss_history"]]) and min(grad) > 0
    # Each stage's evaluation again at the step where it ended: base at 0, after mood at 2, after compass at 4.
    at_step = [(e.step, e.value) for e in events.Scalars("eval_at_step/mood/acc")]
    assert at_step == [(s, pytest.approx(v)) for s, v in zip([0, 2, 4], [r[0] for r in results["accuracy_matrix"]])]
    assert events.Scalars("summary/AP")[0].value == pytest.approx(results["metrics"]["ap"])
    assert {"accuracy_matrix/text_summary", "report/text_summary"} <= set(events.Tags()["tensors"])
    table = events.Tensors("accuracy_matrix/text_summary")[0].tensor_proto.string_val[0].decode()
    assert table.splitlines()[0] == "| stage | mood | compass |" and "| after compass |" in table


@pytest.mark.skipif(not SQL_STORE, reason="MLflow's default SQLite store needs sqlalchemy and alembic (gere[track])")
def test_mlflow_by_default_holds_one_run_beside_the_run_folder_with_readmes_metric_names(setup, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    if _mlflow_major() < 3:
        pytest.skip("MLflow 2 keeps its file store mlruns/ there instead of mlflow.db")
    # No tracking URI and no opt-in to anything: gere's default, in the folder that holds the run folder.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    results = run(setup, tmp_path / "runs" / "r", "report_to=[mlflow]")
    assert list((tmp_path / "elsewhere").iterdir()) == [], "nothing in the working directory"
    assert (tmp_path / "runs" / "mlflow.db").is_file(), "the store in the run's output root"
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_name == "tiny"
    assert client.get_experiment(runs[0].info.experiment_id).name == "gere"
    assert runs[0].info.artifact_uri.startswith((tmp_path / "runs" / "mlruns").as_uri())
    history = client.get_metric_history(runs[0].info.run_id, "eval/compass/acc")
    assert [m.step for m in history] == [0, 1, 2]
    assert [m.value for m in history] == pytest.approx([row[1] for row in results["accuracy_matrix"]])
    assert runs[0].data.metrics["summary/F1 Avg"] == pytest.approx(results["metrics"]["f1_avg"] or 0.0)
    assert not any("." in name.split("/")[0] for name in runs[0].data.metrics), "README's train/... names"
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"report.md", "results.json", "accuracy_matrix.png", "accuracy_matrix.json"} <= artifacts
    assert (tmp_path / "runs" / "mlruns").is_dir()
    lr = client.get_metric_history(runs[0].info.run_id, "train/learning_rate")
    assert [m.step for m in lr] == [1, 2, 3, 4] and lr[0].value == pytest.approx(0.01)
    assert len(client.get_metric_history(runs[0].info.run_id, "train/grad_norm")) == 4
    assert {"train/loss", "train/task_ce", "eval/ppl/heldout", "eval/general"} <= set(runs[0].data.metrics)
    at_step = client.get_metric_history(runs[0].info.run_id, "eval_at_step/compass/acc")
    assert [m.step for m in at_step] == [0, 2, 4]
    assert [m.value for m in at_step] == pytest.approx([row[1] for row in results["accuracy_matrix"]])
    assert runs[0].data.params["gere.objective"] == "ce+tm" and runs[0].info.status == "FINISHED"


@pytest.mark.parametrize("store", ["sqlite:////proc/gere-none/mlflow.db", "file:///proc/gere-none/mlruns"])
def test_an_mlflow_store_that_cannot_be_written_is_named_before_anything_is_written(setup, tmp_path, monkeypatch,
                                                                                    store, capsys):  # fmt: skip
    pytest.importorskip("mlflow")
    from gere.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert main(["run", str(setup / "run.yaml"), "--output-dir", str(tmp_path / "r"), "--set",
                 "report_to=[mlflow]"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert f"the tracking store {store} cannot be written: /proc/gere-none" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists(), "no run folder, config.yaml or activation store left behind"
    assert not os.path.exists("/proc/gere-none")


def test_gere_default_mlflow_store_is_beside_the_run_and_checked(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, artifacts, chosen = mlflow_store(tmp_path / "runs" / "r")
    if _mlflow_major() >= 3:
        assert uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}" and chosen
        assert artifacts == (tmp_path / "runs" / "mlruns").as_uri()
    assert mlflow_store_problem(uri, chosen) is None if SQL_STORE else "gere[track]" in mlflow_store_problem(uri)
    assert not (tmp_path / "runs").exists(), "the check leaves no folder behind"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
    assert mlflow_store(tmp_path / "r") == ("http://localhost:5000", None, False)
    assert mlflow_store_problem("databricks") is None
    assert mlflow_name("eval/a+b,c/acc") == "eval/a_b_c/acc" and mlflow_name("summary/F1 Avg") == "summary/F1 Avg"


def test_an_mlflow_store_mlflow_would_refuse_is_refused_when_the_config_is_read(monkeypatch, tmp_path):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    file_store = (tmp_path / "mlruns").as_uri()
    if _mlflow_major() >= 3:
        assert "MLFLOW_ALLOW_FILE_STORE=true" in mlflow_store_problem(file_store)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", file_store)
        with pytest.raises(GeReError, match="report_to: mlflow: MLflow 3 keeps the file store .* maintenance mode"):
            check_report_to(["mlflow"])
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert mlflow_store_problem(file_store) is None
    assert mlflow_store_problem("http://localhost:5000") is None
    default = mlflow_store_problem("")  # no MLFLOW_TRACKING_URI: MLflow's own default
    assert default is None if SQL_STORE or _mlflow_major() < 3 else "sqlite:///mlflow.db) needs sqlalchemy" in default
    sqlite = mlflow_store_problem(f"sqlite:///{tmp_path}/mlflow.db")
    assert sqlite is None if SQL_STORE else "needs sqlalchemy" in sqlite and "gere[track]" in sqlite


def test_unknown_or_missing_tracker_is_refused_when_the_config_is_read():
    with pytest.raises(GeReError, match="'comet' is not one of tensorboard, mlflow, wandb"):
        check_report_to(["comet"])
    assert check_report_to(["none"]) == [] and check_report_to([]) == []


def test_stage_metrics_take_the_lm_eval_score_as_the_general_score():
    from gere.continual.tracking import stage_metrics

    general = {"mc_accuracy": 0.25, "perplexity": {"wiki": 20.0}, "lm_eval": {"mmlu": 0.4, "arc": 0.6},
               "lm_eval_score": 0.5}  # fmt: skip
    got = stage_metrics(["a"], [0.75], general)
    assert got == {"eval/a/acc": 0.75, "eval/general": 0.5, "eval/lm_eval/mmlu": 0.4, "eval/lm_eval/arc": 0.6,
                   "eval/ppl/wiki": 20.0}  # fmt: skip
    assert stage_metrics(["a"], [0.75], {"mc_accuracy": 0.25})["eval/general"] == 0.25
