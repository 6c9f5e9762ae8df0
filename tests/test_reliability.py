"""Bad input and failed writes: every refusal names the problem and the fix (CLI exit 2), and a write that
fails midway leaves every earlier artifact intact and resumable. Crashes of a real process are in
tests/test_crash_resume.py; the table of everything tried is docs/reliability.md.
"""

import ast
import errno
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_crash_resume import build_run_folder
from transformers import PreTrainedTokenizerFast

import gere
import gere.continual.checkpoint as checkpoint
import gere.continual.runner as runner
from gere.cli import main
from gere.continual.checkpoint import load_checkpoint
from gere.continual.run_config import load_run_config
from gere.continual.runner import run_continual
from gere.errors import GeReError
from gere.io_utils import atomic_path
from gere.modeling import load_model_and_tokenizer
from gere.replay.replay_set import ReplaySet
from gere.store import StoreSpec, extract_store, open_store

from tiny import replay_texts, tiny_llama, tiny_tokenizer
from tiny_runs import tmpfs

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return build_run_folder(tmp_path_factory.mktemp("reliability"))


def variant(config: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the run config with top-level keys replaced."""
    data = yaml.safe_load(config.read_text())
    data.update(changes)
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli_run(config: Path, out: Path, *flags: str) -> int:
    return main(["run", str(config), "--output-dir", str(out), "--no-progress", *flags])


def leftovers(folder: Path) -> list[str]:
    """Temporary names (atomic writes, checkpoint folders) still on disk: a failed write must remove them."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name.endswith(".tmp"))


def assert_stage_one_intact(out: Path, config: Path) -> None:
    """run_state.json is the valid state after stage 1, and checkpoint 1 loads into a fresh model."""
    state = json.loads((out / "run_state.json").read_text())
    assert state["stages_done"] == 1 and len(state["accuracy_matrix"]) == 2
    stage = out / "checkpoints" / "stage-1"
    model = tiny_llama()
    base = model.model.embed_tokens.weight.detach().clone()
    load_checkpoint(stage, model, load_run_config(config))
    saved = load_file(str(stage / "weights.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(model.model.embed_tokens.weight, saved) and not torch.equal(saved, base)


# ------------------------------------------------------------------------------------------ failed writes


@pytest.mark.parametrize("failing", ["checkpoint", "run_state"])
def test_disk_full_after_stage_two_keeps_stage_one_and_resumes(config, tmp_path, monkeypatch, failing):
    """The disk fills while stage 2's checkpoint (or the run state after it) is half written."""
    out = tmp_path / "run"
    if failing == "checkpoint":
        real = checkpoint.save_file

        def save_file(tensors, filename, *args, **kwargs):
            if ".stage-2.tmp" in filename and filename.endswith("weights.safetensors"):
                Path(filename).write_bytes(b"\0" * 64)  # some bytes reached the disk, then it was full
                raise ENOSPC
            return real(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(checkpoint, "save_file", save_file)
    else:
        real = runner.atomic_write_json

        def atomic_write_json(path, obj):
            if Path(path).name == runner.STATE_FILE and obj["stages_done"] == 2:
                with atomic_path(path) as tmp:
                    tmp.write_text('{"config_digest": "')
                    raise ENOSPC
            return real(path, obj)

        monkeypatch.setattr(runner, "atomic_write_json", atomic_write_json)

    # A checkpoint the disk had no room for is said in one line (tests/test_checkpoint.py, on a real tmpfs).
    with pytest.raises(GeReError if failing == "checkpoint" else OSError) as failed:
        run_continual(load_run_config(config, [f"output_dir={out}"]), progress=False)
    if failing == "checkpoint":
        assert str(failed.value).startswith("the disk is full: the checkpoint of stage 2 did not fit in ")
    else:
        assert failed.value.errno == errno.ENOSPC
    assert_stage_one_intact(out, config)
    assert leftovers(out) == []
    assert not (out / "results.json").exists()
    # A finished stage-2 checkpoint that run_state.json does not name yet is simply redone on resume.
    assert (out / "checkpoints" / "stage-2").exists() == (failing == "run_state")
    monkeypatch.undo()
    results = run_continual(load_run_config(config, [f"output_dir={out}"]), resume=True, progress=False)
    assert results["stages"] == ["base", "after mood", "after compass"]
    assert json.loads((out / "run_state.json").read_text())["stages_done"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["stage-1", "stage-2"]  # every stage kept


def test_checkpoint_is_written_while_the_body_runs_and_a_failing_body_leaves_none(config, tmp_path):
    """`checkpoint_beside`: the weights reach the disk while the body runs (the runner evaluates there); the
    RNG state is taken after it; a body that fails leaves no checkpoint and no temporary folder."""
    import time

    cfg, model = load_run_config(config), tiny_llama()
    weights = tmp_path / "checkpoints" / ".stage-1.tmp" / "weights.safetensors"
    with checkpoint.checkpoint_beside(tmp_path, 1, model, cfg):
        deadline = time.monotonic() + 60
        while not weights.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert weights.exists()  # written by the thread, inside the body
        torch.rand(3)  # the RNG moves on in the body: the checkpoint keeps the state after it
        after_body = torch.get_rng_state()
    stage = checkpoint.checkpoint_dir(tmp_path, 1)
    assert torch.equal(load_file(str(stage / "rng.safetensors"))["torch_rng"], after_body)
    tensors = len(load_file(str(stage / "weights.safetensors")))
    assert json.loads((stage / "checkpoint.json").read_text()) == {"stage": 1, "finetuning": "full", "tensors": tensors}
    with pytest.raises(RuntimeError, match="evaluation failed"):
        with checkpoint.checkpoint_beside(tmp_path, 2, model, cfg):
            raise RuntimeError("evaluation failed")
    assert not checkpoint.checkpoint_dir(tmp_path, 2).exists() and leftovers(tmp_path) == []


def test_disk_full_while_finishing_the_store_keeps_extraction_and_trusts_nothing(tmp_path, monkeypatch):
    model, tok = tiny_llama(), tiny_tokenizer()
    replay_set = ReplaySet(tuple(f"r{i}" for i in range(8)), tuple(replay_texts(8)))
    spec = StoreSpec(max_length=16, batch_size=4)
    clean = extract_store(model, tok, replay_set, tmp_path / "clean", spec, progress=False)

    def write_array(fp, array, *args, **kwargs):  # tokens.npy: the header goes out, then the disk is full
        fp.write(b"\x93NUMPY\x01\x00v\x00")
        raise ENOSPC

    monkeypatch.setattr(np.lib.format, "write_array", write_array)
    store_dir = tmp_path / "store"
    with pytest.raises(OSError) as failed:
        extract_store(model, tok, replay_set, store_dir, spec, progress=False)
    assert failed.value.errno == errno.ENOSPC
    assert not (store_dir / "manifest.json").exists() and not (store_dir / "tokens.npy").exists()
    assert leftovers(store_dir) == []
    assert json.loads((store_dir / "partial" / "progress.json").read_text())["done"] == [0, 1]
    with pytest.raises(GeReError, match="no finished activation store.*run `gere extract`"):
        open_store(store_dir)
    monkeypatch.undo()
    # Every batch's states survived: the retry runs no forward pass (stop_after_batches=0 would stop one).
    again = extract_store(model, tok, replay_set, store_dir, spec, progress=False, stop_after_batches=0)
    assert again.manifest["files"] == clean.manifest["files"]
    assert not (store_dir / "partial").exists()


# ------------------------------------------------------------------------------------------ bad input


def _without(tokenizer, *, pad: bool = True, eos: bool = True) -> PreTrainedTokenizerFast:
    special = {"unk_token": "<unk>"}
    if pad:
        special["pad_token"] = "<pad>"
    if eos:
        special["eos_token"] = "<eos>"
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, **special)


def test_tokenizer_without_pad_pads_with_eos_and_stores_the_same_states(tmp_path):
    model, tok = tiny_llama(), tiny_tokenizer()
    no_pad = _without(tok, pad=False)
    assert no_pad.pad_token is None and no_pad.bos_token is None
    replay_set = ReplaySet(tuple(f"r{i}" for i in range(6)), tuple(replay_texts(6)))
    spec = StoreSpec(max_length=16, batch_size=3)
    with_pad = extract_store(model, tok, replay_set, tmp_path / "a", spec, progress=False)
    padded_with_eos = extract_store(model, no_pad, replay_set, tmp_path / "b", spec, progress=False)
    # Padding sits behind the causal mask: the stored states are byte-identical whatever id fills it.
    assert padded_with_eos.manifest["files"] == with_pad.manifest["files"]


def test_tokenizer_without_eos_is_refused_before_extraction(config, tmp_path, capsys):
    folder = tmp_path / "no-eos"
    tiny_llama().save_pretrained(folder)
    _without(tiny_tokenizer(), eos=False).save_pretrained(folder)
    out = tmp_path / "run"
    assert cli_run(config, out, "--model", str(folder)) == 2
    err = capsys.readouterr().err
    assert "has no eos token" in err and "add_special_tokens({'eos_token'" in err
    assert not (out / "gere_store").exists()  # refused before the extraction pass, not after it


def test_tokenizer_without_pad_or_eos_is_refused_by_extract(tmp_path, capsys):
    folder = tmp_path / "bare"
    tiny_llama().save_pretrained(folder)
    _without(tiny_tokenizer(), pad=False, eos=False).save_pretrained(folder)
    replay = tmp_path / "replay.jsonl"
    replay.write_text("".join(json.dumps({"text": t}) + "\n" for t in replay_texts(4)))
    assert main(["extract", "--model", str(folder), "--replay-source", str(replay), "--store-dir",
                 str(tmp_path / "s")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "neither a pad token nor an eos token" in err and "add_special_tokens" in err


def test_task_with_one_class_is_refused(config, tmp_path, capsys):
    folder = tmp_path / "one-class"
    folder.mkdir()
    rows = [{"input": f"the river {i} is good", "label": "good"} for i in range(6)]
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"source": str(folder), "name": "solo", "instruction": "pick one", "labels": ["good", "bad"]}
    out = tmp_path / "run"
    assert cli_run(variant(config, tmp_path, tasks=[task]), out) == 2
    err = capsys.readouterr().err
    assert "task 'solo'" in err and "only the class ['good']" in err and "label_field" in err
    assert not (out / "gere_store").exists()


def test_replay_longer_than_the_context_is_refused(config, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_run(config, out, "--set", "gere.replay_max_length=1000") == 2
    err = capsys.readouterr().err
    assert "replay max length 1000 is longer than the model's context (256 positions)" in err
    assert "set gere.replay_max_length (--set gere.replay_max_length=...) to 256 or less" in err  # gere run's way
    assert not (out / "gere_store").exists()
    data = yaml.safe_load(config.read_text())
    assert main(["extract", "--model", data["model"], "--replay-source", data["gere"]["replay_source"],
                 "--replay-max-length", "1000", "--store-dir", str(tmp_path / "s")]) == 2  # fmt: skip
    assert "pass --replay-max-length 256 or less" in capsys.readouterr().err  # gere extract's flag
    model, tok = load_model_and_tokenizer(data["model"])
    with pytest.raises(GeReError, match="set replay_max_length to 256 or less") as python:  # Python's name
        extract_store(model, tok, ReplaySet(("a",), ("the river city",)), tmp_path / "p", StoreSpec(max_length=1000))
    assert "--" not in str(python.value)


def test_nan_loss_in_a_continual_run_stops_and_keeps_the_previous_stage(config, tmp_path, capsys):
    # A huge (finite; infinity is refused up front) learning rate for task 2 only: task 2's first update
    # sends the weights far beyond what float32 activations can hold, its second loss is NaN.
    exploding = variant(config, tmp_path, per_task={"compass": {"learning_rate": 1e15}})
    out = tmp_path / "run"
    assert cli_run(exploding, out) == 2
    err = capsys.readouterr().err
    assert re.search(r"the loss became nan at step 2 \(parts: \{'task_ce': nan", err), err
    assert "Lower the learning rate" in err
    assert_stage_one_intact(out, config)
    assert not (out / "checkpoints" / "stage-2").exists()
    assert leftovers(out) == []
    # The folder now holds a run: a plain rerun is refused, --resume needs the same config, and
    # --overwrite starts the fixed config over.
    assert cli_run(config, out) == 2
    err = capsys.readouterr().err
    assert "already holds a run; pass --resume to continue it or --overwrite to replace it" in err
    assert cli_run(config, out, "--resume") == 2
    err = capsys.readouterr().err
    assert "holds a run of another config (these settings differ: per_task.compass.learning_rate: 1000000000000000.0 -> (not set))" in err, err
    assert "--resume continues a run only with the config it started with" in err and "--overwrite" not in err
    assert cli_run(config, out, "--overwrite") == 0
    assert json.loads((out / "run_state.json").read_text())["stages_done"] == 2


@pytest.mark.parametrize("name", ["../evil", "/tmp/gere-evil-absolute", "inner/../../evil"])
def test_task_name_that_would_write_outside_the_run_is_refused(config, tmp_path, capsys, name):
    data = yaml.safe_load(config.read_text())
    tasks = [{**data["tasks"][0], "name": name}]
    out = tmp_path / "nested" / "run"
    assert cli_run(variant(config, tmp_path, tasks=tasks), out) == 2
    err = capsys.readouterr().err
    assert f"the name {name!r} would write outside" in err and "use a plain name" in err
    assert not (tmp_path / "nested" / "evil").exists() and not Path("/tmp/gere-evil-absolute").exists()
    assert not (out / "gere_store").exists()


# ------------------------------------------------------------------------------------------ unsafe code


def unsafe_calls(source: str) -> list[str]:
    """Loads that can run code from a file, and remote code allowed by default, found in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(
                n and n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib") for n in names
            ):
                found.append(f"line {node.lineno}: imports a pickle module")
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and "load" in names:
                found.append(f"line {node.lineno}: from torch import load")
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if func == "torch.load":
                weights_only = keywords.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append(f"line {node.lineno}: torch.load without weights_only=True")
            if func in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                found.append(f"line {node.lineno}: {func} (use yaml.safe_load)")
            for flag in ("trust_remote_code", "allow_pickle"):
                value = keywords.get(flag)
                if isinstance(value, ast.Constant) and value.value is True:
                    found.append(f"line {node.lineno}: {flag}=True")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args.posonlyargs + node.args.args
            pairs = list(zip(args[len(args) - len(node.args.defaults) :], node.args.defaults))
            pairs += [(a, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None]
            for arg, default in pairs:
                if arg.arg == "trust_remote_code" and not (
                    isinstance(default, ast.Constant) and default.value is False
                ):
                    found.append(
                        f"line {node.lineno}: {node.name}(trust_remote_code=...) does not default to False"
                    )
        elif isinstance(node, ast.AnnAssign) and ast.unparse(node.target) == "trust_remote_code":
            if node.value is None or "False" not in ast.unparse(node.value):
                found.append(f"line {node.lineno}: the trust_remote_code field does not default to False")
    return found


def test_the_scan_finds_unsafe_code():
    bad = (
        "import pickle\nimport torch\nx = torch.load('f')\ny = torch.load('f', weights_only=False)\n"
        "def load(spec, trust_remote_code=True): pass\nm = f(trust_remote_code=True)\n"
        "class C:\n    trust_remote_code: bool = True\n"
    )
    assert len(unsafe_calls(bad)) == 6
    assert unsafe_calls("import torch\nx = torch.load('f', weights_only=True)\n") == []


def test_source_never_unpickles_or_trusts_remote_code_by_default():
    package = Path(gere.__file__).parent
    sources = sorted(package.rglob("*.py"))
    assert len(sources) > 15
    found = {str(p.relative_to(package)): unsafe_calls(p.read_text()) for p in sources}
    assert {name: lines for name, lines in found.items() if lines} == {}


# ------------------------------------------------------------------------------------------ one writer


def lock_held_by(folder: Path, process: subprocess.Popen) -> None:
    """The lock file a live `gere run` in ``folder`` holds (written as it writes it, for a real process)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".gere.lock").write_text(json.dumps({"pid": process.pid, "host": socket.gethostname(),
                                                   "started": "2026-11-29 12:00:00", "what": "gere run 'other'"}))  # fmt: skip


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(config, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_held_by(out, holder)
        assert cli_run(config, out) == 2
        err = capsys.readouterr().err
        assert f"in use by process {holder.pid} on {socket.gethostname()} since 2026-11-29 12:00:00" in err
        lock_held_by(out / "gere_store", holder)
        assert main(["extract", "--config", str(config), "--store-dir", str(out / "gere_store")]) == 2
        assert f"in use by process {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (as after a crash): its lock is stale and the run goes ahead.
    (out / "gere_store" / ".gere.lock").unlink()
    assert cli_run(config, out) == 0
    assert not (out / ".gere.lock").exists()


def test_resume_refuses_changed_input_files_and_names_them(config, tmp_path, capsys):
    data = yaml.safe_load(config.read_text())
    source = Path(data["tasks"][1]["source"])
    copy = tmp_path / "compass"
    shutil.copytree(source, copy)
    data["tasks"][1]["source"] = str(copy)
    data["training"]["max_steps"] = 1
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--output-dir", str(out), "--no-progress"]) == 0
    state = json.loads((out / "run_state.json").read_text())
    state["stages_done"] = 1
    state["accuracy_matrix"] = state["accuracy_matrix"][:2]
    state["general"] = state["general"][:2]
    (out / "run_state.json").write_text(json.dumps(state))  # as if it had stopped after task 1
    (out / "results.json").unlink()
    test_file = copy / "test.jsonl"
    test_file.write_text(test_file.read_text().splitlines()[0] + "\n")
    assert main(["run", str(cfg), "--output-dir", str(out), "--no-progress", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "input files changed since it started" in err and str(test_file) in err


def test_a_run_that_stopped_before_its_first_task_finished_reruns_without_flags(config, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="stopped in task 1"):
        _stop_in_first_task(config, out)
    assert json.loads((out / "run_state.json").read_text())["stages_done"] == 0
    assert cli_run(config, out) == 0  # no --overwrite needed: nothing of value was there


def _stop_in_first_task(config: Path, out: Path) -> None:
    import gere.trainer

    original = gere.trainer.GeReTrainer.train

    def stop(self, *args, **kwargs):
        raise RuntimeError("stopped in task 1")

    gere.trainer.GeReTrainer.train = stop
    try:
        run_continual(load_run_config(config, [f"output_dir={out}"]), progress=False)
    finally:
        gere.trainer.GeReTrainer.train = original


def test_overwrite_with_another_model_rebuilds_the_runs_own_store(config, tmp_path):
    out = tmp_path / "run"
    assert cli_run(config, out) == 0
    first = json.loads((out / "gere_store" / "manifest.json").read_text())["model"]
    other = tmp_path / "other-model"
    tiny_llama(seed=1).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    assert cli_run(config, out, "--overwrite", "--model", str(other)) == 0
    assert json.loads((out / "gere_store" / "manifest.json").read_text())["model"] != first
    assert json.loads((out / "results.json").read_text())["config"]["model"] == str(other)


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs, nearly full."""
    with tmpfs(tmp_path / "disk", "size=1m") as mount_point:
        free = shutil.disk_usage(mount_point).free
        (mount_point / "filler").write_bytes(b"\0" * (free - 16384))  # 16 KiB: files are created, then full
        yield mount_point


def test_a_full_disk_during_extraction_is_an_error_not_a_bus_error(config, small_disk):
    """Memory-mapped parts on a full disk used to kill the process with SIGBUS (exit 135, no message)."""
    done = subprocess.run([str(Path(sys.executable).with_name("gere")), "extract", "--config", str(config),
                           "--store-dir", str(small_disk / "store")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "the disk is full" in done.stderr
    assert not (small_disk / "store" / "manifest.json").exists()


def test_a_read_only_store_folder_is_a_clear_error(config, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mount_point:
        assert main(["extract", "--config", str(config), "--store-dir", str(mount_point / "store")]) == 2
        err = capsys.readouterr().err
        assert "cannot be created" in err and "is on a read-only file system" in err and "writable folder" in err
