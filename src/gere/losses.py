"""Replay objectives as pure functions: tensors in, a scalar out; and how the parts make one loss.

The paper (GeRe, arXiv 2508.04676, Sec. 3) compares several ways to replay a fixed set of general texts:

- ``ce``  label fitting on the replay text ("BaselineR"): next-token cross-entropy;
- ``kl``  logit imitation: KL(base || current) at a temperature (2 by default);
- ``l1`` / ``l2``  feature imitation on the hidden states;
- ``tm``  the threshold-based margin loss on the hidden states (activation states).

Objectives are written as ``+``-joined names (``ce+tm`` is the paper's best, BaselineR+TM; the table of
names is `gere.parts`). `replay_losses` computes each part of one replay batch from the model's outputs
and the reference targets (`ReplayTargets`, filled by `gere.reference`), each with its entry in `PART_LOSSES`; `combine_losses` makes the
training loss: ``ce`` is averaged with the task cross-entropy and every other part is a regulariser
multiplied by the weight (a number, or ``dy``: CE / regulariser, detached).

The TM loss (Sec. 3.2). Each element of a reference activation state gets a label from per-dimension
thresholds ``low = mean - k*std`` and ``high = mean + k*std``:

- negative (``ref <= low``): band ``(-inf, low]``
- neutral  (``low < ref < high``): band ``[low, high]``
- positive (``ref >= high``): band ``[high, +inf)``

The current hidden state ``h`` is pushed back into its band with a hinge ``relu(h - upper) + relu(lower - h)``,
masked to real tokens, and reduced as the sum divided by the number of non-zero elements (``nonzero``,
as the reference implementation does) or by the number of real elements (``mean``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gere.batching import IGNORE_INDEX
from gere.config import BALANCED, WeightRule, weight_rule
from gere.errors import GeReError
from gere.parts import PENALTIES, REDUCTIONS, REPLAY_PARTS, TASK_CE
from gere.stats import thresholds
from gere.store.format import CODE_NEGATIVE, CODE_NEUTRAL, CODE_POSITIVE

__all__ = [
    "CODE_NEGATIVE", "CODE_NEUTRAL", "CODE_POSITIVE", "PART_LOSSES", "ReplayBatch", "ReplayTargets", "causal_lm_ce", "coded_margin_loss",
    "combine_losses", "feature_loss", "loss_contributions", "margin_loss", "replay_losses", "resolve_margin_weight", "threshold_codes",
    "topk_kl_loss",
]  # fmt: skip

# Elements processed at a time by the margin loss (rows = CHUNK_ELEMENTS // hidden): bounds its float
# temporaries to a few MiB instead of batch x length x hidden. CHUNK_ROWS, when set, fixes the rows instead.
CHUNK_ELEMENTS = 1 << 20
CHUNK_ROWS: int | None = None


def threshold_codes(reference: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Label each element of ``reference`` ``[..., hidden]``: 0 negative, 1 neutral, 2 positive (uint8).

    Negative wins a tie when ``low == high`` (a zero-variance dimension), so every element gets one label.
    """
    ref = reference.float()
    codes = torch.full(ref.shape, CODE_NEUTRAL, dtype=torch.uint8, device=ref.device)
    codes[ref >= high.float()] = CODE_POSITIVE
    codes[ref <= low.float()] = CODE_NEGATIVE
    return codes


