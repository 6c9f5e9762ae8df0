"""Task batches at the processor's speed: rows of similar length batched together, and the vocabulary
projection only where the task loss counts; and the task batch's logits for loss parts that read them.

Task inputs of a benchmark such as O-LoRA's CL_Benchmark run from a dozen tokens to over a thousand; batches
drawn at random and padded to their longest row spend much of a step on padding. `LengthGroupedSampler`
puts rows of similar length in the same micro-batch (a change of batch composition, off unless asked for:
``train_sampling_strategy='group_by_length'``, a run config's ``training.group_by_length``). The task loss covers
the answer tokens only, so `answer_logits_inputs` asks the model (its own ``logits_to_keep``) for the logits
of those positions alone: an exact change, the same loss and gradients for less work and memory. Measured
in benchmarks/bench_padding.py.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import Sampler

from gere.batching import IGNORE_INDEX, accepts_argument, batches
from gere.errors import GeReError

#: A window of at most this many micro-batches is length-grouped at a time (transformers' LengthGroupedSampler
#: sorts mega-batches of 50 batches): wide enough to find rows of similar length, narrow enough that the order
#: of the epoch stays random beyond it.
GROUP_WINDOW = 50


def row_lengths(dataset, column: str = "input_ids") -> list[int]:
    """The token count of every training row: ``len(row[column])``, read as a column where the dataset has one."""
    names = getattr(dataset, "column_names", None)
    if names is not None and column in names:
        return [len(ids) for ids in dataset[column]]
    try:
        return [len(dataset[i][column]) for i in range(len(dataset))]
    except (KeyError, TypeError):
        raise GeReError(
            f"group_by_length needs each training row's {column!r} to count its tokens; give the rows "
            f"{column!r} or turn train_sampling_strategy 'group_by_length' off"
        ) from None


class LengthGroupedSampler(Sampler[int]):
    """Another sampler's order with rows of similar length in the same micro-batch, so that little of a
    padded batch is padding.

    The stream of ``inner`` (or, without one, a seeded permutation) is cut into windows of ``window``
    micro-batches of ``micro_batch`` indices. Within a window the indices below ``num_grouped`` (task rows)
    are sorted by length and dealt out in runs to the window's micro-batches, taken in a seeded random order;
    every other index (a replay placeholder, a buffered row) keeps its place, so the inner sampler's promises
    (exactly k replay samples in every global batch, each task row once per epoch) still hold. Only which task
    rows share a micro-batch changes, and a window's micro-batches still reach the steps in random order.
    Seeded by ``(seed, epoch, window)``: the same order on every run, and again after a resume.
    """

    def __init__(self, lengths: Sequence[int], micro_batch: int, seed: int = 0, inner: Sampler | None = None,
                 num_grouped: int | None = None, window: int | None = None):  # fmt: skip
        if micro_batch < 1:
            raise GeReError(f"batch_size must be at least 1, got {micro_batch}")
        self.lengths, self.micro_batch, self.seed, self.inner = list(lengths), micro_batch, seed, inner
        self.num_grouped = len(self.lengths) if num_grouped is None else num_grouped
        if window is None:  # transformers' rule: 50 batches, or 4 windows an epoch where that is fewer
            window = min(len(self) // (micro_batch * 4), GROUP_WINDOW)
        self.window, self.epoch = max(1, window), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner) if self.inner is not None else len(self.lengths)

    def _stream(self) -> list[int]:
        if self.inner is not None:
            return list(self.inner)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.lengths), generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        stream, span = self._stream(), self.window * self.micro_batch
        for number, start in enumerate(range(0, len(stream), span)):
            yield from self._grouped(stream[start : start + span], number)

    def _grouped(self, part: list[int], number: int) -> list[int]:
        """One window: its task rows sorted by length (longest first), dealt in runs to its micro-batches."""
        slots = [p for p, i in enumerate(part) if i < self.num_grouped]
        rows = sorted((part[p] for p in slots), key=lambda i: -self.lengths[i])
        chunks: list[list[int]] = [[] for _ in range(-(-len(part) // self.micro_batch))]
        for p in slots:
            chunks[p // self.micro_batch].append(p)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + number)
        out, taken = list(part), 0
        for c in torch.randperm(len(chunks), generator=generator).tolist():
            for p, row in zip(chunks[c], rows[taken : taken + len(chunks[c])]):
                out[p] = row
            taken += len(chunks[c])
        return out


def padded_share(lengths: Sequence[int], order: Sequence[int], micro_batch: int) -> float:
    """The share of padding in the right-padded micro-batches that ``order`` makes of rows of ``lengths``:
    padded positions / all positions, each micro-batch padded to its longest row."""
    real = padded = 0
    for batch in batches(order, micro_batch):
        sizes = [lengths[i] for i in batch]
        real, padded = real + sum(sizes), padded + max(sizes) * len(sizes) - sum(sizes)
    return padded / max(real + padded, 1)


def groups_by_length(args) -> bool:
    """Whether training arguments ask for length-grouped batches: ``train_sampling_strategy='group_by_length'``
    (transformers 5), ``group_by_length=True`` (transformers 4)."""
    strategy = getattr(args, "train_sampling_strategy", None)
    return strategy == "group_by_length" or bool(getattr(args, "group_by_length", False))


def projects_answer_logits(model) -> bool:
    """Whether `answer_logits_inputs` fits ``model`` (or the base of a peft model): a causal LM of
    transformers whose ``forward`` takes ``logits_to_keep`` as a boolean mask and whose loss is transformers'
    causal-LM loss, which takes ``shift_labels``. Elsewhere the task loss projects every position, as before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "loss_type", None) != "ForCausalLM" or not accepts_argument(base, "logits_to_keep"):
        return False
    # A boolean [batch, length] mask is read by transformers' slice_logits_to_keep (5.x from about 5.2 on);
    # a model whose module slices by hand (transformers 5.0, remote code) takes only an int or 1-D positions.
    return getattr(sys.modules.get(type(base).__module__), "slice_logits_to_keep", None) is not None


