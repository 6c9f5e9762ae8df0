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

The rows carry their position in the training set as ``gere_example_index`` (`INDEX`), which the trainer
takes out of the batch before the model sees it. Collators that build batches from known columns only (TRL's,
for one) would drop it: `KeepIndex`, which the trainer puts around its collator when an LwF part is given,
carries it past them. Packed or padding-free batches join rows, so LwF refuses them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from gere.baselines.settings import LWF_TOKENS
from gere.batching import eval_mode, length_sorted_batches, model_device, pad_batch
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


def task_logits(model, inputs: dict, outputs) -> tuple[torch.Tensor, bool]:
    """The task batch's logits for LwF, and whether they took a forward pass of their own: the parent
    trainer's outputs' logits when they carry a gradient; otherwise (no outputs asked for, or TRL's fused LM
    head, which recomputes them without one) the model's, from a pass with the gradient."""
    logits = None if outputs is None else outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    if logits is not None and (logits.requires_grad or not torch.is_grad_enabled()):
        return logits, False
    return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits, True


class KeepIndex:
    """A collator that carries `INDEX` past another one: the index is taken out of each example, the inner
    collator batches the rest, and the indices come back as a tensor. Examples without it pass through."""

    def __init__(self, collator: Callable):
        self.collator = collator

    def __getattr__(self, name):  # the inner collator's settings (its tokenizer, padding, ...) stay visible
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, features):
        if not features or not isinstance(features[0], Mapping) or INDEX not in features[0]:
            return self.collator(features)
        index = [int(f[INDEX]) for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != INDEX} for f in features])
        rows = len(batch["input_ids"]) if "input_ids" in batch else None
        if rows != len(index):
            raise GeReError(
                f"LwF: the collator made {rows} rows of {len(index)} examples; LwF distils row by row, so turn "
                "packing and padding-free batches off"
            )
        batch[INDEX] = torch.tensor(index)
        return batch


class LwF:
    """The previous stage's top-k logits on the current task's rows; a loss part for `gere.trainer.GeReMixin`.

    ``lwf = LwF(weight, temperature, topk)``; before each task ``lwf.prepare(model, rows, pad_id)`` (rows from
    `with_index`); the trainer then calls ``lwf(model, inputs, logits)`` on each task batch.
    """

    name = "lwf"
    uses_batch = True  # called with the task batch and its logits, not with the model alone

    def __init__(self, weight: float = 1.0, temperature: float = 2.0, topk: int = 64, batch_size: int = 8,
                 tokens: str = "all"):  # fmt: skip
        problems = [
            (tokens in LWF_TOKENS, f"tokens must be one of {LWF_TOKENS} (got {tokens!r})"),
            (0 < weight < math.inf, f"weight must be a finite number above 0 (got {weight}); leave LwF off instead"),
            (0 < temperature < math.inf, f"temperature must be above 0 (got {temperature})"),
            (topk >= 1, f"topk must be 1 or more (got {topk})"),
            (batch_size >= 1, f"batch_size must be 1 or more (got {batch_size})"),
        ]
        for ok, text in problems:
            if not ok:
                raise GeReError(f"LwF: {text}")
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