class _CodedMarginLoss(torch.autograd.Function):
    """TM loss from label codes; saves one int8 sign per element for backward (no float temporaries)."""

    @staticmethod
    def forward(ctx, hidden, codes, low, high, row_mask, reduction):
        hidden_size = hidden.shape[-1]
        flat = hidden.reshape(-1, hidden_size)
        flat_codes = codes.reshape(-1, hidden_size)
        rows = flat.shape[0]
        rows_real = row_mask.reshape(-1)
        low32, high32 = low.float(), high.float()
        sign = torch.zeros(flat.shape, dtype=torch.int8, device=flat.device)
        total = torch.zeros((), dtype=torch.float64, device=flat.device)
        nonzero = 0
        chunk = CHUNK_ROWS or max(1, CHUNK_ELEMENTS // hidden_size)
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            h = flat[start:stop].float()
            c = flat_codes[start:stop]
            real = rows_real[start:stop].unsqueeze(-1)
            # Upper bound: low for negative, high for neutral, none for positive; lower bound mirrored.
            upper = torch.where(c == CODE_NEGATIVE, low32, high32)
            above = (h > upper) & (c != CODE_POSITIVE) & real
            over = torch.where(above, h - upper, 0.0)
            del upper
            lower = torch.where(c == CODE_POSITIVE, high32, low32)
            below = (h < lower) & (c != CODE_NEGATIVE) & real
            under = torch.where(below, lower - h, 0.0)
            del lower
            total += over.sum(dtype=torch.float64) + under.sum(dtype=torch.float64)
            nonzero += int(above.sum()) + int(below.sum())
            sign[start:stop] = above.to(torch.int8) - below.to(torch.int8)
        if reduction == "nonzero":
            denom = float(max(nonzero, 1))
        elif reduction == "mean":
            denom = float(max(int(rows_real.sum()) * hidden_size, 1))
        else:
            denom = 1.0
        ctx.save_for_backward(sign)
        ctx.denom = denom
        ctx.shape = hidden.shape
        ctx.dtype = hidden.dtype
        return (total / denom).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        (sign,) = ctx.saved_tensors
        grad = sign.to(ctx.dtype).mul_(grad_out.to(ctx.dtype) / ctx.denom)
        return grad.reshape(ctx.shape), None, None, None, None, None


def coded_margin_loss(
    hidden: torch.Tensor,
    codes: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "nonzero",
) -> torch.Tensor:
    """TM loss of ``hidden`` ``[batch, length, hidden]`` against label ``codes`` (uint8, same shape).

    ``low``/``high`` are ``[hidden]`` thresholds; ``mask`` ``[batch, length]`` is 1 on real tokens. This is
    the path used in training, with codes unpacked from the activation store. Memory: beyond the gradient
    itself, it keeps one int8 per element for backward.
    """
    if reduction not in REDUCTIONS:
        raise GeReError(f"margin reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")
    if codes.shape != hidden.shape:
        raise GeReError(
            f"label codes have shape {tuple(codes.shape)} but hidden states {tuple(hidden.shape)}"
        )
    if mask is None:
        mask = torch.ones(hidden.shape[:-1], dtype=torch.bool, device=hidden.device)
    return _CodedMarginLoss.apply(
        hidden, codes, low.to(hidden.device), high.to(hidden.device), mask.bool(), reduction
    )


def margin_loss(
    hidden: torch.Tensor,
    reference: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    mask: torch.Tensor | None = None,
    k: float = 1.0,
    reduction: str = "nonzero",
) -> torch.Tensor:
    """Threshold-based margin (TM) loss of GeRe (Sec. 3.2), from raw reference activation states.

    Args:
        hidden: current hidden states ``[batch, length, hidden]`` (any float dtype).
        reference: the frozen base model's hidden states on the same tokens, same shape.
        mean, std: per-dimension statistics of the base model's states over the replay set, ``[hidden]``.
        mask: ``[batch, length]``, 1 on real tokens, 0 on padding; ``None`` means all real.
        k: thresholds are ``mean -/+ k*std`` (the paper uses k = 1).
        reduction: ``"nonzero"`` (sum / number of non-zero elements, as the reference implementation),
            ``"mean"`` (sum / number of real elements) or ``"sum"``.

    Returns a scalar; 0 when every element lies in its band (for example, an unchanged model).
    """
    low, high = thresholds(mean.float(), std.float(), k)
    codes = threshold_codes(reference.to(hidden.device), low.to(hidden.device), high.to(hidden.device))
    return coded_margin_loss(hidden, codes, low, high, mask, reduction)


def causal_lm_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: ``logits`` ``[batch, length, vocab]``, ``labels`` ``[batch, length]`` with
    ``IGNORE_INDEX`` (-100) on positions to ignore; mean over the counted tokens (0 when there are none)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(logits.device)
    count = (shift_labels != IGNORE_INDEX).sum()
    if int(count) == 0:
        return shift_logits.sum() * 0.0
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss / count


def feature_loss(
    hidden: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None, norm: str = "l2"
) -> torch.Tensor:
    """Feature imitation: mean absolute (``l1``) or squared (``l2``) error over real elements."""
    diff = hidden.float() - reference.to(hidden.device).float()
    err = diff.abs() if norm == "l1" else diff.square()
    if mask is None:
        return err.mean()
    m = mask.to(hidden.device).unsqueeze(-1).float()
    count = m.sum() * hidden.shape[-1]
    return (err * m).sum() / count.clamp_min(1.0)


def topk_kl_loss(
    logits: torch.Tensor,
    ref_values: torch.Tensor,
    ref_indices: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 2.0,
) -> torch.Tensor:
    """Logit imitation against the base model's top-k logits per token.

    Both distributions are taken over the base model's top-k tokens of that position: the softmax of the
    stored top-k logits, and the softmax of the current model's logits at the same k tokens, both at
    ``temperature``; the loss is KL(base_k || current_k), averaged over real tokens. It is 0 exactly when
    the current model ranks and spaces those k tokens as the base model does; the mass outside them is not
    constrained (the store does not hold it). With k = vocabulary size it is the full KL.

    (Comparing the base's top-k distribution with the current model's full softmax instead would not be
    a divergence: at the base model itself it equals -log of the current model's mass on the k tokens, so
    minimising it sharpens the model toward those tokens and raises perplexity; the study measured that.)

    Shapes: ``logits`` ``[batch, length, vocab]``, ``ref_values``/``ref_indices`` ``[batch, length, k]``.
    """
    picked = torch.gather(logits, -1, ref_indices.to(logits.device).long()).float()
    log_q_k = F.log_softmax(picked / temperature, dim=-1)
    log_p = F.log_softmax(ref_values.to(logits.device).float() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q_k)).sum(-1)
    if mask is None:
        return kl.mean()
    m = mask.to(logits.device).float()
    return (kl * m).sum() / m.sum().clamp_min(1.0)


