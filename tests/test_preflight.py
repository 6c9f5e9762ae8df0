"""Every check before work: the whole grid of a sweep, the output path, the model, every evaluation input,
and a run resumed from its own config.yaml (or refused, naming the settings that differ).

"Before work" is shown by what is on disk afterwards (no output folder, no config.yaml, no gere_store/) and
by the sweep's run function never being called. Cases of each family are generated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gere.cli import main
from gere.continual.preflight import RUN_DEPTH
from gere.continual.run_config import load_run_config
from gere.continual.run_folder import claim, config_digest, existing_state
from gere.continual.runner import run_continual
from gere.continual.sweep import Cell, grid_cells, parse_grid, run_sweep, sweep_loader
from gere.errors import GeReError
from gere.io_utils import check_output_dir

from tiny import write_tiny_run_files
from tiny_runs import crash_in_second_task


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, two tasks, held-out texts and a run config (1 step per task, no replay)."""
    root = tmp_path_factory.mktemp("preflight")
    model_dir = write_tiny_run_files(root)
    config = {
        "name": "tiny", "model": str(model_dir),
        "tasks": [{"source": str(root / "mood")}, {"source": str(root / "compass")}],
        "gere": {"objective": "none"},
        "training": {"max_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 0.01, "max_length": 32,
                     "optim": "adamw_torch"},
        "evaluation": {"perplexity_sets": {"heldout": str(root / "heldout.jsonl")}},
    }  # fmt: skip
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root


def never_run(*args, **kwargs):
    raise AssertionError("a run started before every cell was checked")


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ------------------------------------------------------------------------------------------------ grids


@pytest.mark.parametrize(
    "grid, message",
    [
        ("training.max_steps=1,0", r"sweep cell 'training.max_steps=0' \(seed 0\): training.max_steps = 0 is not valid"),
        ("training.learning_rate=1e-3,-1", r"cell 'training.learning_rate=-1' .*learning_rate = -1.0 is not valid"),
        ("gere.objective=ce,ce+xx", r"cell 'gere.objective=ce\+xx'.*objective 'ce\+xx' is not valid"),
        ("model=MODEL,/nowhere/model", r"cell 'model=/nowhere/model'.*model path /nowhere/model does not exist"),
        ("training.max_length=32,{a: 1}", r"training.max_length: expected int, got dict"),
        ("evaluation.general=mc,lm_eval:", r"evaluation.general: expected str, got dict \(\{'lm_eval': None\}\)"),
        ("tasks=[]", r"cell 'tasks=\[\]' \(seed 0\): the run config has no tasks"),
    ],
)
def test_every_cell_is_checked_before_the_first_runs(setup, tmp_path, grid, message):
    grid = grid.replace("MODEL", str(setup / "model"))
    cells = grid_cells(parse_grid([grid]))
    out = tmp_path / "sweep"
    load = sweep_loader(setup / "run.yaml", [])
    with pytest.raises(GeReError, match=message):
        run_sweep(load, cells, [0, 1], out, progress=False, run=never_run)
    assert not out.exists()


@pytest.mark.parametrize(
    "key, a, b",
    [
        ("training.learning_rate", "0.01", "1e-2"),
        ("training.learning_rate", "1e-4", "0.0001"),
        ("training.num_train_epochs", "1", "1.0"),
        ("training.max_steps", "3", "0x3"),
        ("training.warmup_steps", "0", "0.0"),
        ("gere.margin_weight", "100", "1e2"),
        ("gere.margin_weight", "dy", "dynamic"),
        ("training.bf16", "true", "yes"),
        ("evaluation.test_limit", "null", "~"),
        ("training.optim", "adamw_torch", "'adamw_torch'"),
        ("name", "run", "'run'"),
    ],
)
def test_grid_values_equal_once_read_are_refused(setup, tmp_path, key, a, b):
    cells = grid_cells(parse_grid([f"{key}={a},{b}"]))
    with pytest.raises(GeReError, match=r"the sweep cells .* give the same run \(their values are equal once read\)"):
        run_sweep(sweep_loader(setup / "run.yaml", []), cells, [0], tmp_path / "sweep", progress=False, run=never_run)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    ("objective", "grid", "inert"),
    [("ce", "gere.margin_weight=1,10,dy", "gere.margin_weight"), ("none", "gere.margin_weight=1,100", "gere.margin_weight"),
     ("ce+kl", "gere.threshold_k=0.5,1", "gere.threshold_k")],
)  # fmt: skip
def test_grid_values_a_method_ignores_are_refused_as_one_run(setup, tmp_path, objective, grid, inert):
    load = sweep_loader(setup / "run.yaml", [f"gere.objective={objective}"])
    with pytest.raises(GeReError, match=rf"give the same run \({inert}.* change nothing for gere.objective '{re.escape(objective)}'"):
        run_sweep(load, grid_cells(parse_grid([grid])), [0], tmp_path / "sweep", progress=False, run=never_run)
    assert not (tmp_path / "sweep").exists()


