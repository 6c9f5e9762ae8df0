"""``gere export RUN_DIR --out DIR``: a continual run's model as a Hugging Face folder to hand on.

A run keeps its weights as ``checkpoints/stage-<i>/weights.safetensors`` (`gere.continual.checkpoint`), which
only gere reads. The export loads the run's base model, puts a stage's checkpoint into it and writes what
``from_pretrained``, ``lm_eval --model hf`` and LLaMA-Factory take as they are:

- full fine-tuning, or LoRA with ``--merge-lora``: ``save_pretrained`` of the model (``config.json``,
  ``model.safetensors``) and of its tokenizer; ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it;
- LoRA without ``--merge-lora``: peft's adapter folder (``adapter_config.json``,
  ``adapter_model.safetensors``) naming the base model, and the tokenizer; ``AutoPeftModelForCausalLM`` or
  ``PeftModel.from_pretrained(base, DIR)`` loads it;
- O-LoRA: one adapter per task, all of them in every forward pass, so the export merges them
  (``--merge-lora`` is required).

Beside the model, ``gere_export.json`` says which run, stage and task it comes from and
``gere_run_config.yaml`` is the run's resolved config. The folder is written under a temporary name next to
``DIR`` and renamed into place when complete; an existing ``DIR`` is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gere import __version__
from gere.continual.checkpoint import checkpoint_dir, load_checkpoint, lora_config, with_lora
from gere.continual.run_config import load_run_config
from gere.continual.run_folder import CONFIG_FILE, STATE_FILE
from gere.errors import GeReError
from gere.io_utils import atomic_write_json, byte_size, disk_full, free_bytes

EXPORT_MARKER = "gere_export.json"


def finished_stages(run_dir: Path) -> list[int]:
    """The stages whose checkpoint is complete (its ``checkpoint.json`` is written last), in order."""
    stages = []
    for folder in (run_dir / "checkpoints").glob("stage-*"):
        number = folder.name.removeprefix("stage-")
        if number.isdigit() and (folder / "checkpoint.json").is_file():
            stages.append(int(number))
    return sorted(stages)


def export_model(run_dir: str | Path, out: str | Path, *, stage: int | None = None, merge_lora: bool = False,
                 overwrite: bool = False) -> Path:  # fmt: skip
    """Write stage ``stage`` (default: the newest checkpoint) of the run in ``run_dir`` to ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / CONFIG_FILE).is_file():
        raise GeReError(f"{run_dir} holds no {CONFIG_FILE}; pass the output folder of a `gere run`")
    # The run's own config, without its trackers: exporting logs nothing.
    cfg = load_run_config(run_dir / CONFIG_FILE, ["report_to=[]"])
    stage = _chosen_stage(run_dir, stage, cfg.keep_checkpoints)
    if cfg.finetuning == "full" and merge_lora:
        raise GeReError(f"{run_dir} fine-tuned every weight (finetuning: full): there is no LoRA to merge; "
                        "leave --merge-lora out")  # fmt: skip
    if cfg.finetuning == "olora" and not merge_lora:
        raise GeReError(f"{run_dir} trained one O-LoRA adapter per task, all of them in every forward pass; "
                        "pass --merge-lora to export them merged into one model")  # fmt: skip
    _check_out(out, overwrite, run_dir)
    model, tokenizer = _stage_model(cfg, run_dir, stage)
    if merge_lora:
        model = model.merge_and_unload(adapter_names=list(model.peft_config))
    elif cfg.finetuning == "lora":  # the adapter names its base: a local folder by its absolute path
        for adapter in model.peft_config.values():
            base = Path(str(adapter.base_model_name_or_path)).expanduser()
            if base.exists():
                adapter.base_model_name_or_path = str(base.resolve())
    info = {"run": str(run_dir.resolve()), "stage": stage, "after_task": _task_name(run_dir, cfg, stage),
            "finetuning": cfg.finetuning, "lora_merged": merge_lora, "base_model": cfg.model,
            "written_by": f"gere {__version__}"}  # fmt: skip
    return _write(out, overwrite, model, tokenizer, info, run_dir / CONFIG_FILE)


def _chosen_stage(run_dir: Path, stage: int | None, keep: int) -> int:
    stages = finished_stages(run_dir)
    if not stages:
        raise GeReError(f"{run_dir} has no finished checkpoint yet (checkpoints/stage-<i>/checkpoint.json); "
                        "export once the run has trained its first task")  # fmt: skip
    if stage is None:
        return stages[-1]
    if stage == 0:
        raise GeReError("stage 0 is the base model itself; export a trained stage (1 or more)")
    if stage not in stages:
        why = (f"it ran with keep_checkpoints: {keep}, which keeps only the newest {keep}; run it again with "
               "keep_checkpoints: 0 (the default) to keep every stage" if keep and stage < stages[-1] else
               "that stage has not finished")  # fmt: skip
        raise GeReError(f"{run_dir} keeps the checkpoints of stage(s) {stages}, not of stage {stage}: {why}")
    return stage


