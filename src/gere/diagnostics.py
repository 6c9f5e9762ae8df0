"""Gradient share of each loss part: how hard each part pulls on the trainable parameters, and where to.

The training loss is a sum of weighted parts (`gere.losses.combine_losses`): ``task_ce / n + replay_ce / n
+ w * replay_margin + ... + penalties``. For each weighted part ``c_i`` this measures, on the trainable
parameters, the gradient ``g_i = d c_i / d theta`` and reports

- ``grad_norm_<part>``: ``||g_i||``, the norm of the part's contribution to the gradient (weight included);
- ``grad_cos_<part>``: the cosine between ``g_i`` and the total gradient ``g = sum_j g_i``: near 1 when the
  update goes where this part wants, near 0 when the part hardly shapes it, below 0 when it is overruled;
- ``grad_norm_total``: ``||g||`` of this micro-batch before clipping.

A part whose norm is many times the others' and whose cosine is near 1 decides the update alone; the
Trainer's gradient clipping then scales the others down with it. The norms are of gradients, not of Adam's
updates: Adam divides each coordinate by its running scale, so a part that dominates the gradient dominates
the direction of the update in the coordinates it touches.

Cost: one backward pass per part with a gradient (``torch.autograd.grad`` with the graph kept), and one
gradient-sized buffer per part while the Gram matrix ``<g_i, g_j>`` is summed; the Trainer's own backward
pass follows as usual. Measured on the first micro-batch of a measured step, on one process.
"""

from __future__ import annotations

import math

import torch

from gere.parts import GRAD_COS as COS
from gere.parts import GRAD_NORM as NORM
from gere.parts import GRAD_NORM_TOTAL as TOTAL


def gradient_shares(contributions: dict[str, torch.Tensor], params: list[torch.Tensor]) -> dict[str, float]:
    """``{grad_norm_<part>, grad_cos_<part>, grad_norm_total}`` for the weighted loss parts ``contributions``
    (each a scalar tensor whose sum is the training loss) on ``params`` (the trainable parameters).

    A part without a gradient path to ``params`` (a constant, a penalty that is zero) gets norm 0 and no
    cosine. The graph is kept, so the caller's backward pass still works.
    """
    names = [n for n, v in contributions.items() if torch.is_tensor(v) and v.requires_grad]
    grads: dict[str, list[torch.Tensor | None]] = {}
    for name in names:
        grads[name] = list(torch.autograd.grad(contributions[name], params, retain_graph=True, allow_unused=True))
    gram = {(a, b): _dot(grads[a], grads[b]) for i, a in enumerate(names) for b in names[i:]}
    total_sq = sum(gram[(a, b)] * (1 if a == b else 2) for (a, b) in gram)
    total = math.sqrt(max(total_sq, 0.0))
    out: dict[str, float] = {TOTAL: total}
    for name in contributions:
        if name not in grads:
            out[NORM + name] = 0.0
            continue
        norm = math.sqrt(max(gram[(name, name)], 0.0))
        out[NORM + name] = norm
        if norm > 0 and total > 0:
            along = sum(gram[(a, b)] for (a, b) in gram if name in (a, b) and a != b) + gram[(name, name)]
            out[COS + name] = along / (norm * total)
    return out


class GradShareMeter:
    """Measures `gradient_shares` on the first micro-batch of every ``every``-th optimisation step."""

    def __init__(self, every: int):
        self.every, self._last_step, self._params = every, -1, None

    def due(self, step: int, world_size: int = 1) -> bool:
        """Whether the micro-batch of completed-step count ``step`` is the first of a measured step."""
        if not self.every or step % self.every or step == self._last_step:
            return False
        if world_size > 1:
            from gere.errors import GeReError

            raise GeReError(
                "grad_share_every measures on one process (its backward passes would meet the other processes' "
                "gradient all-reduce); run the diagnostic on one process, or set grad_share_every: 0"
            )
        self._last_step = step
        return True

    def params(self, model) -> list[torch.Tensor]:
        """The trainable parameters of ``model`` (found once)."""
        if self._params is None:
            self._params = [p for p in model.parameters() if p.requires_grad]
        return self._params

    def measure(self, contributions: dict[str, torch.Tensor], model) -> dict[str, float]:
        return gradient_shares(contributions, self.params(model))


def _dot(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> float:
    """Sum over parameters of ``<a_p, b_p>`` in float64 (a missing gradient counts as zero)."""
    total = 0.0
    for x, y in zip(a, b, strict=True):
        if x is not None and y is not None:
            total += float(torch.dot(x.reshape(-1).double(), y.reshape(-1).double()))
    return total
