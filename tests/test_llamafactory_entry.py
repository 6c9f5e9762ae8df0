"""gere-lf's config handling (no LLaMA-Factory needed); the real runs are in tests_lf/ (`make test-lf`)."""

import pytest
import yaml

from gere.errors import GeReError
from gere.integrations.llamafactory import main, read_config


def write(tmp_path, cfg) -> str:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_the_gere_block_becomes_a_config_and_overrides_reach_it(tmp_path):
    path = write(tmp_path, {"stage": "sft", "learning_rate": 1e-4,
                            "gere": {"replay_source": "r.jsonl", "objective": "ce+tm", "check_store_model": False}})  # fmt: skip
    args, gere, trainer_kwargs = read_config(path, ["gere.margin_weight=100", "learning_rate=2e-5"])
    assert "gere" not in args and args["learning_rate"] == 2e-5
    assert gere.margin_weight == 100.0 and gere.parts == ("ce", "tm")
    assert trainer_kwargs == {"check_store_model": False}
    assert args["use_reentrant_gc"] is False, "replay needs non-reentrant checkpointing under DDP"
    args, _, _ = read_config(path, ["use_reentrant_gc=true"])
    assert args["use_reentrant_gc"] is True, "the user's own choice stands"


@pytest.mark.parametrize(
    "cfg,words",
    [
        ({"stage": "sft"}, "no gere: block"),
        ({"stage": "dpo", "gere": {}}, "stage: sft"),
        ({"gere": {"objectiv": "ce"}}, r"unknown config key\(s\) gere.objectiv; allowed here: .*objective"),
        ({"gere": {"num_replay_samples": "many"}}, r"gere.num_replay_samples: expected int, got str"),
        ({"gere": {"objective": "ce+zz"}}, "objective"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, cfg, words):
    with pytest.raises(GeReError, match=words):
        read_config(write(tmp_path, cfg), [])
    with pytest.raises(GeReError, match="not key=value"):
        read_config(write(tmp_path, {"gere": {}}), ["learning_rate"])


def test_without_llamafactory_the_command_says_how_to_get_it(tmp_path, capsys):
    pytest.importorskip("gere")
    try:
        import llamafactory  # noqa: F401

        pytest.skip("LLaMA-Factory is installed here")
    except ImportError:
        pass
    assert main(["train", write(tmp_path, {"gere": {"replay_source": "r.jsonl"}})]) == 2
    assert "needs LLaMA-Factory" in capsys.readouterr().err
    assert main(["run"]) == 2 and "usage: gere-lf train" in capsys.readouterr().err


def stand_in_llamafactory(root, tuner_source: str):
    """A package named llamafactory whose tuner module runs ``tuner_source`` on import: LLaMA-Factory installed
    but failing to import, as it does without torchaudio on a CPU machine (the real one: `make test-lf`)."""
    for folder in ("llamafactory", "llamafactory/train", "llamafactory/train/sft"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "__init__.py").write_text("")
    (root / "llamafactory/train/tuner.py").write_text(tuner_source)
    (root / "llamafactory/train/sft/workflow.py").write_text("")
    return root


def gere_lf(tmp_path, packages):
    import os
    import subprocess
    import sys

    path = write(tmp_path, {"gere": {"replay_source": "r.jsonl"}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(packages), *sys.path])}
    return subprocess.run([sys.executable, "-m", "gere.integrations.llamafactory", "train", path], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.parametrize(
    "source,words",
    [
        ("import torchaudio\n", ["needs the module 'torchaudio', which is missing",
                                 "pip install the torchaudio built for your torch", "stand-in module"]),
        ("import gere_no_such_dependency\n", ["needs the module 'gere_no_such_dependency'",
                                              "pip install gere_no_such_dependency in this environment"]),
        ("from json import no_such_name\n", ["installed but does not import (ImportError: cannot import name",
                                             "tested with llamafactory 0.9.5"]),
    ],
)
def test_an_installed_llamafactory_that_fails_to_import_is_named_with_the_fix(tmp_path, source, words):
    import importlib.util

    if importlib.util.find_spec("llamafactory") or (source.startswith("import torchaudio")
                                                     and importlib.util.find_spec("torchaudio")):  # fmt: skip
        pytest.skip("needs an environment without LLaMA-Factory (and without torchaudio)")
    done = gere_lf(tmp_path, stand_in_llamafactory(tmp_path / "packages", source))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "needs LLaMA-Factory" not in done.stderr and "Traceback" not in done.stderr
    for word in words:
        assert word in done.stderr, done.stderr
