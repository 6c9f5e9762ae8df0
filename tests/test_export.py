"""gere export: a run's stage as a Hugging Face folder that from_pretrained (or peft) loads as it is, with the
same logits as the run's checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gere.cli import main
from gere.continual.export import export_model
from gere.errors import GeReError

from tiny_runs import run, tmpfs

pytest.importorskip("peft")

PROMPTS = ["the river 3 is", "pick one of north south"]


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**batch).logits


def base_model(setup):
    return AutoModelForCausalLM.from_pretrained(setup / "model")


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    run(setup, out, "gere.objective=none")  # the default keeps every stage
    return out


def test_full_fine_tuning_exports_a_folder_from_pretrained_loads(setup, full_run, tmp_path, capsys):
    assert main(["export", str(full_run), "--out", str(tmp_path / "hf")]) == 0
    assert "model after stage 2 (compass)" in capsys.readouterr().out
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    # The checkpoint read by hand into the base model: the same logits, bit for bit.
    reference = base_model(setup)
    missing, _ = reference.load_state_dict(load_file(str(full_run / "checkpoints/stage-2/weights.safetensors")),
                                           strict=False)  # fmt: skip
    assert set(missing) <= {"lm_head.weight"}
    reference.tie_weights()
    assert torch.equal(logits(exported, tokenizer), logits(reference, tokenizer))
    assert not torch.allclose(logits(exported, tokenizer), logits(base_model(setup), tokenizer)), "it trained"
    info = json.loads((tmp_path / "hf" / "gere_export.json").read_text())
    assert (info["stage"], info["after_task"], info["finetuning"]) == (2, "compass", "full")
    assert (tmp_path / "hf" / "gere_run_config.yaml").is_file()
    assert not list(tmp_path.glob(".hf.export-*")), "the staging folder is gone"
    # An earlier stage, on request.
    export_model(full_run, tmp_path / "stage1", stage=1)
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "stage1")
    assert not torch.allclose(logits(first, tokenizer), logits(exported, tokenizer))


def test_export_refusals_leave_an_existing_folder_as_it_was(setup, full_run, tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("keep me")
    cases = [
        (["--out", str(tmp_path / "hf")], "already holds files; pass --overwrite"),
        (["--out", str(tmp_path / "o"), "--stage", "5"], r"keeps the checkpoints of stage\(s\) \[1, 2\], not of stage 5"),
        (["--out", str(tmp_path / "o"), "--stage", "0"], "stage 0 is the base model itself"),
        (["--out", str(tmp_path / "o"), "--merge-lora"], "finetuning: full.*leave --merge-lora out"),
    ]
    for flags, message in cases:
        assert main(["export", str(full_run), *flags]) == 2
        err = capsys.readouterr().err
        assert __import__("re").search(message, err), err
    assert (tmp_path / "hf" / "mine.txt").read_text() == "keep me" and not (tmp_path / "o").exists()
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "holds no config.yaml; pass the output folder of a `gere run`" in capsys.readouterr().err
    # A run whose base model changed since it trained is refused before anything is written.
    moved = tmp_path / "run"
    shutil.copytree(full_run, moved)
    changed = tmp_path / "model"
    shutil.copytree(setup / "model", changed)
    model = AutoModelForCausalLM.from_pretrained(changed)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    model.save_pretrained(changed)
    config = (moved / "config.yaml").read_text().replace(str(setup / "model"), str(changed))
    (moved / "config.yaml").write_text(config)
    with pytest.raises(GeReError, match="no longer the one this run trained from"):
        export_model(moved, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert (tmp_path / "hf" / "mine.txt").read_text() == "keep me"
    # --overwrite replaces only an earlier export: a folder of the user's own files is kept.
    with pytest.raises(GeReError, match="no gere_export.json, so it is not an earlier `gere export`"):
        export_model(full_run, tmp_path / "hf", overwrite=True)
    assert (tmp_path / "hf" / "mine.txt").read_text() == "keep me"
    export_model(full_run, tmp_path / "again", stage=1)
    export_model(full_run, tmp_path / "again", overwrite=True)
    assert json.loads((tmp_path / "again" / "gere_export.json").read_text())["stage"] == 2


def test_export_never_writes_over_its_run(full_run, tmp_path, capsys):
    """--out equal to the run, inside it or above it is refused, with --overwrite too, and the run is whole."""
    before = sorted(str(p.relative_to(full_run)) for p in full_run.rglob("*"))
    for out, why in [(full_run, "is the run's own folder"), (full_run / "checkpoints", "lies inside the run"),
                     (full_run / "new", "lies inside the run"), (full_run.parent, "holds the run"),
                     (full_run / ".." / full_run.name, "is the run's own folder")]:  # fmt: skip
        assert main(["export", str(full_run), "--out", str(out), "--overwrite"]) == 2
        assert why in capsys.readouterr().err
    assert sorted(str(p.relative_to(full_run)) for p in full_run.rglob("*")) == before


def test_lora_exports_an_adapter_peft_loads_and_a_merged_model(setup, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model, set_peft_model_state_dict

    from gere.continual.checkpoint import lora_config
    from gere.continual.run_config import load_run_config

    out = tmp_path / "run"
    run(setup, out, "gere.objective=none", "finetuning=lora", "lora.target_modules=[q_proj,v_proj]",
        "training.learning_rate=0.05")  # fmt: skip
    export_model(out, tmp_path / "adapter")
    export_model(out, tmp_path / "merged", merge_lora=True)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    # The run's adapter put on the base model by hand with peft, from the checkpoint.
    cfg = load_run_config(out / "config.yaml")
    reference = get_peft_model(base_model(setup), lora_config(cfg))
    set_peft_model_state_dict(reference, load_file(str(out / "checkpoints/stage-2/weights.safetensors")))
    expected = logits(reference, tokenizer)
    assert not torch.allclose(expected, logits(base_model(setup), tokenizer), atol=1e-4), "the adapter trained"
    adapter = PeftModel.from_pretrained(base_model(setup), tmp_path / "adapter")
    torch.testing.assert_close(logits(adapter, tokenizer), expected)
    as_is = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")  # the base named in the folder
    torch.testing.assert_close(logits(as_is, tokenizer), expected)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name in merged.state_dict())
    torch.testing.assert_close(logits(merged, tokenizer), expected, atol=1e-5, rtol=1e-5)


def test_olora_exports_every_task_adapter_merged(setup, tmp_path):
    out = tmp_path / "run"
    run(setup, out, "gere.objective=none", "finetuning=olora", "lora.target_modules=[q_proj,v_proj]",
        "training.learning_rate=0.05")  # fmt: skip
    with pytest.raises(GeReError, match="one O-LoRA adapter per task.*pass --merge-lora"):
        export_model(out, tmp_path / "adapters")
    export_model(out, tmp_path / "merged", merge_lora=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), tokenizer)
    # Both tasks' adapters, read by hand from the checkpoint and added to the base model's linear layers.
    from gere.continual.run_config import load_run_config

    cfg = load_run_config(out / "config.yaml")
    model = base_model(setup)
    tensors = load_file(str(out / "checkpoints/stage-2/weights.safetensors"))
    scale = cfg.lora.alpha / cfg.lora.r
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[-1] not in ("q_proj", "v_proj"):
                continue
            for adapter in ("task-1", "task-2"):
                a = tensors[f"{adapter}/base_model.model.{name}.lora_A.weight"]
                b = tensors[f"{adapter}/base_model.model.{name}.lora_B.weight"]
                module.weight += scale * b @ a
    torch.testing.assert_close(merged, logits(model, tokenizer), atol=1e-5, rtol=1e-5)


def test_lm_eval_scores_the_exported_folder_as_the_run_s_model(setup, full_run, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from test_lm_eval import questions, write_task  # a tiny local lm-eval task (no hub)

    from gere.continual.lm_eval_general import LmEvalGeneral

    export_model(full_run, tmp_path / "hf")
    tasks = write_task(tmp_path / "tasks", questions())
    # lm-eval's own "hf" model reading the folder by path, as `lm_eval --model hf` does ...
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
                                  tasks=["tiny_probe"], task_manager=TaskManager(include_path=str(tasks)),
                                  bootstrap_iters=0, batch_size=4, device="cpu")  # fmt: skip
    # ... scores what the run's model scores in memory.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = LmEvalGeneral(["tiny_probe"], include_path=str(tasks), batch_size=4)(model, tokenizer)
    assert out["results"]["tiny_probe"]["acc,none"] == pytest.approx(ours["lm_eval"]["tiny_probe"])


def test_a_run_says_before_training_which_stages_it_keeps_and_export_names_the_setting(setup, tmp_path, capsys):
    run(setup, tmp_path / "all", "gere.objective=none")
    out = capsys.readouterr().out
    # The tiny Llama's weights in fp32: 92,744 bytes of safetensors a stage, measured on its checkpoint.
    line = next(line for line in out.splitlines() if line.startswith("checkpoints:"))
    size = (tmp_path / "all" / "checkpoints" / "stage-1" / "weights.safetensors").stat().st_size
    assert line.startswith("checkpoints: every stage kept for gere export --stage 1..2 (about ")
    assert "keep_checkpoints: 1 keeps only the newest" in line
    estimate = float(line.split("about ")[1].split(" ")[0]) * 1e3  # kB
    assert abs(estimate - size) / size < 0.05, (line, size)
    assert out.index("checkpoints:") < out.index("after mood"), "said before the first task trains"
    run(setup, tmp_path / "newest", "gere.objective=none", "keep_checkpoints=1")
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("checkpoints:"))
    assert "only the newest 1 of 2 stages kept (keep_checkpoints: 1)" in line and "stage(s) 2..2" in line
    assert main(["export", str(tmp_path / "newest"), "--out", str(tmp_path / "o"), "--stage", "1"]) == 2
    err = capsys.readouterr().err
    assert "not of stage 1: it ran with keep_checkpoints: 1" in err and "keep_checkpoints: 0 (the default)" in err
    assert not (tmp_path / "o").exists()


def tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_full_disk_during_an_export_is_one_line_and_keeps_the_run_and_an_earlier_export(full_run, tmp_path, capsys):
    """A real 160 KiB tmpfs holds one export (92,744 bytes of weights with the tokenizer and config) but not a
    second beside it. Before: a SafetensorError traceback."""
    before = tree(full_run)
    with tmpfs(tmp_path / "disk", "size=160k") as disk:
        assert main(["export", str(full_run), "--out", str(disk / "hf")]) == 0
        first = tree(disk / "hf")
        capsys.readouterr()
        assert main(["export", str(full_run), "--out", str(disk / "hf"), "--stage", "1", "--overwrite"]) == 2
        err = capsys.readouterr().err
        (line,) = [x for x in err.splitlines() if x.startswith("gere: error:")]
        assert line.startswith(f"gere: error: the disk is full: the export did not fit in {disk}/.hf.export-"), line
        assert f"(beside --out {disk / 'hf'}; the model's tensors are about " in line
        assert f"nothing was lost: the run is untouched, the earlier export in {disk / 'hf'} is kept, nothing is " \
               "left half-written: free space on that disk, then run the same gere export again" in line  # fmt: skip
        assert "Traceback" not in err and sorted(p.name for p in disk.iterdir()) == ["hf"]
        assert tree(disk / "hf") == first
    assert tree(full_run) == before


def test_an_export_racing_the_run_s_checkpoints_never_advises_overwrite(full_run, tmp_path):
    """The run prunes (keep_checkpoints) or rewrites (a resumed stage) a checkpoint while an export reads it:
    here a thread takes stage 2 away and puts it back every 50 ms, as those do. The export says the checkpoint
    changed and that the run is not touched; it used to say "start over with --overwrite", which would throw
    the run away."""
    import threading
    import time

    moved = tmp_path / "run"
    shutil.copytree(full_run, moved)
    stage, away = moved / "checkpoints" / "stage-2", moved / "checkpoints" / "gone"
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            stage.rename(away)
            time.sleep(0.05)
            away.rename(stage)
            time.sleep(0.05)

    messages = []
    writer = threading.Thread(target=churn)
    writer.start()
    try:
        for attempt in range(40):
            try:
                export_model(moved, tmp_path / f"hf{attempt}", stage=2)
            except GeReError as err:
                messages.append(str(err))
                if "changed while it was read" in str(err):
                    break
    finally:
        stop.set()
        writer.join()
    assert messages and not any("--overwrite" in m for m in messages), messages
    assert messages[-1] == (f"the checkpoint of stage 2 ({stage}) changed while it was read: the run is writing or "
                            "pruning its checkpoints (keep_checkpoints, or a resumed stage); the run itself is not "
                            f"touched: export again when the run has written it, or pick a stage it keeps (gere "
                            f"export {moved} --stage N)")  # fmt: skip
    assert tree(moved / "checkpoints") == tree(full_run / "checkpoints")
