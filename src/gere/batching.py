"""Batches and forward passes of a causal LM, written once for extraction, training and evaluation.

Padding, the pad id, where a model lives, length-sorted batches, which hidden states a layer index names,
and a forward pass that returns hidden states without computing logits it does not need.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from gere.errors import GeReError

#: Label value that cross-entropy skips: prompt tokens, padding.
IGNORE_INDEX = -100


def pad_token_id(tokenizer) -> int:
    """The id to pad with: pad, else eos, else unk. Padding sits behind the attention mask, so without any
    of them any id will do."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right", device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Pad id lists into one ``[batch, length]`` tensor.

    Returns ``(input_ids, attention_mask, position_ids, offsets)``; ``offsets[b]`` is where sequence b starts
    (0 for right padding). Position ids count real tokens only, so a left-padded sequence sees the same
    positions as unpadded.
    """
    if side not in ("left", "right"):
        raise GeReError(f"padding side must be 'left' or 'right', got {side!r}; set tokenizer.padding_side")
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    offsets = []
    for row, seq in enumerate(sequences):
        start = length - len(seq) if side == "left" else 0
        ids[row, start : start + len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, start : start + len(seq)] = 1
        offsets.append(start)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device), offsets


def batches(order: Sequence[int], size: int) -> Iterator[list[int]]:
    """Consecutive slices of ``order`` of ``size`` items (the last may be shorter)."""
    if size < 1:
        raise GeReError(f"batch_size must be at least 1, got {size}")
    for start in range(0, len(order), size):
        yield list(order[start : start + size])


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Sample indices grouped into batches of similar length (longest first, ties in index order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return list(batches(order, batch_size))


class KeepColumns:
    """A collator that carries integer ``columns`` (a loss part's own batch columns, such as LwF's row index)
    past another one, which may build batches from the columns it knows only: they are taken out of each
    example, the inner collator batches the rest, and they come back as tensors, one value per row.
    Examples without them pass through."""

    def __init__(self, collator: Callable, columns: Sequence[str]):
        self.collator, self.columns = collator, tuple(columns)

    def __getattr__(self, name):  # the inner collator's settings (its tokenizer, padding, ...) stay visible
        if name in ("collator", "columns"):
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, features):
        if not features or not isinstance(features[0], Mapping) or not set(self.columns) & set(features[0]):
            return self.collator(features)
        kept = {c: [int(f[c]) for f in features] for c in self.columns if c in features[0]}
        batch = self.collator([{k: v for k, v in f.items() if k not in kept} for f in features])
        rows = len(batch["input_ids"]) if "input_ids" in batch else None
        if rows != len(features):
            raise GeReError(
                f"the collator made {rows} rows of {len(features)} examples, but {', '.join(kept)} is read row by "
                "row (LwF distils each row toward its own targets); turn packing and padding-free batches off"
            )
        batch.update({c: torch.tensor(values) for c, values in kept.items()})
        return batch


def model_device(model) -> torch.device:
    """Where ``model`` runs: its ``device`` attribute, else its first parameter's device, else the CPU."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Put `model` in eval mode without gradients; restore its previous training mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator[None]:
    """A peft model run as its base model (``disable_adapter``), keeping which parameters train: peft's
    context turns gradients back on for every active adapter when it exits, frozen ones too (O-LoRA's)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with model.disable_adapter():
            yield
    finally:
        for p, flag in flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


@contextlib.contextmanager
def placed_on(model, device) -> Iterator[torch.device]:
    """Yield the device to run ``model`` on; a model elsewhere is moved there and back afterwards. A model
    spread over several devices (``hf_device_map``) stays where it is."""
    home = model_device(model)
    target = home if device is None else torch.device(device)
    if target == home or getattr(model, "hf_device_map", None):
        yield home
        return
    model.to(target)
    try:
        yield target
    finally:
        model.to(home)


def accepts_argument(model, name: str) -> bool:
    """Whether the (base) model's ``forward`` takes ``name``; argument names moved during transformers 5.x."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def num_hidden_states(model) -> int:
    """How many hidden states the model returns: embeddings plus one per layer."""
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if layers is None:
        raise GeReError("the model config has no num_hidden_layers; cannot resolve which layers to use")
    return int(layers) + 1


def resolve_layers(layers: Sequence[int], num_states: int) -> tuple[int, ...]:
    """Layer indices (0 = embeddings, -1 = last layer after the final norm) as sorted, distinct
    non-negative indices of ``hidden_states``."""
    resolved = set()
    for layer in layers:
        index = layer + num_states if layer < 0 else layer
        if not 0 <= index < num_states:
            raise GeReError(
                f"layer {layer} is out of range: the model has hidden states 0..{num_states - 1} "
                f"(or -1..-{num_states})"
            )
        resolved.add(index)
    return tuple(sorted(resolved))


def check_context_length(model, max_length: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > int(limit):
        raise GeReError(
            f"replay max length {max_length} is longer than the model's context ({limit} positions); "
            f"set replay_max_length to {limit} or less",
            setting="replay_max_length",
        )


def forward_hidden_states(model, ids, mask, layers: Sequence[int], want_logits: bool = False):
    """``({layer: hidden states}, logits or None)`` of one forward pass. Without ``want_logits`` the
    vocabulary projection runs at one position only (``logits_to_keep=1``) where the model allows it."""
    extra = {}
    if not want_logits and accepts_argument(model, "logits_to_keep"):
        extra["logits_to_keep"] = 1
    outputs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False, **extra)
    states = {layer: outputs.hidden_states[layer] for layer in layers}
    return states, (outputs.logits if want_logits else None)


def forward_batches(
    model, token_lists, batches, batch_numbers, layers, pad_id: int, *, want_logits: bool = False,
    device=None, desc: str = "forward", progress: bool = True,
) -> Iterator[tuple[int, dict[int, torch.Tensor], torch.Tensor | None]]:  # fmt: skip
    """No-grad forward passes over ``batches[b]`` (lists of indices into ``token_lists``) for each b of
    ``batch_numbers``, right-padded, in eval mode on ``device`` (see `placed_on`).

    Yields ``(b, {layer: rows}, logits rows or None)`` where rows are the real tokens' ``[tokens, ...]``, one
    sample after another (right padding puts a row's real tokens first). Close the generator (or exhaust
    it) to put the model back: use ``contextlib.closing`` when stopping early.
    """
    from tqdm.auto import tqdm

    with eval_mode(model), placed_on(model, device) as run_device:
        for batch_no in tqdm(batch_numbers, desc=desc, disable=not progress):
            ids, mask, _, _ = pad_batch([token_lists[i] for i in batches[batch_no]], pad_id, "right", run_device)
            states, logits = forward_hidden_states(model, ids, mask, layers, want_logits)
            real = mask.bool()
            yield batch_no, {layer: states[layer][real] for layer in layers}, (logits[real] if want_logits else None)