def _check_out(out: Path, overwrite: bool, run_dir: Path) -> None:
    """Refuse an ``--out`` that would write over what the export does not own: the run itself, a folder
    inside it or above it, and (with ``--overwrite``) any folder that is not an earlier export."""
    here, run = out.resolve(), run_dir.resolve()
    if here == run or run in here.parents or here in run.parents:
        where = "is the run's own folder" if here == run else ("lies inside the run" if run in here.parents
                                                                 else "holds the run")  # fmt: skip
        raise GeReError(f"--out {out} {where} ({run}); an export there would replace or mix with the run's "
                        "files: choose a folder outside the run")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise GeReError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise GeReError(f"--out {out} already holds files; pass --overwrite to replace an earlier export, or "
                            "choose another folder")  # fmt: skip
        if not (out / EXPORT_MARKER).is_file():
            raise GeReError(f"--out {out} holds files but no {EXPORT_MARKER}, so it is not an earlier `gere export`; "
                            "--overwrite replaces only an export: choose an empty or new folder")  # fmt: skip


def _stage_model(cfg, run_dir: Path, stage: int):
    """The base model with the stage's checkpoint in it, as the run held it after that stage."""
    import torch

    from gere.modeling import load_model_and_tokenizer
    from gere.store.fingerprint import model_fingerprint

    model, tokenizer = load_model_and_tokenizer(cfg.model, cache_dir=cfg.cache_dir,
                                                trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    expected = _read_state(run_dir).get("base_model")
    # A run records its base model's fingerprint as its store saw it (the bare model) or, without a store,
    # as it trained (under LoRA, the adapter-wrapped model, whose weight names differ): either will do.
    seen = {model_fingerprint(model)}
    if cfg.finetuning in ("lora", "olora"):
        model = with_lora(cfg, model)
        if expected not in seen:
            seen.add(model_fingerprint(model))
    if expected and expected not in seen:
        raise GeReError(f"the base model {cfg.model} is no longer the one this run trained from (its weights or "
                        "config changed); export needs the run's own base model")  # fmt: skip
    if cfg.finetuning == "olora":  # the adapters of tasks 1..stage, all in the forward pass
        from gere.baselines.olora import OLoRA, adapter_name

        OLoRA(cfg.olora.orthogonal, cfg.olora.l2, lora_config(cfg)).add_adapters(model, stage - 1)
        model.base_model.set_adapter([adapter_name(t) for t in range(stage)])
    rng = torch.get_rng_state()
    _load_stage(run_dir, stage, model, cfg)
    torch.set_rng_state(rng)  # the checkpoint's RNG state is the run's, not the caller's
    model.eval()
    return model, tokenizer


def _load_stage(run_dir: Path, stage: int, model, cfg) -> None:
    """The stage's checkpoint into ``model``. A checkpoint that goes while it is read (the run prunes it under
    ``keep_checkpoints``, or writes that stage again on a resume) is named as such: the advice to start the run
    over (``--overwrite``), right for a run's own broken checkpoint, would throw the run away."""
    folder = checkpoint_dir(run_dir, stage)
    try:
        load_checkpoint(folder, model, cfg)
    except Exception:
        if all((folder / name).is_file() for name in ("checkpoint.json", "weights.safetensors", "rng.safetensors")):
            raise  # the checkpoint is whole: what went wrong is said as it is
        raise GeReError(f"the checkpoint of stage {stage} ({folder}) changed while it was read: the run is writing "
                        "or pruning its checkpoints (keep_checkpoints, or a resumed stage); the run itself is not "
                        f"touched: export again when the run has written it, or pick a stage it keeps (gere export "
                        f"{run_dir} --stage N)") from None  # fmt: skip


def _read_state(run_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((run_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _task_name(run_dir: Path, cfg, stage: int) -> str | None:
    try:
        return cfg.task_specs()[stage - 1].name
    except (GeReError, IndexError):
        return None


def _write(out: Path, overwrite: bool, model, tokenizer, info: dict[str, Any], config_file: Path) -> Path:
    """Save into a temporary folder beside ``out``, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.copyfile(config_file, staging / "gere_run_config.yaml")
        atomic_write_json(staging / EXPORT_MARKER, {**info, "files": sorted(p.name for p in staging.iterdir())})
        if out.exists():
            if any(out.iterdir()) and not (overwrite and (out / EXPORT_MARKER).is_file()):  # filled meanwhile: kept
                raise GeReError(f"--out {out} was filled while the model was written; it is kept as it is: choose "
                                "another folder")  # fmt: skip
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if disk_full(err):
            kept = f"the earlier export in {out} is kept, " if out.exists() else ""
            raise GeReError(f"the disk is full: the export did not fit in {staging} (beside --out {out}; the model's "
                            f"tensors are about {byte_size(_tensor_bytes(model))}, {byte_size(free_bytes(out.parent))} "
                            f"is free now, the half-written folder removed); nothing was lost: the run is untouched, "
                            f"{kept}nothing is left half-written: free space on that disk, then run the same gere "
                            "export again") from None  # fmt: skip
        raise
    return out


def _tensor_bytes(model) -> int:
    """Bytes of the tensors ``save_pretrained`` writes: a peft model's adapter, any other model's weights (tied
    weights once)."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        return sum(t.numel() * t.element_size() for t in get_peft_model_state_dict(model).values())
    seen, size = set(), 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            size += tensor.numel() * tensor.element_size()
    return size
