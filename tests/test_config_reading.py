"""Paths are taken as typed: `gere run --output-dir`, `--model` and a sweep's cell folders reach the run config
unchanged whatever they hold (``#``, line breaks, quotes, spaces), and a ``--set`` value that YAML would read
as something else than what was typed is refused before any work."""

from __future__ import annotations

import itertools
import json

import pytest

from gere.cli import main
from gere.config_reading import literal, parse_override
from gere.continual.run_config import load_run_config
from gere.errors import GeReError

# Pieces that YAML gives a meaning of its own, alone or inside a plain scalar.
PIECES = ["runs/a", " #2", "#x", "\n", "\t", "'", '"', "\\", "~", "yes", "null", "1e-5", ": ", "- ", "[b]", "{c}",
          "&d", "*e", "!f", "%", "@", "`", "é", "\U0001f600", "  ", "\\n", "---", "?"]  # fmt: skip


def generated_paths() -> list[str]:
    """Every piece alone and every ordered pair of pieces, behind a folder and alone."""
    pairs = ["".join(p) for p in itertools.product(PIECES, repeat=2)]
    return PIECES + pairs + ["runs/" + p for p in pairs]


def test_a_literal_value_reads_back_exactly_as_it_was():
    paths = generated_paths()
    assert len(paths) > 1500
    for path in paths:
        assert parse_override(f"output_dir={literal(path)}", "--set") == ("output_dir", path), repr(path)


@pytest.mark.parametrize(
    ("value", "why"),
    [("runs/victim #2", "a comment starts at #"), ("runs/nl\ndir", "a line break becomes a space")],
)
def test_a_set_value_yaml_would_change_is_refused_with_the_quoted_fix(value, why):
    with pytest.raises(GeReError, match=why) as err:
        parse_override(f"output_dir={value}", "--set")
    fix = str(err.value).rsplit("quote it: --set ", 1)[1]
    assert parse_override(fix, "--set") == ("output_dir", value), "the suggested fix reads back as typed"


def test_set_values_yaml_reads_as_typed_still_work():
    assert parse_override("training.learning_rate=2e-5", "--set", numbers=True) == ("training.learning_rate", 2e-5)
    assert parse_override("output_dir=runs/a  b", "--set") == ("output_dir", "runs/a  b")
    assert parse_override("output_dir='runs/a #2'", "--set") == ("output_dir", "runs/a #2")
    assert parse_override("evaluation.general=mc", "--set") == ("evaluation.general", "mc")


def test_run_output_dir_with_a_hash_leaves_the_other_run_alone(setup, tmp_path, capsys):
    """`--output-dir "runs/victim #2" --overwrite` writes to that folder; runs/victim is not touched."""
    victim = tmp_path / "victim"
    config = str(setup / "run.yaml")
    fast = ["--set", "gere.objective=none", "--set", "training.max_steps=1", "--no-progress"]
    assert main(["run", config, "--output-dir", str(victim), *fast]) == 0
    before = (victim / "results.json").read_bytes()
    (victim / "results.json").touch()
    mtime = (victim / "results.json").stat().st_mtime_ns
    for name in ("victim #2", "nl\ndir"):
        assert main(["run", config, "--output-dir", str(tmp_path / name), "--overwrite", *fast]) == 0
        assert (tmp_path / name / "results.json").is_file(), name
        assert load_run_config(tmp_path / name / "config.yaml").output_dir == str(tmp_path / name)
    assert (victim / "results.json").read_bytes() == before
    assert (victim / "results.json").stat().st_mtime_ns == mtime
    assert not (tmp_path / "nl dir").exists()
    capsys.readouterr()
    assert main(["run", config, "--set", f"output_dir={victim} #2", "--overwrite", *fast]) == 2
    assert "YAML reads the value as" in capsys.readouterr().err
    assert json.loads((victim / "results.json").read_text()) == json.loads(before)


def test_a_sweep_out_with_a_hash_gives_every_cell_its_own_folder(setup, tmp_path):
    from gere.continual.sweep import grid_cells, parse_grid, plan_sweep, sweep_loader

    out = tmp_path / "sw #1"
    cells = grid_cells(parse_grid(["training.max_steps=1,2"]))
    plan = plan_sweep(sweep_loader(setup / "run.yaml", []), cells, [0, 1], out)
    assert [cfg.output_dir for *_, folder, cfg in plan] == [str(folder) for *_, folder, _ in plan]
    assert all(str(folder).startswith(str(out) + "/") for *_, folder, _ in plan) and len(plan) == 4
