from __future__ import annotations

import pytest

from gere.continual.metrics import (
    average_performance,
    backward_transfer,
    compute_metrics,
    f1_average,
    forgetting,
    forward_transfer,
)
from gere.errors import GeReError

# Rows: base, after task 1, after task 2, after task 3; columns: tasks 1..3 (0-based j = 0, 1, 2).
R = [
    [0.30, 0.40, 0.50],
    [0.90, 0.45, 0.55],
    [0.95, 0.85, 0.60],
    [0.70, 0.75, 0.95],
]
GENERAL = [
    {"stage": s, "mc_accuracy": a}
    for s, a in zip(["base", "a", "b", "c"], [0.50, 0.48, 0.46, 0.40], strict=True)
]


def test_hand_worked_three_tasks():
    m = compute_metrics(R, test_sizes=[100, 200, 100], general=GENERAL)
    # AP = (0.70 + 0.75 + 0.95) / 3 = 2.40 / 3 = 0.80
    assert m["ap"] == pytest.approx(0.80)
    # weighted AP = (100*0.70 + 200*0.75 + 100*0.95) / 400 = (70 + 150 + 95) / 400 = 0.7875
    assert m["ap_weighted"] == pytest.approx(0.7875)
    # BWT = mean(R3[0] - R1[0], R3[1] - R2[1]) = mean(0.70 - 0.90, 0.75 - 0.85) = mean(-0.20, -0.10) = -0.15
    assert m["bwt"] == pytest.approx(-0.15)
    # FWT = mean(R1[1] - R0[1], R2[2] - R0[2]) = mean(0.45 - 0.40, 0.60 - 0.50) = mean(0.05, 0.10) = 0.075
    assert m["fwt"] == pytest.approx(0.075)
    # forgetting: task 0 peaked at R2[0] = 0.95 (after task 2), so 0.95 - 0.70 = 0.25; task 1: 0.85 - 0.75 = 0.10
    # mean = 0.175 (differs from -BWT = 0.15 because task 0 improved after it was learned)
    assert m["forgetting"] == pytest.approx(0.175)
    assert m["learned_accuracy"] == [0.90, 0.85, 0.95]
    assert m["final_accuracy"] == [0.70, 0.75, 0.95]
    assert m["general_scores"] == [0.50, 0.48, 0.46, 0.40]
    # F1 Avg = 2 * 0.40 * 0.80 / (0.40 + 0.80) = 0.64 / 1.2 = 0.5333...
    assert m["general_final"] == 0.40
    assert m["f1_avg"] == pytest.approx(0.64 / 1.2)
    assert m["units"] == "fraction" and m["num_tasks"] == 3


def test_single_task_has_undefined_transfer():
    m = compute_metrics([[0.5], [0.9]])
    assert m["ap"] == pytest.approx(0.9)
    assert m["bwt"] is None and m["fwt"] is None and m["forgetting"] is None
    assert m["ap_weighted"] is None and m["f1_avg"] is None and m["general_scores"] == []


def test_pieces_and_edge_cases():
    assert average_performance(R, [0, 0, 1]) == pytest.approx(0.95)
    assert backward_transfer(R) == pytest.approx(-0.15)
    assert forward_transfer(R) == pytest.approx(0.075)
    assert forgetting(R) == pytest.approx(0.175)
    assert f1_average(0.0, 0.8) == 0.0 and f1_average(0.5, 0.0) == 0.0 and f1_average(None, 0.5) is None
    assert f1_average(0.6, 0.6) == pytest.approx(0.6)


@pytest.mark.parametrize(
    "matrix, message",
    [
        ([[0.5]], "T\\+1 rows"),
        ([[0.5, 0.5], [0.9, 0.8], [0.9]], "row 2 has 1 values"),
        ([[0.5], [float("nan")]], "non-finite"),
    ],
)
def test_bad_matrix(matrix, message):
    with pytest.raises(GeReError, match=message):
        compute_metrics(matrix)


def test_bad_test_sizes():
    with pytest.raises(GeReError, match="one test size per task"):
        compute_metrics(R, test_sizes=[1, 2])


def test_not_learned_is_less_than_five_points_gained_on_its_own_training():
    from gere.continual.metrics import not_learned

    # Task 0: 0.30 -> 0.90 learned; task 1: 0.45 -> 0.49 (+4 points) not; task 2: 0.60 -> 0.50 not.
    matrix = [[0.30, 0.40, 0.50], [0.90, 0.45, 0.55], [0.95, 0.49, 0.60], [0.70, 0.75, 0.50]]
    assert not_learned(matrix) == [1, 2]
    assert compute_metrics(matrix)["not_learned"] == [1, 2]
    assert not_learned(R) == []  # gains of 60, 40 and 35 points
