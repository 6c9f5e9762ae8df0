"""Gradient-balanced regulariser weights (``margin_weight: gb:<fraction>``).

The paper's weights are set from loss values: a number, or ``dy`` = CE / regulariser. What a weight does to
training, though, is set by gradients: the gradient-share diagnostic (`gere.diagnostics`, docs/study.md
section 6) measured, at the demo's scale, the ``dy``-weighted margin's gradient at 10-50 times the task
cross-entropy's, with a cosine of 1.00 to the total: the update was the margin's alone, and after clipping the
task's share of it was a few percent. The same weight also pulls differently at another scale (the margin's
``nonzero`` reduction gives a gradient per unit weight that grows as the violations become fewer).

``gb:<f>`` sets each regulariser's weight at every step so that its weighted gradient norm on the trainable
parameters is ``f`` times the norm of the CE terms' gradient (task CE, averaged with replay CE when the
objective has it):

    w_r = f * ||grad CE|| / ||grad r||

The idea of weighing loss parts by their gradient norms is GradNorm's (Chen et al., ICML 2018), which
learns weights that equalise gradient norms at a shared layer; here the norms are measured exactly on all
trainable parameters, at each step, and the weight is set directly (no learned weights, no target rates).
It does not project gradients as PCGrad (Yu et al., NeurIPS 2020) does: the diagnostic found the margin's
gradient nearly orthogonal to the task's (cosine 0.0-0.1), not opposed, so the trouble is size, not direction.

Cost: each part's gradient is taken once with ``torch.autograd.grad`` (the CE terms over the task and replay
graphs, each regulariser over the replay graph), so the replay batch's graph is traversed once more than in a
plain step; the Trainer's own backward pass then runs over a surrogate whose gradient is exactly
``grad CE + sum_r w_r grad r`` (one multiply-add per parameter). Memory: two gradient-sized buffers. One
process only (the gradients taken here would not meet the other processes' all-reduce).
"""

from __future__ import annotations

import math

import torch

from gere.config import WeightRule
from gere.parts import PENALTIES, REPLAY_PARTS, TASK_CE


def balanced_loss(
    parts: dict[str, torch.Tensor], rule: WeightRule, step: int, params: list[torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss under a ``gb`` rule, and the weight given to each regulariser.

    The returned tensor's value is ``CE + sum_r w_r r + penalties`` (as `gere.losses.combine_losses` would give
    with those weights); its gradient with respect to ``params`` is ``grad CE + sum_r w_r grad r`` plus the
    penalties' gradients, with ``w_r = fraction * ||grad CE|| / ||grad r||`` (times the warm-up factor). A
    regulariser whose gradient is zero gets weight 0.
    """
    ce_terms = [parts[n] for n in (TASK_CE, REPLAY_PARTS["ce"].loss) if n in parts]
    ce = sum(ce_terms) / len(ce_terms)
    warm = min(1.0, step / rule.warmup) if rule.warmup else 1.0
    combined = _grads(ce, params)
    ce_norm = _norm(combined)
    value = ce.detach()
    weights: dict[str, float] = {}
    for part in REPLAY_PARTS.values():
        if part.weight is None or part.loss not in parts:
            continue
        grads = _grads(parts[part.loss], params)
        norm = _norm(grads)
        w = rule.value * ce_norm / norm * warm if norm > 0 else 0.0
        weights[part.weight] = w
        value = value + w * parts[part.loss].detach()
        if w:
            for i, r in enumerate(grads):
                if r is not None:
                    combined[i] = r * w if combined[i] is None else combined[i].add_(r, alpha=w)
    surrogate = sum((p * g).sum() for p, g in zip(params, combined, strict=True) if g is not None)
    loss = value + (surrogate - surrogate.detach())
    for name in PENALTIES:  # weight penalties (EWC) keep their own gradient
        if name in parts:
            loss = loss + parts[name]
    return loss, weights


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    if not loss.requires_grad:
        return [None] * len(params)
    return [g.detach() if g is not None else None
            for g in torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)]  # fmt: skip


def _norm(grads: list[torch.Tensor | None]) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))
