"""Each stage's `transformers.TrainingArguments`, from a run config's training section.

gere's own training settings come first; any other TrainingArguments field the section (or ``per_task``)
gives passes through and wins (`gere.continual.run_config.TrainingSettings.trainer_args`). Every stage's
arguments are built once before any work (`check_training_args`), so a value TrainingArguments refuses
stops the run before the activation store is extracted.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.training_args import ParallelMode

from gere.continual.run_config import RunConfig
from gere.errors import GeReError
from gere.precision import Precision

# transformers renamed `gradient_checkpointing` to `activation_checkpointing` during 5.x; use the one it has.
_CHECKPOINTING = next(
    (f.name for f in dataclasses.fields(TrainingArguments) if f.name == "activation_checkpointing"),
    "gradient_checkpointing",
)
_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}


def _length_grouping(on: bool) -> dict:
    """TrainingArguments' way to ask for length-grouped batches: ``train_sampling_strategy`` (transformers 5.x
    from about 5.2 on) or ``group_by_length`` (5.0, 5.1); gere's trainer reads either (`groups_by_length`)."""
    if "train_sampling_strategy" in _FIELDS:
        return {"train_sampling_strategy": "group_by_length" if on else "random"}
    return {"group_by_length": on}


def stage_training_args(cfg: RunConfig, task: str, stage_dir: Path, progress: bool, bf16: bool) -> TrainingArguments:
    """The Trainer's arguments for ``task``: gere's training settings, then any other TrainingArguments
    field the training section (or ``per_task``) gives, which win over gere's defaults below."""
    t = cfg.training_for(task)
    if isinstance(cfg.per_task.get(task, {}).get("bf16"), bool):  # a task's own explicit choice wins
        bf16 = t.bf16
    if t.trainer_args.get("fp16") is True:
        bf16 = False  # checked when the config was read: fp16 is on only where bf16 is not asked for
    kwargs = dict(
        output_dir=str(stage_dir),
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        optim=t.optim,
        logging_steps=t.logging_steps,
        bf16=bf16,
        # transformers refuses bf16 without a bf16 GPU unless told the run is on the CPU (it autocasts there).
        use_cpu=bf16 and not torch.cuda.is_available(),
        **{_CHECKPOINTING: t.activation_checkpointing},
        # gere's trainer reads this strategy and groups by length itself, over its own samplers too.
        **_length_grouping(t.group_by_length),
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
    )
    return TrainingArguments(**{**kwargs, **t.trainer_args})


def check_training_args(cfg: RunConfig, out: Path, precision: Precision) -> None:
    """Build every stage's TrainingArguments once before any work, so that values TrainingArguments itself
    refuses (``fp16`` without a GPU, ``lr_scheduler_type: cosine_typo``, ...) stop the run now, not after the
    store is extracted and earlier tasks have trained."""
    for task in [None, *cfg.per_task]:
        where = f"per_task.{task}" if task else "training"
        _check_deepspeed_file(cfg.training_for(task).trainer_args.get("deepspeed"), where)
        try:
            args = stage_training_args(cfg, task, out / "stages" / "check", False, precision.bf16)
        except (ValueError, TypeError, ImportError) as err:
            if "deepspeed" in str(err) and isinstance(err, ImportError):  # accelerate's package-metadata lookup
                raise GeReError(f"{where}.deepspeed needs the deepspeed package, which is not installed here: "
                                "pip install 'gere[deepspeed]', or leave deepspeed out") from None  # fmt: skip
            raise GeReError(f"{where}: transformers.TrainingArguments refuses these settings: {str(err)[:400]}; "
                            f"fix them in the {where} section") from None  # fmt: skip
        _check_processes(args, where)


def _check_deepspeed_file(value, where: str) -> None:
    """A ``deepspeed`` setting naming a file (not a dict, not inline JSON) names one that exists."""
    if isinstance(value, str) and not value.lstrip().startswith("{") and not Path(value).is_file():
        what = "a folder, not a file" if Path(value).is_dir() else "not a file"
        raise GeReError(f"{where}.deepspeed: the DeepSpeed config {value!r} ({Path(value).absolute()}) is {what}; "
                        "give the path of a DeepSpeed JSON config, or leave deepspeed out")  # fmt: skip


def _check_processes(args: TrainingArguments, where: str) -> None:
    """FSDP shards the model across processes: one process cannot run it (the Trainer refuses it, "Using fsdp
    only works in distributed training", after the store is extracted and the base model evaluated)."""
    xla = isinstance(args.fsdp_config, dict) and args.fsdp_config.get("xla", False)
    if args.fsdp and not xla and args.parallel_mode != ParallelMode.DISTRIBUTED:
        raise GeReError(f"{where}.fsdp shards the model across processes, and this run is one process: start it "
                        "with several (torchrun --nproc_per_node N $(which gere) run ...; docs/distributed.md), "
                        f"or leave fsdp out of the {where} section")  # fmt: skip
