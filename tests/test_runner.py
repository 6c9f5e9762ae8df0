import json

import pytest

import gere.continual.runner as runner
from gere.cli import main
from gere.errors import GeReError

from tiny import tiny_llama, tiny_tokenizer
from tiny_runs import run


@pytest.mark.parametrize("objective,bi", [("none", 0), ("ce+tm", 0), ("ce+tm", 2)])
def test_two_task_run_writes_full_report(setup, tmp_path, objective, bi):
    results = run(setup, tmp_path / "r", f"gere.objective={objective}", f"gere.num_interpolate_per_batch={bi}")
    assert len(results["accuracy_matrix"]) == 3 and all(len(r) == 2 for r in results["accuracy_matrix"])
    assert results["stages"] == ["base", "after mood", "after compass"]
    assert len(results["general"]) == 3 and results["general"][0]["perplexity"]["heldout"] > 1
    for name in ("results.json", "report.md", "config.yaml", "accuracy_matrix.png", "task_accuracy.png",
                 "general.png", "loss_parts.png"):  # fmt: skip
        assert (tmp_path / "r" / name).exists(), name
    for png in (tmp_path / "r").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    losses = results["loss_history"]
    assert [h["task"] for h in losses] == ["mood", "mood", "compass", "compass"]
    assert [h["step"] for h in losses] == [1, 2, 3, 4]
    if objective == "ce+tm":
        assert all(h["replay_margin"] is not None and h["replay_ce"] is not None for h in losses)
        assert (tmp_path / "r" / "gere_store" / "manifest.json").exists()
    else:
        assert all(h["replay_margin"] is None for h in losses)
    assert (tmp_path / "r" / "checkpoints" / "stage-2" / "weights.safetensors").exists()
    assert (tmp_path / "r" / "checkpoints" / "stage-1" / "checkpoint.json").exists()  # every stage kept by default


