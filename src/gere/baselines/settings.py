"""The run-config sections of the continual-learning baselines (`gere run`): ``ewc``, ``lwf``, ``olora``,
``task_replay``. Each value is checked here, once: when the config is read, and when a baseline's class is
built directly (it builds its settings); docs/baselines.md describes them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gere.errors import check_settings


@dataclass
class EwcSettings:
    strength: float = field(
        default=0.0, metadata={"help": "EWC penalty strength lambda (lambda/2 * sum F (theta - theta*)^2); 0 is off."}
    )
    samples: int = field(default=64, metadata={"help": "Training examples per task the Fisher is estimated on."})

    def __post_init__(self) -> None:
        check_settings([
            (0 <= self.strength < math.inf, "strength", "a finite number, 0 (off) or more"),
            (self.samples >= 1, "samples", "1 or more"),
        ], self)  # fmt: skip


LWF_TOKENS = ("all", "answer")  # the positions LwF distils: every real token, or those predicting the answer


@dataclass
class LwfSettings:
    weight: float = field(default=0.0, metadata={"help": "LwF distillation weight (times T^2 * KL to the previous stage); 0 is off."})
    temperature: float = field(default=2.0, metadata={"help": "Distillation temperature T."})
    topk: int = field(default=64, metadata={"help": "Previous-stage logits kept per token (the top k)."})
    tokens: str = field(default="all", metadata={"help": "Distilled positions: 'all' real tokens or the 'answer' (labelled) ones."})

    def __post_init__(self) -> None:
        check_settings([
            (self.tokens in LWF_TOKENS, "tokens", f"one of {LWF_TOKENS}"),
            (0 <= self.weight < math.inf, "weight", "a finite number, 0 (off) or more"),
            (0 < self.temperature < math.inf, "temperature", "a finite number above 0"),
            (self.topk >= 1, "topk", "1 or more"),
        ], self)  # fmt: skip


@dataclass
class OLoraSettings:
    orthogonal: float = field(
        default=0.5, metadata={"help": "O-LoRA lambda_1: weight of sum ||A_i A_t^T||_F^2 against earlier adapters."}
    )
    l2: float = field(default=0.0, metadata={"help": "O-LoRA lambda_2: weight of the new adapter's sum of squares."})

    def __post_init__(self) -> None:
        check_settings([
            (0 <= self.orthogonal < math.inf, "orthogonal", "a finite number, 0 or more"),
            (0 <= self.l2 < math.inf, "l2", "a finite number, 0 or more"),
        ], self)  # fmt: skip


TASK_REPLAY_SELECTIONS = ("first", "reservoir")  # which examples of a finished task join the buffer
TASK_REPLAY_MIXINGS = ("concat", "interpolate", "batch")  # how the buffer joins later tasks' training


@dataclass
class TaskReplaySettings:
    per_task: int = field(default=0, metadata={"help": "Training examples of each finished task replayed later; 0 is off."})
    selection: str = field(default="reservoir", metadata={"help": "'reservoir' (seeded) or 'first' N examples."})
    seed: int = field(default=0, metadata={"help": "Seed of the reservoir sampling and of the buffer's draws."})
    mixing: str = field(
        default="concat",
        metadata={"help": "'concat' (appended to the task's examples), 'interpolate' (per_batch in every global "
                          "batch) or 'batch' (a separate batch of batch_size with every micro-batch)."},
    )  # fmt: skip
    per_batch: int = field(default=1, metadata={"help": "mixing: interpolate: buffered examples in every global batch."})
    batch_size: int = field(default=4, metadata={"help": "mixing: batch: buffered examples in each separate batch."})

    def __post_init__(self) -> None:
        check_settings([
            (self.per_task >= 0, "per_task", "0 (off) or more"),
            (self.selection in TASK_REPLAY_SELECTIONS, "selection", f"one of {TASK_REPLAY_SELECTIONS}"),
            (self.mixing in TASK_REPLAY_MIXINGS, "mixing", f"one of {TASK_REPLAY_MIXINGS}"),
            (self.per_batch >= 1, "per_batch", "1 or more"),
            (self.batch_size >= 1, "batch_size", "1 or more"),
        ], self)  # fmt: skip
