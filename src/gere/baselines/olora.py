"""O-LoRA (Wang et al. 2023, "Orthogonal subspace learning for language model continual learning").

Each task trains a new LoRA adapter (``task-1``, ``task-2``, ...); the earlier tasks' adapters stay in the
forward pass, frozen, so the model is the base plus the sum of every adapter so far (also at evaluation:
no task id is needed). While task t trains, two penalties join the loss:

    olora_orth = lambda_1 * sum_{i < t} sum_modules || A_i A_t^T ||_F^2
    olora_l2   = lambda_2 * sum over the new adapter's A and B of theta^2

``A`` is an adapter's down-projection (peft's ``lora_A`` weight, ``[r, in]``), so ``A_i A_t^T`` is the
``[r, r]`` matrix of inner products between the subspaces the two adapters read from (the paper's
``O_{i,t} = A_i^T A_t`` in its column convention); the penalty is the sum of its squared entries, and
zero when the new adapter reads from directions orthogonal to every earlier one. The L2 term is the sum
of squares of the new adapter's parameters.

Memory: r * (in + out) parameters per adapted matrix and task, all adapters kept; time: the penalty's
matrix products over the adapted modules, and one more LoRA path per finished task in every forward pass.
Saved with every checkpoint: the weights file holds every adapter (``<adapter>/<name>``).
"""

from __future__ import annotations

import torch

from gere.baselines.base import Baseline, Stage
from gere.baselines.settings import OLoraSettings
from gere.errors import GeReError


def adapter_name(task: int) -> str:
    """The adapter of the task at position ``task`` (0-based): ``task-1``, ``task-2``, ..."""
    return f"task-{task + 1}"


def orthogonality_loss(earlier: list[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
    """``sum_i || A_i A_new^T ||_F^2`` for LoRA down-projections ``[r, in]`` (zero without earlier ones)."""
    total = new.new_zeros((), dtype=torch.float32)
    for old in earlier:
        total = total + (old.float() @ new.float().T).pow(2).sum()
    return total


def l2_loss(params: list[torch.Tensor]) -> torch.Tensor:
    """The sum of squares of ``params``."""
    total = params[0].new_zeros((), dtype=torch.float32)
    for p in params:
        total = total + p.float().pow(2).sum()
    return total


def lora_modules(model) -> list:
    """The modules that hold LoRA adapters (a ``lora_A`` mapping of adapter name to layer)."""
    return [m for m in model.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)]


class OLoRA:
    """One LoRA adapter per task with O-LoRA's penalties; a loss part for `gere.trainer.GeReMixin`.

    ``olora = OLoRA(lambda_1, lambda_2, lora_config)``; the peft model's first adapter is ``adapter_name(0)``;
    ``olora.begin_task(model, t)`` before task t (adds and trains its adapter, freezes the earlier ones).
    """

    name = "olora"
    names = ("olora_orth", "olora_l2")

    def __init__(self, orthogonal: float, l2: float, lora_config):
        try:
            OLoraSettings(orthogonal=orthogonal, l2=l2)  # its rules, written once
        except GeReError as err:
            raise GeReError(f"O-LoRA: {err}") from None
        self.orthogonal, self.l2, self.lora_config = float(orthogonal), float(l2), lora_config
        self.task: int | None = None
        self._modules: list = []  # the adapted modules holding the training task's adapter (found once per task)

    @property
    def active(self) -> bool:
        return self.task is not None

    def add_adapters(self, model, upto: int) -> None:
        """Make sure adapters ``task-1`` .. ``task-<upto+1>`` exist (new ones peft-initialised)."""
        if adapter_name(0) not in model.peft_config:
            raise GeReError(f"O-LoRA needs a peft model whose first adapter is named {adapter_name(0)!r}")
        for t in range(1, upto + 1):
            if adapter_name(t) not in model.peft_config:
                model.add_adapter(adapter_name(t), self.lora_config)

    def begin_task(self, model, task: int) -> None:
        """Task ``task`` (0-based) trains its own adapter; every earlier one stays in the forward pass, frozen."""
        self.add_adapters(model, task)
        names = [adapter_name(t) for t in range(task + 1)]
        model.base_model.set_adapter(names)  # all active: their outputs add up in every forward pass
        new = f".{adapter_name(task)}."
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name and new in name)
        self.task = task
        self._modules = [m for m in lora_modules(model) if adapter_name(task) in m.lora_A]

    def __call__(self, model) -> dict[str, torch.Tensor]:
        if self.task is None:
            raise GeReError("O-LoRA: call begin_task(model, task) before training a task")
        new, earlier = adapter_name(self.task), [adapter_name(t) for t in range(self.task)]
        modules = self._modules
        if not modules:
            raise GeReError(f"O-LoRA: the model has no adapter {new!r}; call begin_task(model, {self.task}) on it")
        zero = modules[0].lora_A[new].weight.new_zeros((), dtype=torch.float32)
        orth = sum((orthogonality_loss([m.lora_A[e].weight for e in earlier], m.lora_A[new].weight) for m in modules),
                   start=zero)  # fmt: skip
        params = [w for m in modules for w in (m.lora_A[new].weight, m.lora_B[new].weight)]
        return {"olora_orth": self.orthogonal * orth, "olora_l2": self.l2 * l2_loss(params)}


class OLoraBaseline(Baseline):
    """O-LoRA in a continual run (``finetuning: olora``, the ``olora:`` section): before each task its own adapter
    joins and trains, the earlier ones frozen; the checkpoint's weights hold every adapter, so a resumed run
    adds the finished tasks' adapters before they load."""

    def __init__(self, olora: OLoRA):
        self.olora = olora

    settings_class = OLoraSettings

    @classmethod
    def from_settings(cls, s: OLoraSettings, cfg) -> OLoraBaseline:
        from gere.modeling import lora_config

        return cls(OLoRA(s.orthogonal, s.l2, lora_config(cfg.lora)))

    def resume(self, model, stages_done: int) -> None:
        if stages_done > 0:  # the finished tasks' adapters, for their weights to load into
            self.olora.add_adapters(model, stages_done - 1)

    def before_task(self, stage: Stage) -> list[dict]:
        self.olora.begin_task(stage.model, stage.index)
        return []

    def loss_parts(self, stage: Stage) -> list:
        return [self.olora]
