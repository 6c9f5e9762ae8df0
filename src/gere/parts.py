"""The replay objectives and the loss parts they log: one table for the whole package.

Training logs (`gere.trainer`), a run's loss history (`gere.continual.runner`), results, reports and plots
(`gere.continual.report`) all read the names from here, so a part that is logged is also recorded and
plotted. This module imports nothing heavy: `gere.config` validates settings with it without torch.

An objective is written as replay parts joined by ``+`` (``ce+tm`` is the paper's best, BaselineR+TM;
GeRe, arXiv 2508.04676, Sec. 3-4). ``ce`` is a fitting term averaged with the task cross-entropy; every
other part is a regulariser multiplied by the regulariser weight (``margin_weight``: a number, or ``dy``).

`REPLAY_PARTS` also says what each part compares: what it reads of the model under training (its logits, or
its hidden states at ``layers``) and which target the reference gives it (`gere.reference`: read from the
activation store, or computed by the adapter-disabled model). The store keeps exactly the targets of its
objective (`gere.store.format.StoreSpec.for_config`), the trainer asks for hidden states only when a part
reads them, and each part's loss is its entry in `gere.losses.PART_LOSSES`. Adding an objective is its loss
function there and one row here (docs/architecture.md, "How to add a replay objective").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gere.baselines.settings import BASELINE_SETTINGS
from gere.errors import GeReError

#: What a part reads of the model under training on the replay batch.
LOGITS, HIDDEN = "logits", "hidden"
#: The reference targets a part compares with, as the store keeps them (``contents`` of its manifest): the
#: base model's label codes and thresholds per hidden dimension (``tm``, 2 bits an element), its hidden states
#: (``features``, in ``feature_dtype``), or its top-k logits (``topk``, ``kl_topk`` of them per token).
CODES, FEATURES, TOPK = "codes", "features", "topk"


@dataclass(frozen=True)
class ReplayPart:
    """One replay objective: its name in ``objective``, the loss part it logs, its logged weight, what it
    reads of the model (`LOGITS` or `HIDDEN`) and the reference target it needs (`CODES`, `FEATURES`, `TOPK`;
    None: the replay text's own next tokens, no reference)."""

    name: str
    loss: str
    weight: str | None  # None: a fitting term (ce), not weighted
    reads: str
    target: str | None


REPLAY_PARTS: dict[str, ReplayPart] = {
    part.name: part
    for part in (
        ReplayPart("ce", "replay_ce", None, LOGITS, None),  # label fitting on the replay text (BaselineR)
        ReplayPart("tm", "replay_margin", "margin_weight", HIDDEN, CODES),  # threshold-based margin loss
        ReplayPart("kl", "replay_kl", "kl_weight", LOGITS, TOPK),  # logit imitation
        ReplayPart("l1", "replay_l1", "l1_weight", HIDDEN, FEATURES),  # feature imitation, absolute error
        ReplayPart("l2", "replay_l2", "l2_weight", HIDDEN, FEATURES),  # feature imitation, squared error
    )
}


def reads_hidden_states(parts: Sequence[str]) -> bool:
    """Whether any of the objective's ``parts`` reads hidden states (the model runs with them, at ``layers``)."""
    return any(REPLAY_PARTS[p].reads == HIDDEN for p in parts)


def reference_targets(parts: Sequence[str]) -> frozenset[str]:
    """The reference targets the objective's ``parts`` compare with: what its store must keep (empty: none)."""
    return frozenset(REPLAY_PARTS[p].target for p in parts) - {None}

TASK_CE = "task_ce"
TOTAL = "loss"
#: The continual-learning baselines' loss parts (`gere.baselines`), added to the loss as they are (each carries
#: its own strength): EWC's weight penalty, LwF's distillation, O-LoRA's orthogonality and L2 penalties, the
#: cross-entropy of a separate batch of earlier tasks' examples; each baseline's section names its own.
PENALTIES = tuple(part for settings in BASELINE_SETTINGS for part in settings.parts)
#: Every loss part and weight a training step may log, in display order.
LOSS_PARTS = (TASK_CE, *(p.loss for p in REPLAY_PARTS.values()), *PENALTIES)
WEIGHTS = tuple(p.weight for p in REPLAY_PARTS.values() if p.weight is not None)
LOGGED = (TOTAL, *LOSS_PARTS, *WEIGHTS)
#: The gradient-share diagnostic's names (`gere.diagnostics`): each part's gradient norm on the trainable
#: parameters and its cosine with the total gradient, and the total's norm; logged on measured steps only.
GRAD_NORM, GRAD_COS, GRAD_NORM_TOTAL = "grad_norm_", "grad_cos_", "grad_norm_total"
GRAD_SHARE = (GRAD_NORM_TOTAL, *(GRAD_NORM + p for p in LOSS_PARTS), *(GRAD_COS + p for p in LOSS_PARTS))
#: What the Trainer itself logs each step and a run's loss history keeps beside the parts.
TRAINER_LOGGED = ("grad_norm", "learning_rate")

#: How the margin loss is reduced over elements: sum / non-zero elements (the reference), / real, or sum.
REDUCTIONS = ("nonzero", "mean", "sum")


def checked_loss_parts(penalties: Sequence[Callable]) -> list[Callable]:
    """Each loss part's ``.name`` (or ``.names``, for one returning a dict of parts) must be a
    `gere.parts.PENALTIES` entry: the names the logs, the loss history and the plots know."""
    unknown = [n for p in penalties for n in getattr(p, "names", (getattr(p, "name", None),)) if n not in PENALTIES]
    if unknown:
        raise GeReError(f"penalties must be named one of {PENALTIES} (got {unknown})")
    return list(penalties)
