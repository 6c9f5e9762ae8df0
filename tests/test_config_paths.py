"""One rule for relative paths in a run config: what a run reads is read from the config file's folder, what it
writes from the working directory; runs started under the old rule still resume."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import yaml

from gere.cli import main
from gere.config_reading import from_dict
from gere.continual.run_config import RunConfig, load_run_config
from gere.continual.run_folder import _check_inputs, config_digest, input_digests, same_config

from tiny import write_tiny_run_files


def relative_config(folder: Path, **changes) -> dict:
    """The tiny run's config with every input named relative to ``folder`` (where the files are)."""
    mc = {"question": "the river is", "choices": ["north", "south", "good", "bad"], "answer": 1}
    (folder / "mc.jsonl").write_text(json.dumps(mc) + "\n")
    config = {
        "name": "tiny", "model": "model", "output_dir": "runs/tiny",
        "tasks": [{"source": "mood"}, {"source": "compass"}],
        "gere": {"replay_source": "replay.jsonl", "num_replay_samples": 8, "replay_max_length": 16,
                 "replay_batch_size": 2},
        "training": {"max_steps": 1, "per_device_train_batch_size": 4, "max_length": 32, "bf16": False},
        "evaluation": {"general_mc": "mc.jsonl", "perplexity_sets": {"held.out": "heldout.jsonl"}},
        **changes,
    }  # fmt: skip
    return config


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """``w/full.yaml`` beside its data, as a user keeps a config with the files it names."""
    folder = tmp_path_factory.mktemp("paths") / "w"
    folder.mkdir()
    write_tiny_run_files(folder)
    (folder / "full.yaml").write_text(yaml.safe_dump(relative_config(folder)))
    return folder


def test_inputs_are_read_beside_the_config_and_outputs_where_the_command_runs(w, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # another folder: `gere run w/full.yaml` from its parent's sibling
    cfg = load_run_config(w / "full.yaml")
    assert [s.source for s in cfg.task_specs()] == [str(w / "mood"), str(w / "compass")]
    assert [s.name for s in cfg.task_specs()] == ["mood", "compass"], "task.json read from w/mood"
    assert cfg.gere.replay_source == str(w / "replay.jsonl") and cfg.model == str(w / "model")
    assert cfg.evaluation.general_mc == str(w / "mc.jsonl")
    assert cfg.evaluation.perplexity_sets == {"held.out": str(w / "heldout.jsonl")}
    assert cfg.output_dir == "runs/tiny", "outputs stay relative to the working directory"
    # Overrides are taken as typed, from the working directory.
    assert load_run_config(w / "full.yaml", ["gere.replay_source=mine.jsonl"]).gere.replay_source == "mine.jsonl"
    assert main(["run", str(w / "full.yaml"), "--no-progress"]) == 0, capsys.readouterr().err
    saved = yaml.safe_load((tmp_path / "runs" / "tiny" / "config.yaml").read_text())
    assert saved["tasks"][0]["source"] == str(w / "mood") and saved["model"] == str(w / "model")
    # The run's own config.yaml names its inputs absolutely: it is the same run from any folder.
    state = json.loads((tmp_path / "runs" / "tiny" / "run_state.json").read_text())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = load_run_config(tmp_path / "runs" / "tiny" / "config.yaml")
    assert same_config(state, again) and config_digest(again) == config_digest(cfg)
    _check_inputs(state, input_digests(again), tmp_path / "runs" / "tiny")


def test_a_path_that_is_nowhere_is_named_as_a_path(w, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(relative_config(w, tasks=[{"source": "base/mood"}])))
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"task source '{tmp_path / 'base' / 'mood'}' is not a file or folder (no such path)" in err
    assert "has no name" not in err and "read from the config file's folder" in err


def test_a_config_of_the_old_rule_still_reads_the_working_directory_and_resumes(w, tmp_path, monkeypatch, caplog):
    """Written when relative paths were read from the working directory: ``configs/run.yaml`` naming
    ``mood`` for ``./mood``. Still read from there, with a warning saying what to write; a run it started
    then resumes (its digest and input files were recorded with those relative paths)."""
    monkeypatch.chdir(w)
    (w / "configs").mkdir(exist_ok=True)
    (w / "configs" / "old.yaml").write_text(yaml.safe_dump(relative_config(w)))
    with caplog.at_level(logging.WARNING, logger="gere.continual.config_paths"):
        cfg = load_run_config(w / "configs" / "old.yaml")
    assert cfg.tasks[0].source == "mood" and cfg.gere.replay_source == "replay.jsonl"
    assert "tasks[0].source 'mood' is read from the working directory" in caplog.text and "write '../mood'" in caplog.text
    old = from_dict(RunConfig, relative_config(w))  # how the old rule read it: every path as written
    assert config_digest(old) == config_digest(cfg)
    # A run started under the old rule from w/ itself, with the config beside its data: resumes now that the
    # same config's paths read as absolute ones.
    state = {"config_digest": config_digest(old), "inputs": input_digests(old)}
    assert any(not os.path.isabs(k) for k in state["inputs"]), "recorded relative to the working directory"
    now = load_run_config(w / "full.yaml")
    assert now.tasks[0].source == str(w / "mood") and config_digest(now) != state["config_digest"]
    assert same_config(state, now)
    _check_inputs(state, input_digests(now), w / "runs" / "tiny")
    changed = load_run_config(w / "full.yaml", ["training.max_steps=2"])
    assert not same_config(state, changed), "another setting is still another run"


def test_benchmark_data_dir_and_the_model_follow_the_rule(w, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = relative_config(w, tasks=[], benchmark={"name": "cl15", "data_dir": "cl15_data"}, model="org/name")
    del config["tasks"]
    (w / "bench.yaml").write_text(yaml.safe_dump(config))
    cfg = load_run_config(w / "bench.yaml")
    assert cfg.benchmark.data_dir == str(w / "cl15_data"), "named where the rule looks, for the error to say"
    assert cfg.model == "org/name", "a model not beside the config is a hub id, left alone"
