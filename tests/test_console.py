"""The console of `gere run`: quiet by default (a bar per task, a line per stage, the table), the Trainer's
per-step lines in the run folder's train_log.jsonl; `gere -v` keeps the Trainer's own output."""

import json

from gere.cli import main
from gere.continual.console import set_verbose, stage_line


def test_quiet_console_prints_stage_lines_and_logs_steps_to_the_run_folder(setup, tmp_path, capsys):
    try:
        assert main(["run", str(setup / "run.yaml"), "--output-dir", str(tmp_path / "q"), "--objective", "ce+tm"]) == 0
    finally:
        set_verbose(False)
    out, err = capsys.readouterr()
    assert "{'loss'" not in out and "{'loss'" not in err and "train_runtime" not in out + err
    lines = [line for line in out.splitlines() if line.startswith(("base:", "after "))]
    assert [line.split(":")[0] for line in lines] == ["base", "after mood", "after compass"]
    assert "mood " in lines[1] and "probe " in lines[1] and "ppl heldout " in lines[1]
    assert "task 1/2 mood" in err  # the progress bar of each task (tqdm writes to stderr)
    logged = [json.loads(line) for line in (tmp_path / "q" / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in logged if "loss" in e]
    assert [(e["task"], e["step"]) for e in steps] == [("task 1/2 mood", 1), ("task 1/2 mood", 2),
                                                        ("task 2/2 compass", 1), ("task 2/2 compass", 2)]  # fmt: skip
    assert all("replay_margin" in e and "grad_norm" in e for e in steps)
    assert any("train_runtime" in e for e in logged)


def test_a_run_that_replaces_another_starts_its_own_train_log(setup, tmp_path):
    out = str(tmp_path / "r")
    assert main(["run", str(setup / "run.yaml"), "--output-dir", out, "--objective", "none", "--no-progress"]) == 0
    assert main(["run", str(setup / "run.yaml"), "--output-dir", out, "--objective", "ce", "--no-progress",
                 "--overwrite"]) == 0  # fmt: skip
    steps = [json.loads(line) for line in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in steps if "loss" in e]
    assert len(steps) == 4 and all("replay_ce" in e for e in steps)  # the ce run's steps alone


def test_verbose_keeps_the_trainers_own_lines(setup, tmp_path, capsys):
    try:
        assert main(["-v", "run", str(setup / "run.yaml"), "--output-dir", str(tmp_path / "v"), "--no-progress"]) == 0
    finally:
        set_verbose(False)
    out = capsys.readouterr().out
    assert "{'loss'" in out and (tmp_path / "v" / "train_log.jsonl").exists()


def test_stage_line_names_every_score():
    line = stage_line("after a", ["a", "b"], [0.5, 0.25], {"mc_accuracy": 0.775, "perplexity": {"wiki": 26.15}})
    assert line == "after a: a 50.0 | b 25.0 | probe 77.5 | ppl wiki 26.1"
