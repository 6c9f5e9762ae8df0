"""Replay objectives as pure functions: tensors in, a scalar out.

The paper (GeRe, arXiv 2508.04676, Sec. 3) compares several ways to replay a fixed set of general texts:

- ``ce``  label fitting on the replay text ("BaselineR"): next-token cross-entropy;
- ``kl``  logit imitation: KL(base || current) at a temperature (2 by default);
- ``l1`` / ``l2``  feature imitation on the hidden states;
- ``tm``  the threshold-based margin loss on the hidden states (activation states).

Objectives are written as ``+``-joined names (``ce+tm`` is the paper's best, BaselineR+TM). ``ce`` is a
fitting term added to the task cross-entropy; every other part is a regulariser multiplied by the margin
weight (a number, or ``dy``: CE / regulariser, detached).

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

import torch
import torch.nn.functional as F

from gere.errors import GeReError

# Label codes stored per element; 2 bits each in the activation store.
CODE_NEGATIVE = 0
CODE_NEUTRAL = 1
CODE_POSITIVE = 2

REPLAY_PARTS = ("ce", "kl", "l1", "l2", "tm")
REDUCTIONS = ("nonzero", "mean", "sum")

# Elements processed at a time by the margin loss (rows = CHUNK_ELEMENTS // hidden): bounds its float
# temporaries to a few MiB instead of batch x length x hidden. CHUNK_ROWS, when set, fixes the rows instead.
CHUNK_ELEMENTS = 1 << 20
CHUNK_ROWS: int | None = None


def parse_objective(objective: str) -> tuple[str, ...]:
    """Split ``"ce+tm"`` into ``("ce", "tm")``; ``"none"`` gives ``()``. Unknown parts raise `GeReError`."""
    text = str(objective).strip().lower()
    if text in ("", "none"):
        return ()
    parts = tuple(p.strip() for p in text.split("+"))
    bad = [p for p in parts if p not in REPLAY_PARTS]
    if bad or len(set(parts)) != len(parts):
        raise GeReError(
            f"objective {objective!r} is not valid: use 'none' or parts from {', '.join(REPLAY_PARTS)} "
            "joined by '+', each once (for example 'ce+tm')"
        )
    return parts


def thresholds(mean: torch.Tensor, std: torch.Tensor, k: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension (low, high) = mean -/+ k*std. Shapes ``[hidden]``."""
    return mean - k * std, mean + k * std


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
    -100 on positions to ignore; mean over the counted tokens (0 when there are none)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(logits.device)
    count = (shift_labels != -100).sum()
    if int(count) == 0:
        return shift_logits.sum() * 0.0
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
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

    The base distribution is the softmax of its top-k logits at ``temperature`` (the rest of the vocabulary
    carries the remaining mass only in the current model); the loss is KL(base_topk || current) summed over
    the k entries, averaged over real tokens. With k = vocabulary size it is the full KL.

    Shapes: ``logits`` ``[batch, length, vocab]``, ``ref_values``/``ref_indices`` ``[batch, length, k]``.
    """
    log_q = F.log_softmax(logits.float() / temperature, dim=-1)
    log_q_k = torch.gather(log_q, -1, ref_indices.to(logits.device).long())
    log_p = F.log_softmax(ref_values.to(logits.device).float() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q_k)).sum(-1)
    if mask is None:
        return kl.mean()
    m = mask.to(logits.device).float()
    return (kl * m).sum() / m.sum().clamp_min(1.0)


def parse_margin_weight(value: str | float | int) -> float | str:
    """``"dy"`` stays ``"dy"``; numbers (or numeric strings such as ``"100"``) become floats."""
    if isinstance(value, str) and value.strip().lower() in ("dy", "dynamic"):
        return "dy"
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise GeReError(f"margin weight {value!r} is not a number or 'dy' (dynamic: CE / margin)") from None
    if not weight >= 0 or weight == float("inf"):
        raise GeReError(f"margin weight {value!r} must be a finite number >= 0, or 'dy'")
    return weight


def resolve_margin_weight(weight: float | str, ce: torch.Tensor | None, regulariser: torch.Tensor) -> float:
    """The weight applied to a regulariser: the fixed number, or for ``dy`` CE / regulariser (detached)."""
    if weight != "dy":
        return float(weight)
    value = float(regulariser.detach())
    if ce is None or value <= 0.0:
        # A zero regulariser adds nothing whatever its weight (the reference's CE / (0 + 1e-8) would log
        # a weight of ~1e8 on the first step, when the model still equals the base model).
        return 1.0 if ce is None else 0.0
    return float(ce.detach()) / (value + 1e-8)
