"""The ``training:`` section of a run config: gere's own training settings, and any other
`transformers.TrainingArguments` field passed through to every stage's Trainer.

gere's keys (learning rate, steps, batch size, ``bf16: auto``, ...) keep their meaning; any other key must be a
field of the installed transformers' TrainingArguments (a typo is refused with the nearest name), except the
fields gere sets itself, which are refused with the run-config key that does their job. The section is
written back flat, as the user wrote it (`TrainingSettings.plain`), so a run's ``config.yaml`` reads back as
the same config. `gere.continual.training_args` builds each stage's TrainingArguments from it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Any

from gere.errors import GeReError, check_settings, nearest
from gere.precision import parse_bf16


@dataclass
class TrainingSettings:
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs per task (ignored when max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimisation steps per task; -1 uses num_train_epochs."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Task batch size per device."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per step."})
    max_length: int = field(default=256, metadata={"help": "Task samples are cut to this many tokens (answer kept)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_steps: float = field(default=0, metadata={"help": "Linear warm-up: steps (int) or share of the steps (<1)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "transformers scheduler name."})
    optim: str = field(default="adamw_torch_fused", metadata={"help": "transformers optimizer name."})
    logging_steps: int = field(default=1, metadata={"help": "Log the loss parts every this many steps."})
    bf16: bool | str = field(
        default="auto",
        metadata={
            "help": "bf16 autocast in training: 'auto' (on where the hardware computes bf16 natively: CUDA "
            "devices with bf16, CPUs with avx512_bf16 or amx_bf16; fp32 elsewhere), true or false."
        },
    )
    activation_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations to save memory."})
    group_by_length: bool = field(
        default=False,
        metadata={
            "help": "Put task rows of similar length in the same micro-batch (gere.task_batches.LengthGroupedSampler, "
            "within windows of 50 micro-batches taken in random order), so little of a batch is padding: faster "
            "on uneven inputs, but a change of which rows train together (benchmarks/RESULTS.md, padding)."
        },
    )
    trainer_args: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Any other transformers.TrainingArguments field (max_grad_norm, fp16, adam_beta2, "
            "torch_compile, ...), written straight into the training section; each is checked against "
            "TrainingArguments' own fields when the config is read and passed to every stage's Trainer."
        },
    )

    @classmethod
    def route_keys(cls, data: dict, where: str) -> dict:
        """The section's keys with every key that is not a gere setting moved into ``trainer_args``, checked
        against `transformers.TrainingArguments` (`trainer_arg_names`)."""
        own = {f.name for f in fields(cls)}
        routed = {k: v for k, v in data.items() if k in own}
        extra = {k: v for k, v in data.items() if k not in own}
        if "warmup_ratio" in extra and "warmup_ratio" not in trainer_arg_names():
            # transformers 5 folded warmup_ratio into warmup_steps, which gere reads as a share below 1.
            if "warmup_steps" in data:
                raise GeReError(f"{where}: give warmup_steps or warmup_ratio, not both")
            routed["warmup_steps"] = extra.pop("warmup_ratio")
        if "gradient_checkpointing" in extra:
            routed["activation_checkpointing"] = extra.pop("gradient_checkpointing")
        given = routed.get("trainer_args")
        if given is not None and not isinstance(given, dict):
            raise GeReError(f"{where}.trainer_args: expected a mapping of TrainingArguments fields, got "
                            f"{type(given).__name__}; write it as trainer_args: {{name: value}}")
        if extra:
            routed["trainer_args"] = {**(given or {}), **extra}
        if routed.get("trainer_args"):
            routed["trainer_args"] = checked_trainer_args(routed["trainer_args"], where, own)
        return routed

    def plain(self) -> dict[str, Any]:
        """The section as a config file writes it: ``trainer_args`` flat beside the gere settings."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "trainer_args"}
        return {**data, **copy.deepcopy(self.trainer_args)}

    def __post_init__(self) -> None:
        self.bf16 = parse_bf16(self.bf16)
        if self.bf16 is True and self.trainer_args.get("fp16") is True:
            raise GeReError("training.bf16 and training.fp16 are both true; choose one (bf16: auto gives way to fp16)")
        check_settings([
            (0 < self.learning_rate < math.inf, "learning_rate", "a finite number above 0"),
            (0 < self.num_train_epochs < math.inf, "num_train_epochs", "a finite number above 0"),
            (self.max_steps == -1 or self.max_steps >= 1, "max_steps",
             "1 or more, or -1 to train num_train_epochs (0 would train nothing)"),
            (self.per_device_train_batch_size >= 1, "per_device_train_batch_size", "1 or more"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "1 or more"),
            (self.max_length >= 2, "max_length", "2 or more"),
            (0 <= self.weight_decay < math.inf, "weight_decay", "a finite number, 0 or more"),
            (0 <= self.warmup_steps < math.inf, "warmup_steps", "a finite number, 0 or more"),
            (self.logging_steps >= 1, "logging_steps", "1 or more"),
        ], self)  # fmt: skip


#: TrainingArguments fields gere sets itself: each names where the setting lives in a run config instead.
RESERVED_TRAINER_ARGS = {
    "output_dir": "the run's top-level output_dir (each stage trains in <output_dir>/stages/)",
    "seed": "the run's top-level seed",
    "run_name": "the run's top-level name",
    "report_to": "the run's top-level report_to (gere tracks the whole task sequence as one run)",
    "eval_strategy": "the evaluation section (gere evaluates every task after every stage)",
    "do_eval": "the evaluation section (gere evaluates every task after every stage)",
    "remove_unused_columns": "nothing: gere's batches need every column they carry",
    "resume_from_checkpoint": "`gere run --resume`",
    "local_rank": "the launcher (torchrun sets it)",
}


def trainer_arg_names() -> dict[str, Any]:
    """`transformers.TrainingArguments`' own fields (of the installed version): ``{name: default}``."""
    from transformers import TrainingArguments

    return {f.name: f.default for f in fields(TrainingArguments) if f.init}


def checked_trainer_args(args: dict[str, Any], where: str, own: set[str]) -> dict[str, Any]:
    """``args`` with every name a TrainingArguments field (a typo is refused with the nearest name among
    gere's settings and TrainingArguments' fields) and not one gere sets itself; a number YAML read as text
    (``1e-8``) becomes a float where the field's default is one."""
    known = trainer_arg_names()
    out = {}
    for key, value in args.items():
        if key in RESERVED_TRAINER_ARGS:
            raise GeReError(f"{where}.{key}: gere sets this TrainingArguments field itself; use "
                            f"{RESERVED_TRAINER_ARGS[key]}")  # fmt: skip
        if key not in known:
            hint = nearest(key, [*own - {"trainer_args"}, *known])
            raise GeReError(f"unknown config key {where}.{key}{hint}: it is neither a gere training setting nor a "
                            "field of transformers.TrainingArguments (of the installed transformers)")  # fmt: skip
        if isinstance(value, str) and isinstance(known[key], float) and not isinstance(known[key], bool):
            try:
                value = float(value)
            except ValueError:
                raise GeReError(f"{where}.{key}: expected a number, got {value[:80]!r}") from None
        out[key] = value
    return out
