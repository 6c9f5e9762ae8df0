"""Elastic weight consolidation (EWC, Kirkpatrick et al. 2017): a quadratic pull toward earlier tasks' weights.

After each task, the diagonal of the Fisher information of that task is estimated on ``samples`` of its
training examples and added to the Fisher of the tasks before it; the anchor becomes the weights after the
task (the accumulated, "online" form with decay 1). While later tasks train, the loss gains

    penalty = strength / 2 * sum_i F_i * (theta_i - anchor_i) ** 2

over the trainable parameters (the LoRA parameters alone under LoRA). The Fisher here is the *empirical*
Fisher: the squared gradient of the log-likelihood of each example's own answer (its labels), one example
at a time, averaged over the examples. Memory: two float32 tensors per trainable parameter (8 bytes per
parameter: the Fisher and the anchor), kept on the parameter's device and saved with every checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gere.baselines.base import Baseline, Stage
from gere.baselines.settings import EwcSettings
from gere.batching import IGNORE_INDEX, eval_mode, model_device
from gere.errors import GeReError

FILE = "ewc.safetensors"


class _Penalty(torch.autograd.Function):
    """``strength / 2 * sum F (theta - anchor)^2`` with its gradient ``strength * F * (theta - anchor)`` written
    out: a few fused passes over all parameters at once (``torch._foreach_*``), instead of an autograd graph
    that keeps several parameter-sized temporaries per tensor until the backward pass."""

    @staticmethod
    def forward(ctx, fisher, anchor, strength, *params):
        ctx.fisher, ctx.anchor, ctx.strength = fisher, anchor, strength
        ctx.save_for_backward(*params)
        squares = torch._foreach_sub([p.detach().float() for p in params], anchor)  # one temporary per tensor
        torch._foreach_mul_(squares, squares)
        total = torch.zeros((), dtype=torch.float64, device=params[0].device)
        for sq, f in zip(squares, fisher, strict=True):
            total += torch.dot(sq.flatten(), f.flatten()).double()
        return (0.5 * strength * total).float()

    @staticmethod
    def backward(ctx, grad_out):
        params = ctx.saved_tensors
        grads = torch._foreach_sub([p.detach().float() for p in params], ctx.anchor)
        torch._foreach_mul_(grads, ctx.fisher)
        torch._foreach_mul_(grads, grad_out * ctx.strength)
        return (None, None, None, *(g.to(p.dtype) for g, p in zip(grads, params, strict=True)))


def ewc_penalty(
    params: dict[str, torch.Tensor],
    fisher: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor],
    strength: float,
) -> torch.Tensor:
    """``strength / 2 * sum F * (theta - anchor)^2`` over the parameters named in ``fisher``."""
    if not fisher:
        raise GeReError("EWC has no Fisher information yet; it applies from the second task on")
    names = list(fisher)
    return _Penalty.apply([fisher[n] for n in names], [anchor[n] for n in names], float(strength),
                          *(params[n] for n in names))  # fmt: skip


def trainable_parameters(model) -> dict[str, torch.Tensor]:
    """The parameters EWC constrains: those that train (the adapter's alone under LoRA)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def diagonal_fisher(model, rows: Sequence[dict], device=None) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher: the mean over ``rows`` of the squared gradient of each row's summed
    answer log-likelihood (rows hold ``input_ids`` and ``labels``, -100 where no loss is taken)."""
    if not rows:
        raise GeReError("EWC needs at least one training example to estimate the Fisher information")
    device = device or model_device(model)
    params = trainable_parameters(model)
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    names, tensors = list(params), list(params.values())
    with eval_mode(model), torch.enable_grad():  # no dropout, but gradients
        for row in rows:
            ids = torch.tensor([row["input_ids"]], device=device)
            labels = torch.tensor([row["labels"]], device=device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            targets = labels[:, 1:]
            keep = targets != IGNORE_INDEX
            if not keep.any():
                raise GeReError("an EWC example has no answer tokens (every label is -100); check the task data")
            log_likelihood = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0).unsqueeze(-1))[..., 0]
            grads = torch.autograd.grad(log_likelihood[keep].sum(), tensors, allow_unused=True)
            for name, g in zip(names, grads, strict=True):
                if g is not None:
                    fisher[name] += g.detach().float().pow(2)
    return {name: f / len(rows) for name, f in fisher.items()}


class EWC:
    """The accumulated Fisher and the anchor of a run; a loss part for `gere.trainer.GeReMixin` (``penalties=``).

    ``ewc = EWC(strength)``; after each task ``ewc.consolidate(model, rows)``; ``ewc(model)`` is the penalty.
    """

    name = "ewc"

    def __init__(self, strength: float):
        if not EwcSettings(strength=strength).on():  # its rules, written once
            raise GeReError(f"EWC strength must be above 0 (got {strength}); leave EWC off instead")
        self.strength = float(strength)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return bool(self.fisher)

    def consolidate(self, model, rows: Sequence[dict]) -> None:
        """Add this task's Fisher to the earlier ones; the weights now become the anchor."""
        fisher = diagonal_fisher(model, rows)
        for name, f in fisher.items():
            self.fisher[name] = self.fisher[name] + f if name in self.fisher else f
        self.anchor = {name: p.detach().float().clone() for name, p in trainable_parameters(model).items()}

    def __call__(self, model) -> torch.Tensor:
        params = trainable_parameters(model)
        missing = sorted(set(self.fisher) - set(params))
        if missing:
            raise GeReError(f"EWC was consolidated on parameters the model no longer trains: {missing[:3]}...")
        first = next(iter(params.values()))
        if next(iter(self.fisher.values())).device != first.device:  # loaded from a checkpoint on the CPU
            self.fisher = {n: t.to(params[n].device) for n, t in self.fisher.items()}
            self.anchor = {n: t.to(params[n].device) for n, t in self.anchor.items()}
        return ewc_penalty(params, self.fisher, self.anchor, self.strength)

    def save(self, folder: Path) -> None:
        tensors = {f"fisher/{n}": t.cpu().contiguous() for n, t in self.fisher.items()}
        tensors |= {f"anchor/{n}": t.cpu().contiguous() for n, t in self.anchor.items()}
        save_file(tensors, str(Path(folder) / FILE))

    def load(self, folder: Path, device=None) -> None:
        """Fisher and anchor from a checkpoint folder, on ``device`` (default: where the anchor will be used,
        the CPU until the first penalty moves it)."""
        path = Path(folder) / FILE
        if not path.exists():
            raise GeReError(f"{path} is missing: this checkpoint was written without EWC; start over with --overwrite")
        tensors = load_file(str(path), device=str(device or "cpu"))
        self.fisher = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("fisher/")}
        self.anchor = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("anchor/")}


class EwcBaseline(Baseline):
    """EWC in a continual run (the ``ewc:`` section): the penalty while every task after the first trains, the
    Fisher of ``samples`` of each task's training rows added after it; Fisher and anchor in every checkpoint."""

    settings_class = EwcSettings

    def __init__(self, strength: float, samples: int):
        self.ewc, self.samples = EWC(strength), samples

    @classmethod
    def from_settings(cls, settings: EwcSettings, cfg) -> EwcBaseline:
        return cls(settings.strength, settings.samples)

    def loss_parts(self, stage: Stage) -> list:
        return [self.ewc]

    def after_task(self, stage: Stage) -> list[dict]:
        if stage.index + 1 < stage.num_tasks:  # the Fisher of this task, for the tasks after it
            self.ewc.consolidate(stage.model, stage.rows[: self.samples])
        return []

    def save(self, folder: Path) -> None:
        self.ewc.save(folder)

    def load(self, folder: Path) -> None:
        self.ewc.load(folder)
