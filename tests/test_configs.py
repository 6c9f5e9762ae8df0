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
    recorded = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    assert same_config({"config_digest": recorded}, cfg)
    changed = load_run_config(Path(__file__).parent.parent / "configs" / "cl15_order4.yaml",
                              ["benchmark.tasks=[mnli, cb]"])  # fmt: skip
    assert config_digest(changed) != config_digest(cfg), "set, they are part of the run's identity"
    measured = load_run_config(Path(__file__).parent.parent / "configs" / "cl15_order4.yaml",
                               ["gere.grad_share_every=4"])  # fmt: skip
    assert config_digest(measured) != config_digest(cfg)
    assert not same_config({"config_digest": recorded}, measured)
