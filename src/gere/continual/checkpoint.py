"""Checkpoints of a continual run: the weights (or the LoRA adapter) and the RNG state after each stage.

``<run>/checkpoints/stage-<i>/`` holds ``weights.safetensors`` (the weights, the LoRA adapter, or under
O-LoRA every task's adapter as ``<adapter>/<name>``), ``rng.safetensors``, the baselines' states
(``ewc.safetensors``, ``task_replay.json``) and ``checkpoint.json`` (written last). A checkpoint is written to
a temporary folder and renamed, so a crash or a full disk never leaves a half checkpoint under the final
name; older ones are pruned only after the run state names the newest. The runner writes the weights while
it evaluates the stage (`checkpoint_beside`), which leaves them alone.

Every stage is kept by default (``keep_checkpoints: 0``), as the Trainer keeps every checkpoint unless
``save_total_limit`` says otherwise: a stage's weights are what ``gere export --stage N`` hands on, and a
pruned stage cannot be trained again without the whole run. The run says before it trains which stages it
keeps and about what they cost on disk (`checkpoint_plan`); ``keep_checkpoints: N`` keeps the newest N.
"""

from __future__ import annotations

import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gere.continual.run_config import RunConfig
from gere.errors import GeReError
from gere.io_utils import atomic_write_json, byte_size, disk_full, free_bytes
from gere.modeling import lora_config as peft_lora_config


def lora_config(cfg: RunConfig):
    """The run's `peft.LoraConfig` (its ``lora:`` section)."""
    return peft_lora_config(cfg.lora)


def with_lora(cfg: RunConfig, model):
    """``model`` with the run's LoRA adapter (under O-LoRA, the first task's; each later task adds its own)."""
    from peft import get_peft_model

    from gere.baselines.olora import adapter_name

    if cfg.finetuning == "olora":
        return get_peft_model(model, lora_config(cfg), adapter_name=adapter_name(0))
    return get_peft_model(model, lora_config(cfg))


def checkpoint_plan(cfg: RunConfig, model, stages: int) -> str:
    """The line a run prints before training: which of its ``stages`` checkpoints it keeps for ``gere export
    --stage``, about what each costs on disk (the tensors `_write_weights` writes, from ``model`` as it will
    train) and the setting that trades it."""
    size = stage_bytes(cfg, model)
    # O-LoRA: stage i holds the adapters of tasks 1..i.
    total = size * stages * (stages + 1) // 2 if cfg.finetuning == "olora" else size * stages
    each = f"about {byte_size(size)} a stage" if cfg.finetuning != "olora" else f"about {byte_size(size)} per adapter"
    keep = cfg.keep_checkpoints
    if not keep or keep >= stages:
        return (f"checkpoints: every stage kept for gere export --stage 1..{stages} ({each}, {byte_size(total)} in all); "
                f"keep_checkpoints: 1 keeps only the newest")  # fmt: skip
    return (f"checkpoints: only the newest {keep} of {stages} stages kept (keep_checkpoints: {keep}): gere export "
            f"--stage can export stage(s) {max(stages - keep + 1, 1)}..{stages} once trained, not earlier ones "
            f"({each}); keep_checkpoints: 0 keeps every stage ({byte_size(total)} in all)")  # fmt: skip


def stage_bytes(cfg: RunConfig, model) -> int:
    """Bytes of the tensors a stage's ``weights.safetensors`` holds (under O-LoRA, one adapter's)."""
    if cfg.finetuning != "full":
        return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    seen, size = set(), 0
    for tensor in model.state_dict().values():  # tied weights once, as the checkpoint stores them
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            size += tensor.numel() * tensor.element_size()
    return size



def checkpoint_dir(out: Path, stage: int) -> Path:
    return out / "checkpoints" / f"stage-{stage}"