def test_grid_values_a_method_uses_are_kept_apart(setup, tmp_path):
    """The same weights with the margin are different runs: the plan holds every cell."""
    from gere.continual.sweep import plan_sweep

    load = sweep_loader(setup / "run.yaml", ["gere.objective=ce+tm"])
    plan = plan_sweep(load, grid_cells(parse_grid(["gere.margin_weight=1,10,dy"])), [0], tmp_path / "sweep")
    assert [cfg.gere.margin_weight for *_, cfg in plan] == [1.0, 10.0, "dy"]


def test_seed_in_a_grid_points_to_seeds():
    with pytest.raises(GeReError, match="seeds are given with --seeds 1,2"):
        parse_grid(["seed=1,2"])


def test_the_cli_refuses_a_bad_grid_before_any_run(setup, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", str(setup / "run.yaml"), "--grid", "training.max_steps=1,0", "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    assert "training.max_steps = 0 is not valid" in capsys.readouterr().err
    assert not out.exists()
    argv = ["sweep", str(setup / "run.yaml"), "--grid", "training.learning_rate=0.01,1e-2", "--out", str(out)]
    assert main(argv) == 2
    assert "give the same run" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("keys", [1, 4, 12])
def test_a_long_cell_label_gets_a_folder_name_the_file_system_takes(keys):
    label = ",".join(f"section.some_long_setting_name_{i}={'v' * 20}" for i in range(keys))
    folder = Cell(label, ()).folder
    assert len(folder.encode()) <= 200
    assert folder == Cell(label, ()).folder and (len(label) <= 200) == (folder == label)
    assert Cell(label + "x", ()).folder != folder


# ----------------------------------------------------------------------------------------- output paths


def test_output_paths_the_system_would_refuse_are_found_without_writing(tmp_path):
    ok = check_output_dir(tmp_path / ("n" * 255) / "run")
    assert ok == tmp_path / ("n" * 255) / "run"
    refusals = {
        "holds a name of 256 bytes": tmp_path / ("n" * 256),
        "holds a NUL byte": f"{tmp_path}/a\0b",
        "is a file, not a folder": tmp_path / "file" / "run",
        "bytes long as an absolute path": tmp_path / "/".join(["d" * 200] * 21),
    }
    (tmp_path / "file").write_text("x")
    for message, path in refusals.items():
        with pytest.raises(GeReError, match=message) as err:
            check_output_dir(path)
        assert len(str(err.value)) < 500
    assert files_under(tmp_path) == ["file"]  # checked without creating anything


@pytest.mark.parametrize("extra", [-2, -1, 0, 1, 2])
def test_the_deepest_file_a_run_writes_decides_the_path_limit(tmp_path, extra):
    path_max = os.pathconf(tmp_path, "PC_PATH_MAX")
    base = len(os.fsencode(str(tmp_path))) + 1
    room = path_max - base - RUN_DEPTH - 1 + extra  # the folder name that leaves exactly the run's depth
    names = [("d" * 200)] * (room // 201) + ["e" * (room % 201 or 1)]
    folder = tmp_path / "/".join(names)
    total = len(os.fsencode(str(folder))) + RUN_DEPTH
    if total < path_max:
        check_output_dir(folder, inside=RUN_DEPTH)
    else:
        with pytest.raises(GeReError, match="PATH_MAX"):
            check_output_dir(folder, inside=RUN_DEPTH)


def test_a_too_long_output_dir_is_refused_before_the_model_loads_or_anything_is_written(setup, tmp_path, capsys):
    out = tmp_path / "/".join(["x" * 200] * 20)  # 4,000+ characters, as a new user typed
    assert main(["run", str(setup / "run.yaml"), "--output-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "output_dir" in err and "PATH_MAX" in err and "Traceback" not in err
    assert files_under(tmp_path) == []


def test_a_missing_model_is_refused_before_anything_is_written(setup, tmp_path):
    cfg = load_run_config(setup / "run.yaml", [f"output_dir={tmp_path / 'run'}", "model=/nowhere/model"])
    with pytest.raises(GeReError, match="model path /nowhere/model does not exist"):
        run_continual(cfg, progress=False)
    assert files_under(tmp_path) == []


@pytest.mark.parametrize(
    ("names", "message"),
    [(["mood", "mood"], "tasks 1 and 2 are both named 'mood'"), (["mood", "a|b"], r"task 2's name 'a\|b' holds \|"),
     (["mo\nod", "compass"], r"task 1's name .* holds \\n"), (["mood", "c\tx"], r"holds \\t")],
)  # fmt: skip
def test_task_names_that_would_mix_or_break_the_report_are_refused_before_any_work(setup, tmp_path, names, message):
    tasks = f"tasks=[{{source: {setup / 'mood'}, name: {json.dumps(names[0])}}}, {{source: {setup / 'compass'}, name: {json.dumps(names[1])}}}]"
    cfg = load_run_config(setup / "run.yaml", [f"output_dir={tmp_path / 'run'}", tasks])
    assert [s.name for s in cfg.task_specs()] == names
    with pytest.raises(GeReError, match=message):
        run_continual(cfg, progress=False)
    assert files_under(tmp_path) == []


# ------------------------------------------------------------------------------------ evaluation inputs

EMPTY_SETS = {
    "empty.jsonl": "",
    "blank.jsonl": "\n\n   \n",
    "empty-texts.jsonl": '{"text": ""}\n{"text": "   "}\n',
    "blank.txt": "\n\n \n\n",
    "one-token.jsonl": '{"text": "river"}\n{"text": "the"}\n',  # nothing to predict after the first token
    "empty.json": "[]",
    "header-only.csv": "text\n",
}


@pytest.mark.parametrize("name", sorted(EMPTY_SETS))
def test_a_perplexity_set_with_nothing_to_score_is_refused_before_extraction(setup, tmp_path, name):
    source = tmp_path / name
    source.write_text(EMPTY_SETS[name])
    out = tmp_path / "run"
    cfg = load_run_config(setup / "run.yaml", [f"output_dir={out}", "gere.objective=ce+tm",
                                               f"gere.replay_source={setup / 'replay.jsonl'}",
                                               f"evaluation.perplexity_sets={{held: {source}}}"])  # fmt: skip
    with pytest.raises(GeReError, match=rf"evaluation.perplexity_sets.held.*{name}"):
        run_continual(cfg, progress=False)
    assert not out.exists()  # no config.yaml, no gere_store/, not even the folder


@pytest.mark.parametrize(
    "override, file, message",
    [
        ("evaluation.general_mc", "", r"evaluation.general_mc: .*probe.jsonl holds no questions"),
        ("evaluation.general_mc", "\n  \n", r"probe.jsonl holds no questions"),
        ("evaluation.mc_shots", "3", r"evaluation.mc_shots = 3 needs solved examples"),
    ],
)
def test_a_probe_with_nothing_to_ask_is_refused_before_any_work(setup, tmp_path, override, file, message):
    probe = tmp_path / "probe.jsonl"
    question = {"question": "the river is", "choices": ["north", "south"], "answer": 0}
    probe.write_text(file if override.endswith("general_mc") else json.dumps(question) + "\n")
    extra = [f"{override}={file}"] if override.endswith("shots") else []
    out = tmp_path / "run"
    cfg = load_run_config(setup / "run.yaml", [f"output_dir={out}", f"evaluation.general_mc={probe}", *extra])
    with pytest.raises(GeReError, match=message):
        run_continual(cfg, progress=False)
    assert not out.exists()


# --------------------------------------------------------------------------------------------- resuming


def test_a_run_resumes_from_its_own_config_yaml(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    cfg = load_run_config(setup / "run.yaml", [f"output_dir={out}"])
    with crash_in_second_task(monkeypatch):
        run_continual(cfg, progress=False)
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["training"]["warmup_steps"] == 0  # an int default of a float setting: read back as 0.0
    assert main(["run", str(out / "config.yaml"), "--resume", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["accuracy_matrix"]) == 3 and [h["task"] for h in results["loss_history"]] == ["mood", "compass"]
    # The tiny tasks' test rows are their training rows: said in the log and under Warnings in report.md.
    report = (out / "report.md").read_text()
    assert "## Warnings" in report and "task 'mood': 8 of 8 test examples are also training inputs" in report
    assert any("test examples are also training inputs" in w for w in results["input_warnings"])


@pytest.mark.parametrize(
    "override, named",
    [
        ("training.learning_rate=0.02", "training.learning_rate: 0.01 -> 0.02"),
        ("gere.objective=ce", "gere.objective: 'none' -> 'ce'"),
        ("seed=3", "seed: 0 -> 3"),
        ("evaluation.perplexity_sets={}", "evaluation.perplexity_sets.heldout: '"),
        ("per_task={mood: {max_steps: 2}}", "per_task.mood.max_steps: (not set) -> 2"),
        ("tasks=[{source: SETUP/mood}]", "tasks[1].instruction: 'pick one' -> (not set)"),
    ],
)
def test_a_refused_resume_names_the_settings_that_differ_and_never_advises_discarding(setup, tmp_path, override, named):
    out = tmp_path / "run"
    started = load_run_config(setup / "run.yaml", [f"output_dir={out}"])
    claim(started, fresh=True)  # config.yaml, as a run writes it when it starts
    (out / "run_state.json").write_text(json.dumps({"config_digest": config_digest(started), "stages_done": 1}))
    changed = load_run_config(setup / "run.yaml", [f"output_dir={out}", override.replace("SETUP", str(setup))])
    with pytest.raises(GeReError) as err:
        existing_state(changed, resume=True, overwrite=False)
    message = str(err.value)
    assert "holds a run of another config (these settings differ: " in message and named in message, message
    assert "--overwrite" not in message and f"gere run {out / 'config.yaml'} --resume" in message
    assert existing_state(started, resume=True, overwrite=False)["stages_done"] == 1  # its own config resumes


# ------------------------------------------------------------------------------------------ label words


def label_task(root: Path, labels: list[str], name: str = "words") -> Path:
    """A task folder whose rows use ``labels`` in turn."""
    folder = root / name
    folder.mkdir()
    for split, n in (("train", 8), ("test", 4)):
        rows = [{"input": f"the river {i} is", "label": labels[i % len(labels)]} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "task.json").write_text(json.dumps({"name": name, "instruction": "pick one", "labels": labels}))
    return folder


def test_a_label_whose_tokens_begin_another_is_never_predicted_so_it_is_refused(setup, tmp_path):
    """The reason, by hand: the scorer sums log-likelihoods, so 'good!' scores 'good''s score plus log p('!')."""
    from gere.continual.evaluation import score_labels, sequence_logprobs
    from gere.modeling import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(setup / "model"))
    prompts = [f"pick one Option: good, good! \nthe river {i} is\nAnswer:" for i in range(6)]
    assert score_labels(model, tok, prompts, ["good!", "good"]) == [1] * 6  # the longer one never wins
    for prompt in prompts:
        ids = tok(prompt)["input_ids"]
        short, long = sequence_logprobs(model, tok, [(ids, [tok.convert_tokens_to_ids("good")]),
                                                     (ids, tok.convert_tokens_to_ids(["good", "!"]))])  # fmt: skip
        bang = sequence_logprobs(model, tok, [(ids + [tok.convert_tokens_to_ids("good")], [tok.convert_tokens_to_ids("!")])])[0]
        assert long == pytest.approx(short + bang, abs=1e-5) and bang < 0
    out = tmp_path / "run"
    cfg = load_run_config(setup / "run.yaml", [f"output_dir={out}", "gere.objective=ce+tm",
                                               f"gere.replay_source={setup / 'replay.jsonl'}",
                                               f"tasks=[{{source: {label_task(tmp_path, ['good', 'good!'])}}}]"])  # fmt: skip
    with pytest.raises(GeReError) as err:
        run_continual(cfg, progress=False)
    message = str(err.value)
    assert message.startswith("task 'words': the label words 'good' and 'good!' give the tokens ['good'] (ids")
    assert "['good', '!']" in message and "never predicted" in message and "evaluation.method: generate" in message
    assert not out.exists()  # no store extracted, no base evaluation, not even the folder


def test_labels_that_tokenize_alike_are_refused_before_any_work(setup, tmp_path):
    out = tmp_path / "run"
    task = label_task(tmp_path, ["café", "naïve"])  # neither is a word of the tiny tokenizer: both <unk>
    cfg = load_run_config(setup / "run.yaml", [f"output_dir={out}", f"tasks=[{{source: {task}}}]"])
    with pytest.raises(GeReError, match=r"task 'words': the label words 'café' and 'naïve' give the tokens "
                       r"\['<unk>'\] \(ids \[2\]\) and \['<unk>'\] \(ids \[2\]\), the same, so the scorer cannot tell "
                       r"them apart \('café' always wins\); rename one"):  # fmt: skip
        run_continual(cfg, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("seed", range(40))
def test_generated_label_sets_are_refused_exactly_when_two_cannot_be_told_apart(setup, seed):
    """Sets of 2-4 labels from known words, punctuation and unknown words; the reference tokenizes each label
    on its own and compares the token lists pair by pair."""
    import random

    from gere.continual.preflight import check_label_words
    from gere.continual.tasks import TaskSpec
    from gere.modeling import load_model_and_tokenizer

    _, tok = load_model_and_tokenizer(str(setup / "model"))
    rng = random.Random(seed)
    pieces = ["good", "bad", "north", "good!", "good !", "bad.", "zebra", "quokka", "river city", "river"]
    labels = rng.sample(pieces, rng.randint(2, 4))
    ids = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in labels]
    same = any(a == b for i, a in enumerate(ids) for b in ids[i + 1 :])
    prefix = any(a[: len(b)] == b or b[: len(a)] == a for i, a in enumerate(ids) for b in ids[i + 1 :])
    spec = TaskSpec(name="words", source="inline", instruction="pick one", labels=labels)
    for method, refused in (("label", prefix), ("generate", same)):
        cfg = load_run_config(setup / "run.yaml", [f"evaluation.method={method}"])
        if refused:
            with pytest.raises(GeReError, match="task 'words': the label words"):
                check_label_words(cfg, [spec], tok)
        else:
            check_label_words(cfg, [spec], tok)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["training.max_length=3"], r"needs 4, more than training.max_length = 3; raise max_length in the training "
                                 r"section to 4 or more"),
     (["per_task={words: {max_length: 3}}"], r"needs 4, more than per_task.words.max_length = 3; raise max_length in "
                                             r"the per_task.words section to 4"),
     (["evaluation.max_length=2"], r"needs 3 with a prompt token, more than evaluation.max_length = 2; raise "
                                   r"max_length in the evaluation section to 3"),
     (["evaluation.method=generate", "evaluation.max_length=4"], r"needs 5 with a prompt token, more than "
                                                                 r"evaluation.max_length = 4")],
)  # fmt: skip
def test_a_label_longer_than_max_length_is_refused_before_extraction_naming_the_section(setup, tmp_path, overrides,
                                                                                      message):  # fmt: skip
    out = tmp_path / "run"
    task = label_task(tmp_path, ["river city", "north"])  # 2 tokens and 1
    cfg = load_run_config(setup / "run.yaml", [f"output_dir={out}", "gere.objective=ce+tm", *overrides,
                                               f"gere.replay_source={setup / 'replay.jsonl'}",
                                               f"tasks=[{{source: {task}}}]"])  # fmt: skip
    with pytest.raises(GeReError, match=rf"task 'words': the label 'river city' is 2 tokens.*{message}"):
        run_continual(cfg, progress=False)
    assert not out.exists()


# ------------------------------------------------------------------------------------ a read-only store


def read_only_prefix(folder: Path) -> list[str] | None:
    """A command prefix that runs a command with ``folder`` read-only to it: a read-only bind mount in a private
    mount namespace for root (to whom file modes do not apply), the folder's write bits taken away for anyone
    else; None where neither can be made here."""
    if os.geteuid() != 0:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        return []
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"'
    prefix = ["unshare", "-m", "sh", "-c", script, str(folder)]
    if not shutil.which("unshare") or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        return None
    return prefix


def test_a_finished_store_on_a_read_only_file_system_is_reused(setup, tmp_path):
    """Reuse only reads a finished store, so it may lie on a read-only file system (it was refused as an
    output folder that cannot be written); building one there is still refused before any work."""
    store = tmp_path / "store"
    sets = ["gere.objective=ce+tm", f"gere.replay_source={setup / 'replay.jsonl'}", "gere.num_replay_samples=8",
            "gere.replay_max_length=32", f"gere.store_dir={store}"]  # fmt: skip
    run_continual(load_run_config(setup / "run.yaml", [*sets, f"output_dir={tmp_path / 'first'}"]), progress=False)
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    prefix = read_only_prefix(store)
    if prefix is None:
        pytest.skip("no read-only file system can be made here (root without unshare and mount)")
    gere = str(Path(sys.executable).with_name("gere"))

    def run(out: str, *more: str) -> subprocess.CompletedProcess:
        argv = [gere, "run", str(setup / "run.yaml"), "--no-progress", "--output-dir", str(tmp_path / out)]
        return subprocess.run([*prefix, *argv, *[x for s in [*sets, *more] for x in ("--set", s)]],
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    reused = run("second")
    assert reused.returncode == 0, reused.stderr[-2000:]
    assert json.loads((tmp_path / "second" / "results.json").read_text())["tasks"] == ["mood", "compass"]
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before
    rebuilt = run("third", "gere.reuse_store=false")  # a rebuild writes there: refused by name, nothing written
    assert rebuilt.returncode == 2 and f"gere.store_dir '{store}' cannot be created: {store} is" in rebuilt.stderr
    assert "choose a writable folder" in rebuilt.stderr and not (tmp_path / "third").exists()