def resolve_margin_weight(
    weight: float | str | WeightRule, ce: torch.Tensor | None, regulariser: torch.Tensor, step: int = 1
) -> float:
    """The weight applied to a regulariser at optimisation step ``step`` (1-based, within a task): the fixed
    number, or for ``dy`` CE / regulariser (detached), at most the rule's ceiling; times the warm-up factor
    ``min(1, step / warmup)`` when the rule has one (`gere.config.WeightRule`)."""
    rule = weight if isinstance(weight, WeightRule) else weight_rule(weight)
    if rule.kind == "fixed":
        value = rule.value
    else:
        reg = float(regulariser.detach())
        if ce is None or reg <= 0.0:
            # A zero regulariser adds nothing whatever its weight (the reference's CE / (0 + 1e-8) would log
            # a weight of ~1e8 on the first step, when the model still equals the base model).
            value = 1.0 if ce is None else 0.0
        else:
            value = float(ce.detach()) / (reg + 1e-8)
        value = min(value, rule.value)
    if rule.warmup:
        value *= min(1.0, step / rule.warmup)
    return value


# ---------------------------------------------------------------------------------------------- composition


@dataclass
class ReplayTargets:
    """The reference side of one replay batch ``[batch, length]``, per resolved hidden-state layer.

    ``bands`` and ``codes`` for ``tm`` (thresholds ``[hidden]``, labels ``uint8 [batch, length, hidden]``),
    ``features`` for ``l1`` / ``l2`` (``[batch, length, hidden]``), ``topk`` for ``kl`` (values and vocabulary
    ids ``[batch, length, k]``). Padding positions hold anything; the mask excludes them.
    """

    bands: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    codes: dict[int, torch.Tensor] = field(default_factory=dict)
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    topk: tuple[torch.Tensor, torch.Tensor] | None = None


def replay_losses(
    parts: tuple[str, ...],
    logits: torch.Tensor,
    hidden_states: dict[int, torch.Tensor],
    labels: torch.Tensor,
    mask: torch.Tensor,
    targets: ReplayTargets | None,
    *,
    reduction: str = "nonzero",
    temperature: float = 2.0,
) -> dict[str, torch.Tensor]:
    """Each replay part of objective ``parts`` on one replay batch, named as logged (`gere.parts`).

    ``hidden_states`` maps each constrained layer to the current states ``[batch, length, hidden]``; a part
    over several layers is their mean. ``labels`` are the replay ids with ``IGNORE_INDEX`` on padding.
    """
    batch = ReplayBatch(logits, hidden_states, labels, mask, targets, reduction, temperature)
    return {part.loss: PART_LOSSES[name](batch) for name, part in REPLAY_PARTS.items() if name in parts}


