"""The run-config sections of the continual-learning baselines (`gere run`): ``ewc``, ``lwf``, ``olora``,
``task_replay``. Each value is checked here, once: when the config is read, and when a baseline's class is
built directly (it builds its settings); docs/baselines.md describes them.

Each section is also its baseline's spec, torch-free: its run-config section (``section``), its name in a
run's method (``label``), the loss parts it logs (``parts``, `gere.parts.PENALTIES` in `BASELINE_SETTINGS`
order) and its "on" rule (`on`), read by the run config's checks and method name and by the baseline's
class (`gere.baselines.base.Baseline.from_config`; the class names its settings, `Baseline.settings_class`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gere.errors import check_settings


@dataclass
class EwcSettings:
    section: ClassVar[str] = "ewc"
    label: ClassVar[str] = "ewc"
    parts: ClassVar[tuple[str, ...]] = ("ewc",)  # the weight penalty
    strength: float = field(
        default=0.0, metadata={"help": "EWC penalty strength lambda (lambda/2 * sum F (theta - theta*)^2); 0 is off."}
    )
    samples: int = field(default=64, metadata={"help": "Training examples per task the Fisher is estimated on."})

    def __post_init__(self) -> None:
        check_settings([
            (0 <= self.strength < math.inf, "strength", "a finite number, 0 (off) or more"),
            (self.samples >= 1, "samples", "1 or more"),
        ], self)  # fmt: skip

    def on(self, cfg: Any = None) -> bool:
        """Whether EWC runs (``cfg``, the run config, is not needed): a strength above 0."""
        return self.strength > 0


LWF_TOKENS = ("all", "answer")  # the positions LwF distils: every real token, or those predicting the answer


@dataclass
class LwfSettings:
    section: ClassVar[str] = "lwf"
    label: ClassVar[str] = "lwf"
    parts: ClassVar[tuple[str, ...]] = ("lwf",)  # the distillation
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

    def on(self, cfg: Any = None) -> bool:
        """Whether LwF runs: a weight above 0."""
        return self.weight > 0


@dataclass
class OLoraSettings:
    section: ClassVar[str] = "olora"
    label: ClassVar[str] = "olora"
    parts: ClassVar[tuple[str, ...]] = ("olora_orth", "olora_l2")  # the orthogonality and L2 penalties
    orthogonal: float = field(
        default=0.5, metadata={"help": "O-LoRA lambda_1: weight of sum ||A_i A_t^T||_F^2 against earlier adapters."}
    )
    l2: float = field(default=0.0, metadata={"help": "O-LoRA lambda_2: weight of the new adapter's sum of squares."})

    def __post_init__(self) -> None:
        check_settings([
            (0 <= self.orthogonal < math.inf, "orthogonal", "a finite number, 0 or more"),
            (0 <= self.l2 < math.inf, "l2", "a finite number, 0 or more"),
        ], self)  # fmt: skip

    def on(self, cfg: Any) -> bool:
        """Whether O-LoRA runs: run config ``cfg`` trains with ``finetuning: olora`` (this section only weighs)."""
        return cfg.finetuning == "olora"


TASK_REPLAY_SELECTIONS = ("first", "reservoir")  # which examples of a finished task join the buffer
TASK_REPLAY_MIXINGS = ("concat", "interpolate", "batch")  # how the buffer joins later tasks' training


@dataclass
class TaskReplaySettings:
    section: ClassVar[str] = "task_replay"
    label: ClassVar[str] = "task-replay"
    parts: ClassVar[tuple[str, ...]] = ("task_replay_ce",)  # a separate batch's CE (mixing: batch)
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

    def on(self, cfg: Any = None) -> bool:
        """Whether task replay runs: some examples of each finished task kept."""
        return self.per_task > 0


#: Every baseline's section, in the order a run's method name lists them (and their loss parts are shown).
BASELINE_SETTINGS = (EwcSettings, LwfSettings, OLoraSettings, TaskReplaySettings)