def answer_logits_inputs(inputs: Mapping) -> dict:
    """A causal-LM batch's inputs with the vocabulary projection asked for only where the loss counts.

    Position t of a causal LM predicts label t + 1, so only the positions whose next label is not
    ``IGNORE_INDEX`` (the answer tokens of a task row) need logits. The model's own ``logits_to_keep`` takes
    them as a boolean ``[batch, length]`` mask and returns their logits flattened (``[kept, vocab]``);
    ``shift_labels`` hands its loss function the labels of those positions in the same order, so the loss (a
    mean over the same tokens) and its gradients equal the full projection's up to float rounding.
    """
    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return {**inputs, "logits_to_keep": keep, "shift_labels": labels[:, 1:][keep[:, :-1]]}


def length_grouped(sampler: Sampler | None, args, dataset, micro_batch: int, num_grouped: int | None = None):
    """``sampler`` as it is, or, when ``args`` ask for length-grouped batches (`groups_by_length`), a
    `LengthGroupedSampler` over it (``None``: over a seeded shuffle) seeded by ``data_seed`` or ``seed``. Unlike
    transformers' own, it groups the rows of any sampler (batch interpolation, a baseline's) and moves only the
    indices below ``num_grouped`` (default: the sampler's ``num_task``, else all)."""
    if not groups_by_length(args):
        return sampler
    if num_grouped is None:
        num_grouped = getattr(sampler, "num_task", None)
    seed = args.data_seed if args.data_seed is not None else args.seed
    return LengthGroupedSampler(row_lengths(dataset), micro_batch, seed, sampler, num_grouped)


def task_logits(model, inputs: dict, outputs) -> tuple[torch.Tensor, bool]:
    """The task batch's logits for loss parts on the batch, and whether they took a forward pass of their own:
    the parent trainer's outputs' logits when they carry a gradient; otherwise (no outputs asked for, or TRL's
    fused LM head, which recomputes them without one) the model's, from a pass with the gradient."""
    logits = None if outputs is None else outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    if logits is not None and (logits.requires_grad or not torch.is_grad_enabled()):
        return logits, False
    return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits, True