def test_resume_after_interruption_gives_same_metrics(setup, tmp_path, monkeypatch):
    whole = run(setup, tmp_path / "whole")
    calls = {"n": 0}
    original = runner.GeReTrainer.train

    def crash_on_second_task(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash during task 2")
        return original(self, *a, **k)

    monkeypatch.setattr(runner.GeReTrainer, "train", crash_on_second_task)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(setup, tmp_path / "cut")
    state = json.loads((tmp_path / "cut" / "run_state.json").read_text())
    assert state["stages_done"] == 1
    monkeypatch.setattr(runner.GeReTrainer, "train", original)
    with pytest.raises(GeReError, match="--resume"):
        run(setup, tmp_path / "cut")
    resumed = run(setup, tmp_path / "cut", resume=True)
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed["metrics"] == whole["metrics"]
    assert [g["perplexity"] for g in resumed["general"]] == [g["perplexity"] for g in whole["general"]]
    assert [h["loss"] for h in resumed["loss_history"]] == [h["loss"] for h in whole["loss_history"]]


def test_resume_with_other_config_is_refused(setup, tmp_path):
    run(setup, tmp_path / "r", "gere.objective=none")
    with pytest.raises(GeReError, match=r"another config \(these settings differ: gere.objective: 'none' -> 'ce'\)") as err:
        run(setup, tmp_path / "r", "gere.objective=ce", resume=True)
    assert "--overwrite" not in str(err.value) and "config.yaml --resume" in str(err.value)
    again = run(setup, tmp_path / "r", "gere.objective=ce", overwrite=True)
    assert again["method"] == "ce"


def test_lora_run(setup, tmp_path):
    results = run(setup, tmp_path / "lora", "finetuning=lora", "lora.target_modules=[q_proj,v_proj]",
                  "gere.reference=online")  # fmt: skip
    assert len(results["accuracy_matrix"]) == 3
    assert not (tmp_path / "lora" / "gere_store").exists()


def test_cli_run_and_compare(setup, tmp_path, capsys):
    assert main(["run", str(setup / "run.yaml"), "--output-dir", str(tmp_path / "a"), "--objective", "none",
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["run", str(setup / "run.yaml"), "--output-dir", str(tmp_path / "b"), "--objective", "ce+tm",
                 "--margin-weight", "100", "--no-progress"]) == 0  # fmt: skip
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "ce+tm" in table and "none" in table
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_runs_share_the_base_evaluation_through_a_cache_file(setup, tmp_path, monkeypatch):
    cache = tmp_path / "base eval #1.json"  # taken as typed
    assert main(["run", str(setup / "run.yaml"), "--output-dir", str(tmp_path / "a"), "--objective", "none",
                 "--base-eval-cache", str(cache), "--no-progress"]) == 0  # fmt: skip
    assert len(json.loads(cache.read_text())) == 1
    calls = []
    real = runner.Evaluator.__call__
    monkeypatch.setattr(runner.Evaluator, "__call__", lambda self, *a, **k: calls.append(a[2]) or real(self, *a, **k))
    assert main(["run", str(setup / "run.yaml"), "--output-dir", str(tmp_path / "b"), "--objective", "ce",
                 "--base-eval-cache", str(cache), "--no-progress"]) == 0  # fmt: skip
    assert "base" not in calls and calls  # the base row came from the cache, the stages were evaluated
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert a["accuracy_matrix"][0] == b["accuracy_matrix"][0] and a["general"][0] == b["general"][0]


def test_cli_errors_exit_2_with_message(setup, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrainin: {max_steps: 1}\n")
    assert main(["run", str(bad)]) == 2
    assert "unknown config key(s) trainin" in capsys.readouterr().err
    bad.write_text("name: x\ntraining: {max_steps: lots}\n")
    assert main(["run", str(bad)]) == 2
    assert "training.max_steps: expected int" in capsys.readouterr().err


def test_cli_extract(setup, tmp_path, capsys):
    assert main(["extract", "--model", str(setup / "model"), "--replay-source", str(setup / "replay.jsonl"),
                 "--num-replay-samples", "8", "--replay-max-length", "16", "--store-dir", str(tmp_path / "s")]) == 0  # fmt: skip
    assert "tm_codes" in capsys.readouterr().out
    other = tmp_path / "other"
    tiny_llama(seed=5).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    assert main(["extract", "--model", str(other), "--replay-source", str(setup / "replay.jsonl"),
                 "--num-replay-samples", "8", "--replay-max-length", "16", "--store-dir", str(tmp_path / "s")]) == 2  # fmt: skip
    assert "different model" in capsys.readouterr().err


def test_cli_disk_full_is_a_clear_error(setup, tmp_path, capsys, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner, "run_continual", full)
    assert main(["run", str(setup / "run.yaml"), "--output-dir", str(tmp_path / "x")]) == 2
    assert "disk is full" in capsys.readouterr().err


def test_every_objective_part_is_logged_recorded_and_plotted(setup, tmp_path):
    from gere.continual.plots import loss_series
    from gere.parts import LOGGED, LOSS_PARTS, WEIGHTS

    results = run(setup, tmp_path / "all", "gere.objective=ce+kl+l1+l2+tm", "gere.kl_topk=4", "ewc.strength=1",
                  "ewc.samples=2", "lwf.weight=1", "lwf.topk=4")  # fmt: skip
    # O-LoRA excludes EWC: its parts (and a separate batch of the task buffer) come from a second run.
    olora = run(setup, tmp_path / "olora", "gere.objective=none", "finetuning=olora", "lora.target_modules=[q_proj]",
                "task_replay.per_task=2", "task_replay.mixing=batch")  # fmt: skip
    series, olora_series = loss_series(results), loss_series(olora)
    assert set(olora_series) == {"loss", "task_ce", "olora_orth", "olora_l2", "task_replay_ce"}
    assert set(LOSS_PARTS) | set(WEIGHTS) <= set(series) | set(olora_series)
    assert list(series) == [name for name in LOGGED if name in series]  # display order of the table
    # 2 steps x 2 tasks, every part every step; EWC's penalty from the second task on
    assert {name: len(points) for name, points in series.items()} == {name: 2 if name == "ewc" else 4 for name in series}
    written = json.loads((tmp_path / "all" / "results.json").read_text())["loss_history"]
    assert all(row[name] is not None for row in written for name in (*LOSS_PARTS, *WEIGHTS)
               if not (name == "ewc" and row["task"] == "mood") and name not in olora_series)  # fmt: skip


def test_a_replay_set_smaller_than_asked_is_said_in_the_report(setup, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="gere.replay.replay_set"):
        results = run(setup, tmp_path / "few", "gere.num_replay_samples=100", "gere.objective=ce")
    assert results["replay_set"] == {"requested": 100, "used": 8}
    assert "holds 8 texts; num_replay_samples asks for 100" in caplog.text
    assert "held 8 texts, fewer than the 100 asked for" in (tmp_path / "few" / "report.md").read_text()


def test_the_same_run_twice_gives_identical_metrics(setup, tmp_path):
    """Repeatability on one machine: every number of the results, to the last bit (the real model's
    version of this check is tests/test_demo_integration.py::test_smallest_demo_repeats_exactly)."""
    a = run(setup, tmp_path / "a", "gere.objective=ce+tm")
    b = run(setup, tmp_path / "b", "gere.objective=ce+tm")
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["general"] == b["general"]
    assert a["metrics"] == b["metrics"]
    assert [h["loss"] for h in a["loss_history"]] == [h["loss"] for h in b["loss_history"]]


def test_a_held_out_set_without_its_text_field_names_the_set_and_the_field(setup, tmp_path):
    bad = tmp_path / "heldout.jsonl"
    bad.write_text('{"body": "a text without its field"}\n')
    with pytest.raises(GeReError) as err:
        run(setup, tmp_path / "r", f"evaluation.perplexity_sets={{other: {bad}}}")
    message = str(err.value)
    assert "no field 'text'" in message and "evaluation.perplexity_sets.other reads each text from the field 'text'" in message
    assert str(bad) in message and "replay_text_field" not in message  # not the replay set's fix