@dataclass
class ReplayBatch:
    """One replay batch as a part's loss sees it (the arguments of `replay_losses`)."""

    logits: torch.Tensor
    hidden_states: dict[int, torch.Tensor]
    labels: torch.Tensor
    mask: torch.Tensor
    targets: ReplayTargets | None
    reduction: str = "nonzero"
    temperature: float = 2.0


def _per_layer(batch: ReplayBatch, loss: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The mean over the constrained layers of ``loss(layer, current hidden states)``."""
    values = [loss(layer, hidden) for layer, hidden in batch.hidden_states.items()]
    return sum(values) / len(values)


def _replay_ce(b: ReplayBatch) -> torch.Tensor:
    return causal_lm_ce(b.logits, b.labels)


def _replay_margin(b: ReplayBatch) -> torch.Tensor:
    t = b.targets
    return _per_layer(b, lambda layer, h: coded_margin_loss(h, t.codes[layer], *t.bands[layer], b.mask, b.reduction))


def _replay_kl(b: ReplayBatch) -> torch.Tensor:
    values, indices = b.targets.topk
    return topk_kl_loss(b.logits, values, indices, b.mask, b.temperature)


def _replay_feature(norm: str) -> Callable[[ReplayBatch], torch.Tensor]:
    return lambda b: _per_layer(b, lambda layer, h: feature_loss(h, b.targets.features[layer], b.mask, norm=norm))


#: Each replay part's loss on one replay batch, by its name in ``objective``; `gere.parts.REPLAY_PARTS` says
#: what each reads of the model and which reference target it compares with.
PART_LOSSES: dict[str, Callable[[ReplayBatch], torch.Tensor]] = {
    "ce": _replay_ce,
    "tm": _replay_margin,
    "kl": _replay_kl,
    "l1": _replay_feature("l1"),
    "l2": _replay_feature("l2"),
}


def combine_losses(
    parts: dict[str, torch.Tensor], weight: float | str | WeightRule, step: int = 1, params=None
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss from its logged parts, and the weight given to each regulariser.

    ``CE = mean(task_ce, replay_ce)`` (whichever are present, as the reference averages them), then
    ``loss = CE + sum_r w_r * r`` over the regularisers present, with ``w_r`` = ``weight`` or, for ``dy``,
    CE / r (detached; see `resolve_margin_weight`), plus any weight penalty (`gere.parts.PENALTIES`) as is.
    ``step``: the optimisation step within the task (1-based), for a weight with a warm-up. A
    gradient-balanced rule (``gb``) needs ``params``, the trainable parameters (`gere.balance`).
    """
    rule = weight if isinstance(weight, WeightRule) else weight_rule(weight)
    if rule.kind == BALANCED and any(p.weight and p.loss in parts for p in REPLAY_PARTS.values()):
        if params is None:
            raise GeReError("a gradient-balanced margin weight (gb:<fraction>) needs the trainable parameters")
        from gere.balance import balanced_loss

        return balanced_loss(parts, rule, step, params)
    ce_terms = [parts[n] for n in (TASK_CE, REPLAY_PARTS["ce"].loss) if n in parts]
    ce = sum(ce_terms) / len(ce_terms) if ce_terms else None
    total = ce if ce is not None else 0.0
    weights: dict[str, float] = {}
    for part in REPLAY_PARTS.values():
        if part.weight is not None and part.loss in parts:
            w = resolve_margin_weight(rule, ce, parts[part.loss], step)
            weights[part.weight] = w
            total = total + w * parts[part.loss]
    for name in PENALTIES:  # weight penalties (EWC) carry their own strength
        if name in parts:
            total = total + parts[name]
    return total, weights


def loss_contributions(parts: dict[str, torch.Tensor], weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Each part as it enters the training loss of `combine_losses` (the CE terms divided by their count,
    each regulariser times its weight, penalties as they are): the terms whose sum is the loss, named after
    their parts. The gradient-share diagnostic (`gere.diagnostics`) takes the gradient of each."""
    ce_names = [n for n in (TASK_CE, REPLAY_PARTS["ce"].loss) if n in parts]
    out = {n: parts[n] / len(ce_names) for n in ce_names}
    for part in REPLAY_PARTS.values():
        if part.weight is not None and part.loss in parts:
            out[part.loss] = weights[part.weight] * parts[part.loss]
    out.update({n: parts[n] for n in PENALTIES if n in parts})
    return out
