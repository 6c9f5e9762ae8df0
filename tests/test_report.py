from __future__ import annotations

import json

import pytest
from matplotlib.image import imread

from gere.continual.compare import compare_runs
from gere.continual.report import build_results, write_report
from gere.errors import GeReError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TASKS = ["mnli", "cb", "copa"]
MATRIX = [[0.30, 0.40, 0.50], [0.90, 0.45, 0.55], [0.95, 0.85, 0.60], [0.70, 0.75, 0.95]]


def synthetic_results(method: str, final_shift: float = 0.0) -> dict:
    matrix = [row[:] for row in MATRIX]
    matrix[-1] = [v + final_shift for v in matrix[-1]]
    stages = ["base"] + [f"after {t}" for t in TASKS]
    general = [
        {
            "stage": s,
            "mc_accuracy": a,
            "mc_per_category": {"STEM": a - 0.05, "humanities": a + 0.05},
            "perplexity": {"wiki": 10.0 + i, "c4": 12.0 + 2 * i},
        }
        for i, (s, a) in enumerate(zip(stages, [0.50, 0.48, 0.46, 0.40], strict=True))
    ]
    history = []
    for step in range(30):
        history.append(
            {
                "step": step,
                "task": TASKS[step // 10],
                "loss": 2.0 - step * 0.03,
                "task_ce": 1.5 - step * 0.02,
                "replay_ce": None if step < 10 else 0.5,
                "replay_margin": None if step < 10 else 0.1 * (step % 3),
                "margin_weight": None if step < 10 else 1.0,
            }
        )
    return build_results(
        name=f"run-{method}",
        method=method,
        config={"lr": 1e-4},
        tasks=TASKS,
        test_sizes=[100, 200, 100],
        accuracy_matrix=matrix,
        general=general,
        loss_history=history,
        timing={"total_s": 123.4, "per_task_s": [30.0, 40.0, 50.0], "eval_s": 3.4},
    )


def check_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0.01  # something was drawn


def test_write_report_creates_every_file(tmp_path):
    results = synthetic_results("ce+tm")
    paths = write_report(tmp_path / "run", results)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        [
            "results.json",
            "report.md",
            "accuracy_matrix.png",
            "task_accuracy.png",
            "general.png",
            "loss_parts.png",
        ]
    )
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
        if p.suffix == ".png":
            check_png(p)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["stages"] == ["base", "after mnli", "after cb", "after copa"]
    assert saved["metrics"]["ap"] == pytest.approx(0.80)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| after cb | 95.00 | 85.00 | 60.00 |" in report
    assert "| AP (mean final accuracy) | 80.00 |" in report
    assert "ppl wiki" in report and "| total | 123.4 |" in report
    # No temporary files are left behind by the atomic writes.
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == names


def test_write_report_without_general_or_losses(tmp_path):
    results = {"name": "bare", "method": "ce", "tasks": ["a"], "accuracy_matrix": [[0.5], [0.8]]}
    paths = write_report(tmp_path, results)
    assert len(paths) == 6
    check_png(tmp_path / "loss_parts.png")
    assert json.loads((tmp_path / "results.json").read_text())["metrics"]["bwt"] is None
    with pytest.raises(GeReError, match="accuracy_matrix"):
        write_report(tmp_path, {"tasks": ["a"]})


def test_build_results_checks_shapes():
    with pytest.raises(GeReError, match="one per column"):
        build_results("r", "ce", {}, ["a", "b"], [1, 1], [[0.5], [0.6]])


def test_compare_runs(tmp_path):
    write_report(tmp_path / "a", synthetic_results("ce"))
    write_report(tmp_path / "b", synthetic_results("ce+tm", final_shift=0.02))
    paths = compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp")
    assert [p.name for p in paths] == ["comparison.md", "comparison.png"]
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == 2 and "Note" not in table, "the same task list: nothing to note"
    # AP 80.00 vs 82.00; final perplexity = mean(13, 18) = 15.50; wall time 123.4
    assert (
        rows[0].startswith("| `a` | ce | run-ce | 80.00 |") and "15.50" in rows[0] and rows[0].endswith("123.4 |")
    )
    assert rows[1].startswith("| `b` | ce+tm | run-ce+tm | 82.00 |")
    check_png(paths[1])
    with pytest.raises(GeReError, match="results.json"):
        compare_runs([tmp_path / "missing"], tmp_path / "cmp")


def test_compare_names_runs_by_folder_and_says_when_task_lists_differ(tmp_path):
    # Two runs of one method, model and name: only their folders tell them apart.
    write_report(tmp_path / "order4" / "seed-0", synthetic_results("ce"))
    write_report(tmp_path / "order5" / "seed-0", synthetic_results("ce", final_shift=0.01))
    table = compare_runs([tmp_path / "order4" / "seed-0", tmp_path / "order5" / "seed-0"], tmp_path / "cmp")[0]
    rows = [line for line in table.read_text().splitlines() if line.startswith("| `")]
    assert [r.split(" | ")[0] for r in rows] == ["| `order4/seed-0`", "| `order5/seed-0`"]
    reordered = synthetic_results("ce")
    reordered["tasks"] = reordered["tasks"][::-1]
    write_report(tmp_path / "reordered", reordered)
    fewer = synthetic_results("ce")
    fewer["tasks"] = ["mnli", "cb", "qqp"]
    write_report(tmp_path / "other", fewer)
    text = compare_runs([tmp_path / "order4" / "seed-0", tmp_path / "reordered"], tmp_path / "c2")[0].read_text()
    assert "the runs trained the same tasks in different orders" in text
    text = compare_runs([tmp_path / "order4" / "seed-0", tmp_path / "other"], tmp_path / "c3")[0].read_text()
    note = text.split("All metrics")[0]
    assert "the runs' task lists differ" in note and "`other`: mnli, cb, qqp" in note
    assert f"`order4/seed-0`: {', '.join(TASKS)}" in note


def test_report_warns_about_a_task_its_training_did_not_teach(tmp_path):
    results = synthetic_results("none")
    results["accuracy_matrix"] = [[0.50, 0.40, 0.50], [0.52, 0.45, 0.55], [0.95, 0.85, 0.60], [0.70, 0.75, 0.95]]
    write_report(tmp_path, results)
    report = (tmp_path / "report.md").read_text()
    assert "## Warnings" in report
    assert "task 'mnli' was not learned: 50.00% before its training, 52.00% after" in report
    assert "'cb'" not in report.split("## Accuracy matrix")[0]  # 45 -> 85: learned
    write_report(tmp_path / "fine", synthetic_results("none"))
    assert "Warnings" not in (tmp_path / "fine" / "report.md").read_text()


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "is not a results file written by gere"),
        ("{}", "is not a results file written by gere"),
        ('{"tasks": ["a"], "accuracy_matrix": "x"}', "not numbers"),
        ('{"tasks": ["a"], "accuracy_matrix": [[0.5]]}', "T\\+1 rows"),
        ("{not json", "not valid JSON"),
    ],
)
def test_compare_refuses_files_that_are_not_results(tmp_path, content, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(content)
    with pytest.raises(GeReError, match=message):
        compare_runs([tmp_path / "run"], tmp_path / "cmp")
