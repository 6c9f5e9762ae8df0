import json

import pytest
import torch
import yaml

from gere.continual.run_config import load_run_config
from gere.errors import GeReError
from gere.precision import cpu_flags, parse_bf16, resolve_bf16

from tiny_runs import run, whole_and_resumed


def test_parse_bf16_takes_auto_and_booleans_and_refuses_the_rest():
    assert parse_bf16("auto") == "auto" and parse_bf16(" AUTO ") == "auto"
    assert parse_bf16(True) is True and parse_bf16("false") is False and parse_bf16("yes") is True
    with pytest.raises(GeReError, match="auto, true or false"):
        parse_bf16("maybe")


def test_cpu_flags_read_from_a_cpuinfo_file(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert {"avx2", "avx512_bf16"} <= cpu_flags(info)
    assert cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize("flags,expected", [({"avx2", "avx512_bf16"}, True), ({"avx2", "amx_bf16"}, True),
                                            ({"avx2", "avx512f"}, False), (set(), False)])  # fmt: skip
def test_auto_uses_bf16_only_on_cpus_that_compute_it_natively(flags, expected):
    chosen = resolve_bf16("auto", device="cpu", flags=flags)
    assert chosen.bf16 is expected and chosen.reason.startswith("auto: ")
    assert ("avx512_bf16" in chosen.reason or "amx_bf16" in chosen.reason) if expected else "emulated" in chosen.reason


def test_true_and_false_force_the_choice_whatever_the_hardware():
    assert resolve_bf16(True, device="cpu", flags=set()).bf16 is True
    assert resolve_bf16(False, device="cpu", flags={"avx512_bf16"}).bf16 is False


def test_run_config_bf16_defaults_to_auto_and_refuses_nonsense(setup, tmp_path):
    config = yaml.safe_load((setup / "run.yaml").read_text())
    del config["training"]["bf16"]  # the tests' run pins fp32; a config that says nothing gets auto
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert load_run_config(tmp_path / "run.yaml").training.bf16 == "auto"
    assert load_run_config(setup / "run.yaml", ["training.bf16=true"]).training.bf16 is True
    with pytest.raises(GeReError, match="training.bf16"):
        load_run_config(setup / "run.yaml", ["training.bf16=sometimes"])


def test_a_forced_bf16_run_trains_under_autocast_and_records_its_precision(setup, tmp_path, monkeypatch, capsys):
    import gere.continual.runner as runner

    seen = []
    original = runner.GeReTrainer.compute_loss

    def spy(self, model, inputs, *a, **k):
        # Under bf16 the prepared model's forward runs under autocast: its linear layers compute in bf16.
        linear = next(m for m in self.model.modules() if isinstance(m, torch.nn.Linear))
        hook = linear.register_forward_hook(lambda mod, i, out: seen.append(out.dtype == torch.bfloat16))
        try:
            return original(self, model, inputs, *a, **k)
        finally:
            hook.remove()

    monkeypatch.setattr(runner.GeReTrainer, "compute_loss", spy)
    results = run(setup, tmp_path / "r", "training.bf16=true", "gere.objective=ce+tm")
    assert seen and all(seen)
    assert results["provenance"]["precision"] == "bf16"
    assert json.loads((tmp_path / "r" / "run_state.json").read_text())["precision"] == "bf16"
    assert "training precision: bf16 autocast (training.bf16: true)" in capsys.readouterr().out
    seen.clear()
    fp32 = run(setup, tmp_path / "f", "training.bf16=false", "gere.objective=ce+tm")
    assert seen and not any(seen) and fp32["provenance"]["precision"] == "fp32"


def test_a_bf16_run_resumed_after_a_crash_ends_as_an_uninterrupted_one(setup, tmp_path, monkeypatch):
    # Each stage's Trainer prepares the model (an autocast forward); the run gives it back unprepared, so
    # the model that trained task 1 in this process and the one a resumed run loads from the checkpoint
    # compute the evaluation and task 2's LwF targets alike (fp32) and train task 2 alike (bf16).
    args = ("gere.objective=ce+tm", "lwf.weight=1", "lwf.topk=8", "keep_checkpoints=0", "training.bf16=true")
    whole, resumed = whole_and_resumed(setup, tmp_path, monkeypatch, *args)
    assert whole["provenance"]["precision"] == resumed["provenance"]["precision"] == "bf16"
    assert resumed["loss_history"] == whole["loss_history"]
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed["general"] == whole["general"]
