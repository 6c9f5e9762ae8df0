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
        ({"gere": {"objectiv": "ce"}}, r"unknown key\(s\) \['objectiv'\]"),
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