@contextmanager
def checkpoint_beside(out: Path, stage: int, model, cfg: RunConfig, extra=()):
    """Weights (or the adapter) after ``stage``, torch's RNG state and ``x.save(folder)`` for each of ``extra``
    (the baselines' states: EWC's Fisher and anchor, the task-replay buffer), written to a temporary folder and
    renamed. The weights and the baselines' states are written by a thread while the body runs: the
    body must leave the weights alone (the runner evaluates the stage there), so writing them costs the
    run no time of its own. After the body: torch's RNG state as it is then, ``checkpoint.json``, and the
    rename into place. An error in the body or in the writing is raised once both have ended, and leaves
    no checkpoint under the final name (the previous stage's is kept)."""
    final = checkpoint_dir(out, stage)
    tmp = out / "checkpoints" / f".stage-{stage}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    failed: list[BaseException] = []
    written: list[int] = []

    def write() -> None:
        try:
            written.append(_write_weights(tmp, model, cfg))
            for state in extra:
                state.save(tmp)
        except BaseException as err:  # raised in the caller's thread, below
            failed.append(err)

    writer = threading.Thread(target=write, name=f"checkpoint stage {stage}", daemon=True)
    writer.start()
    try:
        try:
            yield
        finally:
            writer.join()
        if failed:
            raise failed[0]
        save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        atomic_write_json(tmp / "checkpoint.json", {"stage": stage, "finetuning": cfg.finetuning, "tensors": written[0]})
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed (e.g. disk-full) write leaves nothing behind
        if disk_full(err):
            raise _full_disk(out, stage, model, cfg, err) from None
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _full_disk(out: Path, stage: int, model, cfg: RunConfig, err: BaseException) -> GeReError:
    """The one-line error for a checkpoint the disk had no room for: where, how much, what is kept, the fix."""
    where = getattr(err, "filename", None) or out / "checkpoints" / f".stage-{stage}.tmp"
    need = byte_size(stage_bytes(cfg, model) * (stage if cfg.finetuning == "olora" else 1))
    kept = "every finished stage's checkpoint" if stage > 1 else "the base model's evaluation"
    return GeReError(f"the disk is full: the checkpoint of stage {stage} did not fit in {where} (its weights are "
                     f"about {need}; {byte_size(free_bytes(out))} is free now, the half-written one removed); nothing "
                     f"finished was lost ({kept} and run_state.json are as they were): free space on that disk, "
                     f"then continue with: gere run {out / 'config.yaml'} --resume")  # fmt: skip


def prune_checkpoints(out: Path, cfg: RunConfig) -> None:
    """Keep the newest ``keep_checkpoints``. Called only after run_state.json names the newest stage, so a
    crash in between never leaves the state pointing at a deleted checkpoint."""
    if cfg.keep_checkpoints:
        older = sorted((out / "checkpoints").glob("stage-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in older[: -cfg.keep_checkpoints]:
            shutil.rmtree(old)


def _write_weights(tmp: Path, model, cfg: RunConfig) -> int:
    """``weights.safetensors``: the weights, the LoRA adapter or every O-LoRA adapter; the number of tensors."""
    if cfg.finetuning == "lora":
        from peft import get_peft_model_state_dict

        tensors = get_peft_model_state_dict(model)
    elif cfg.finetuning == "olora":  # every task's adapter, as <adapter>/<name>
        from peft import get_peft_model_state_dict

        tensors = {f"{adapter}/{k}": v for adapter in model.peft_config
                   for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}  # fmt: skip
    else:
        tensors = model.state_dict()
    # Tied weights share storage; safetensors wants each stored once.
    seen, unique = set(), {}
    for name, tensor in tensors.items():
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        unique[name] = tensor.detach().contiguous().cpu()
    save_file(unique, str(tmp / "weights.safetensors"))
    return len(unique)


def load_checkpoint(path: Path, model, cfg: RunConfig) -> None:
    if not (path / "checkpoint.json").exists():
        raise GeReError(f"checkpoint {path} is incomplete; start over with --overwrite")
    tensors = load_file(str(path / "weights.safetensors"))
    if cfg.finetuning == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, tensors)
    elif cfg.finetuning == "olora":
        from peft import set_peft_model_state_dict

        adapters = sorted({k.split("/", 1)[0] for k in tensors})
        missing = [a for a in adapters if a not in model.peft_config]
        if missing:
            raise GeReError(f"checkpoint {path} holds adapters {missing} the model lacks; add them before loading")
        for adapter in adapters:
            own = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{adapter}/")}
            set_peft_model_state_dict(model, own, adapter_name=adapter)
    else:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        tied = {n for n in missing if n.endswith("lm_head.weight")}
        if set(missing) - tied or unexpected:
            raise GeReError(f"checkpoint {path} does not fit the model (missing {missing}, unexpected {unexpected})")
        if tied:
            model.tie_weights()
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch_rng"])
