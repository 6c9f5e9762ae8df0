"""One tracked run per task sequence, read back from real TensorBoard event files and an MLflow store."""

from __future__ import annotations

import pytest
from test_runner import run, setup  # noqa: F401 (the tiny two-task run files, shared)

from gere.continual.tracking import check_report_to
from gere.errors import GeReError


def test_tensorboard_holds_the_sequence_stage_metrics_losses_and_summary(setup, tmp_path):  # noqa: F811
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
    assert events.Scalars("summary/AP")[0].value == pytest.approx(results["metrics"]["ap"])
    assert {"accuracy_matrix/text_summary", "report/text_summary"} <= set(events.Tags()["tensors"])
    table = events.Tensors("accuracy_matrix/text_summary")[0].tensor_proto.string_val[0].decode()
    assert table.splitlines()[0] == "| stage | mood | compass |" and "| after compass |" in table


def test_mlflow_holds_one_run_with_history_summary_table_and_artifacts(setup, tmp_path, monkeypatch):  # noqa: F811
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store for such uses
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    results = run(setup, tmp_path / "r", "report_to=[mlflow]")
    client = mlflow.tracking.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_name == "tiny"
    history = client.get_metric_history(runs[0].info.run_id, "eval.compass.acc")
    assert [m.step for m in history] == [0, 1, 2]
    assert [m.value for m in history] == pytest.approx([row[1] for row in results["accuracy_matrix"]])
    assert runs[0].data.metrics["summary.F1 Avg"] == pytest.approx(results["metrics"]["f1_avg"] or 0.0)
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"report.md", "results.json", "accuracy_matrix.png", "accuracy_matrix.json"} <= artifacts


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
