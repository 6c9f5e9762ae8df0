"""Learning without forgetting (LwF, Li & Hoiem 2016) for a causal LM: distillation toward the previous stage.

Before a task trains, the model as it is then (the previous stage's model; before the first task, the base
model) reads the task's own training inputs once, and its top-k next-token logits at every real token are
kept (float16 values and int32 vocabulary ids, on the CPU). While the task trains, each task batch's logits
are pulled toward them:

    lwf = weight * T^2 * mean over real tokens of KL(previous_k || current_k)

where both distributions are the softmax at temperature T over the previous model's k tokens of that
position (`gere.losses.topk_kl_loss`, the objective the ``kl`` replay part uses on general texts; T^2
keeps the gradient's scale independent of T, as in knowledge distillation). With ``tokens="all"`` (the
default) every real token of the training row is distilled, the prompt and the answer alike; with
``tokens="answer"`` only the positions that predict a labelled token (``labels`` not -100 at the next
position), i.e. the answer where the prompt is masked out of the labels.

No second model is kept: the previous model's outputs are computed once per task, at the task's start.
Memory: 6 * k bytes per training token (384 bytes at k = 64), for the stage's rows, held on the CPU; time:
one no-grad forward pass over the task's training rows per task. A crash mid-task resumes from the last
checkpoint, which is the previous stage's model, so the targets computed again are the same.

The rows carry their position in the training set as ``gere_example_index`` (`INDEX`), a batch column the
loss part names in its ``columns``: the trainer takes it out of the batch before the model sees it, and
carries it past collators that build batches from known columns only (TRL's, for one) with
`gere.batching.KeepColumns`. Packed or padding-free batches join rows, so LwF refuses them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gere.baselines.base import Baseline, Stage
from gere.baselines.settings import LwfSettings
from gere.batching import eval_mode, length_sorted_batches, model_device, pad_batch, pad_token_id
from gere.errors import GeReError
from gere.losses import topk_kl_loss

INDEX = "gere_example_index"


def lwf_loss(
    logits: torch.Tensor,
    ref_values: torch.Tensor,
    ref_indices: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """``T^2 * KL(previous_k || current_k)`` averaged over the positions where ``mask`` is 1.

    Shapes: ``logits`` ``[batch, length, vocab]``, ``ref_values``/``ref_indices`` ``[batch, length, k]``.
    """
    return temperature**2 * topk_kl_loss(logits, ref_values, ref_indices, mask, temperature)


def with_index(rows: Sequence[dict]) -> list[dict]:
    """The rows, each with its position as `INDEX` (what the trainer looks the targets up by)."""
    return [{**row, INDEX: i} for i, row in enumerate(rows)]


class LwF:
    """The previous stage's top-k logits on the current task's rows; a loss part for `gere.trainer.GeReMixin`.

    ``lwf = LwF(weight, temperature, topk)``; before each task ``lwf.prepare(model, rows, pad_id)`` (rows from
    `with_index`); the trainer then calls ``lwf(model, inputs, logits)`` on each task batch.
    """

    name = "lwf"
    uses_batch = True  # called with the task batch and its logits, not with the model alone
    columns = (INDEX,)  # the batch column it reads: each row's position, to look its targets up by

    def __init__(self, weight: float = 1.0, temperature: float = 2.0, topk: int = 64, batch_size: int = 8,
                 tokens: str = "all"):  # fmt: skip
        try:
            settings = LwfSettings(weight=weight, temperature=temperature, topk=topk, tokens=tokens)  # its rules, once
        except GeReError as err:
            raise GeReError(f"LwF: {err}") from None
        if not settings.on():
            raise GeReError(f"LwF: weight must be above 0 (got {weight}); leave LwF off instead")
        self.weight, self.temperature = float(weight), float(temperature)
        self.topk, self.batch_size, self.tokens = int(topk), int(batch_size), tokens
        self._targets: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def active(self) -> bool:
        return self._targets is not None

    @torch.no_grad()
    def prepare(self, model, rows: Sequence[dict], pad_id: int) -> None:
        """Run ``model`` (the previous stage) over ``rows`` once and keep its top-k logits per token."""
        if not rows:
            raise GeReError("LwF needs the task's training rows to distil on; the task has none")
        tokens = [list(row["input_ids"]) for row in rows]
        k = min(self.topk, model.config.get_text_config().vocab_size)
        device = model_device(model)
        targets: list = [None] * len(tokens)
        with eval_mode(model):
            for batch in length_sorted_batches([len(t) for t in tokens], self.batch_size):
                ids, mask, _, _ = pad_batch([tokens[i] for i in batch], pad_id, "right", device)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                values, indices = logits.float().topk(k, dim=-1)
                for row, i in enumerate(batch):
                    n = len(tokens[i])
                    targets[i] = (values[row, :n].to(torch.float16).cpu(), indices[row, :n].to(torch.int32).cpu())
        self._targets = targets

    def clear(self) -> None:
        self._targets = None

    def __call__(self, model, inputs: dict, logits: torch.Tensor) -> torch.Tensor:
        if self._targets is None:
            raise GeReError("LwF has no targets: call prepare(model, rows, pad_id) before the task trains")
        if INDEX not in inputs:
            raise GeReError(
                f"the task batch has no {INDEX!r}: build the rows with gere.baselines.lwf.with_index and keep the "
                "column (GeReTrainer keeps it; a collator of your own must pass it on)"
            )
        rows = [int(i) for i in inputs[INDEX].tolist()]
        batch, length = logits.shape[:2]
        real = inputs.get("attention_mask")
        values = torch.zeros((batch, length, self._k), dtype=torch.float32)
        indices = torch.zeros((batch, length, self._k), dtype=torch.long)
        mask = torch.zeros((batch, length), dtype=torch.float32)
        for b, i in enumerate(rows):
            if not 0 <= i < len(self._targets):
                raise GeReError(f"LwF: row {i} is not one of the {len(self._targets)} rows it was prepared on")
            v, ix = self._targets[i]
            # The row's real tokens, wherever the collator padded (right or left).
            where = real[b].bool().nonzero().squeeze(-1).cpu() if real is not None else torch.arange(length)
            if len(where) != len(v):
                raise GeReError(
                    f"LwF: row {i} has {len(where)} tokens in the batch but {len(v)} when its targets were "
                    "computed; prepare LwF on the same rows the trainer trains on"
                )
            values[b, where], indices[b, where], mask[b, where] = v.float(), ix.long(), 1.0
        if self.tokens == "answer":
            mask = mask * self._predicts_a_label(inputs, length)
        return self.weight * lwf_loss(logits, values, indices, mask, self.temperature)

    @staticmethod
    def _predicts_a_label(inputs: dict, length: int) -> torch.Tensor:
        """1 where the next position's label is not -100: the positions whose logits predict the answer."""
        labels = inputs.get("labels")
        if labels is None:
            raise GeReError("LwF with tokens='answer' needs the batch's labels; the collator gave none")
        predicts = torch.zeros(labels.shape[0], length)
        predicts[:, :-1] = (labels[:, 1:length] != -100).float().cpu()
        return predicts

    @property
    def _k(self) -> int:
        return int(self._targets[0][0].shape[-1]) if self._targets else self.topk


class LwfBaseline(Baseline):
    """LwF in a continual run (the ``lwf:`` section): before each task, the model as it is then (the previous
    stage) reads the task's rows (each with its `INDEX`) once; its targets are dropped after the task. Nothing
    is saved: a resumed stage starts from the previous stage's weights, so its targets come out the same."""

    def __init__(self, lwf: LwF):
        self.lwf = lwf

    settings_class = LwfSettings

    @classmethod
    def from_settings(cls, s: LwfSettings, cfg) -> LwfBaseline:
        return cls(LwF(s.weight, s.temperature, s.topk, cfg.evaluation.batch_size, s.tokens))

    def train_rows(self, stage: Stage) -> list[dict]:
        return with_index(stage.rows)

    def before_task(self, stage: Stage) -> list[dict]:
        self.lwf.prepare(stage.model, stage.rows, pad_token_id(stage.tokenizer))
        return []

    def loss_parts(self, stage: Stage) -> list:
        return [self.lwf]

    def after_task(self, stage: Stage) -> list[dict]:
        self.lwf.clear()  # the targets belong to this stage's rows
        return []
