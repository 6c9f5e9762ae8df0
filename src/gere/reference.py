"""Where the replay losses' reference targets come from: the activation store, or the model itself.

Every objective but plain CE compares the model under training with the frozen base model on the same
replay batch (GeRe, arXiv 2508.04676, Sec. 3). Two sources give the same `gere.losses.ReplayTargets`:

- `StoreReference` (``reference: store``): label codes, hidden states or top-k logits precomputed by
  `gere.store.extract.extract_store`, read from the memory-mapped store per batch;
- `OnlineReference` (``reference: online``, LoRA): a no-grad forward pass of the same model with its
  adapter disabled, which is exactly the base model; thresholds come from `replay_statistics`, computed
  once in memory. Nothing is written to disk.
"""

from __future__ import annotations

import numpy as np
import torch

from gere import distributed
from gere.batching import (
    adapters_disabled,
    check_context_length,
    forward_batches,
    length_sorted_batches,
    pad_token_id,
)
from gere.losses import CODE_NEUTRAL, ReplayTargets, threshold_codes
from gere.parts import CODES, FEATURES, TOPK, reads_hidden_states, reference_targets
from gere.stats import RunningStats, batch_statistics, thresholds
from gere.store.format import ActivationStore


class StoreReference:
    """Targets read from an activation store, for the store's samples ``indices``."""

    def __init__(self, store: ActivationStore, parts: tuple[str, ...], layers: tuple[int, ...]):
        self.store, self.layers, self.needs = store, layers, reference_targets(parts)
        self._bands = {
            layer: tuple(torch.from_numpy(t) for t in store.thresholds(layer)) for layer in layers
        } if CODES in self.needs else {}  # fmt: skip

    def targets(self, model, indices: list[int], ids: torch.Tensor, mask: torch.Tensor) -> ReplayTargets:
        device, real = ids.device, mask.bool()
        out = ReplayTargets()
        shape = (*ids.shape, self.store.hidden_size)
        for layer in self.layers:
            if CODES in self.needs:
                out.bands[layer] = tuple(t.to(device) for t in self._bands[layer])
                codes = torch.full(shape, CODE_NEUTRAL, dtype=torch.uint8, device=device)
                codes[real] = self._rows(lambda i, layer=layer: self.store.codes(i, layer), indices, device)
                out.codes[layer] = codes
            if FEATURES in self.needs:
                features = torch.zeros(shape, device=device)
                features[real] = self._rows(lambda i, layer=layer: self._features(i, layer), indices, device)
                out.features[layer] = features
        if TOPK in self.needs:
            k = int(self.store.contents["topk"])
            values = torch.zeros((*ids.shape, k), device=device)
            ids_k = torch.zeros((*ids.shape, k), dtype=torch.long, device=device)
            values[real] = self._rows(lambda i: self.store.topk(i)[0], indices, device).float()
            ids_k[real] = self._rows(lambda i: self.store.topk(i)[1], indices, device).long()
            out.topk = (values, ids_k)
        return out

    @staticmethod
    def _rows(read, indices: list[int], device) -> torch.Tensor:
        """The real-token rows of ``indices``, one sample after another (the order of a right-padded mask)."""
        return torch.from_numpy(np.concatenate([read(i) for i in indices])).to(device)

    def _features(self, index: int, layer: int) -> np.ndarray:
        rows = self.store.features(index, layer)
        if self.store.contents["feature_dtype"] == "bfloat16":
            return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16).float().numpy()
        return rows.astype(np.float32)


class OnlineReference:
    """Targets from the adapter-disabled model (a peft model's base), computed with every replay batch."""

    def __init__(self, stats: dict[int, RunningStats], parts: tuple[str, ...], threshold_k: float, kl_topk: int):
        self.needs, self.kl_topk = reference_targets(parts), kl_topk
        self.need_hidden = reads_hidden_states(parts)
        self.layers = tuple(stats)
        self._bands = {
            layer: tuple(torch.from_numpy(t).float() for t in thresholds(r.mean, r.std, threshold_k))
            for layer, r in stats.items()
        }

    def targets(self, model, indices: list[int], ids: torch.Tensor, mask: torch.Tensor) -> ReplayTargets:
        with torch.no_grad(), adapters_disabled(model):
            base = model(input_ids=ids, attention_mask=mask, output_hidden_states=self.need_hidden, use_cache=False)
        out = ReplayTargets()
        for layer in self.layers if self.need_hidden else ():
            states = base.hidden_states[layer]
            if CODES in self.needs:
                low, high = (t.to(ids.device) for t in self._bands[layer])
                out.bands[layer] = (low, high)
                out.codes[layer] = threshold_codes(states, low, high)
            if FEATURES in self.needs:
                out.features[layer] = states
        if TOPK in self.needs:
            out.topk = base.logits.float().topk(self.kl_topk, dim=-1)
        return out


def replay_statistics(
    model, tokenizer, token_lists: list[list[int]], layers: tuple[int, ...], *, batch_size: int = 8,
    progress: bool = True, device=None,
) -> dict[int, RunningStats]:  # fmt: skip
    """Per-dimension statistics of the model's states on the tokenised replay set, in memory (the online
    mode needs no store): ``{resolved layer: RunningStats}``.

    Reduced per length-sorted batch and merged in batch order exactly as extraction does, so they equal the
    store's statistics bit for bit. Under ``torch.distributed`` each process runs its share of the batches
    (as in `extract_store`) and every process returns the same merged statistics. ``device`` as there.
    """
    check_context_length(model, max(len(t) for t in token_lists))  # callers check the configured length
    distributed.require_full_parameters(model, "the replay statistics")
    rank, world = distributed.rank(), distributed.world_size()
    hidden = int(model.config.hidden_size)
    batches = length_sorted_batches([len(t) for t in token_lists], batch_size)
    per_batch: dict[int, dict[int, RunningStats]] = {layer: {} for layer in layers}
    own = range(rank, len(batches), world)
    error = None
    try:
        for batch_no, rows, _ in forward_batches(model, token_lists, batches, own, layers, pad_token_id(tokenizer),
                                                 device=device, desc="replay statistics",
                                                 progress=progress and rank == 0):  # fmt: skip
            for layer in layers:
                per_batch[layer][batch_no] = batch_statistics(rows[layer].float().cpu().numpy(), hidden)
    except Exception as err:  # reported to the other processes, then raised
        error = err
    distributed.raise_if_any_failed(error, "replay statistics")
    return {
        layer: distributed.fold_stats_in_key_order(range(len(batches)), per_batch[layer].get, hidden)
        for layer in layers
    }
