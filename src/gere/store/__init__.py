"""The activation store: what the frozen base model computes on the replay set, stored once.

- `gere.store.format`: the files, label packing, the manifest, `StoreSpec` and `open_store` (numpy and
  safetensors only);
- `gere.store.extract`: `extract_store`, the forward pass that builds a store, split across processes;
- `gere.store.fingerprint`: the identity of a store (model, tokenizer, replay set, settings).

The names below are importable from ``gere.store`` itself and load their module on first use.
`FEATURE_DTYPES` is defined here, not in `gere.store.format`, so that `gere.config` checks its
``feature_dtype`` setting against the store's own list without importing numpy.
"""

from __future__ import annotations

import importlib
import warnings

#: Dtypes of the hidden states a store records for the l1 / l2 objectives.
FEATURE_DTYPES = ("float16", "bfloat16")

_EXPORTS = {
    "ActivationStore": "gere.store.format",
    "StoreSpec": "gere.store.format",
    "open_store": "gere.store.format",
    "check_identity": "gere.store.format",
    "pack_codes": "gere.store.format",
    "unpack_codes": "gere.store.format",
    "label_codes": "gere.store.format",
    "IDENTITY_KEYS": "gere.store.format",
    "extract_store": "gere.store.extract",
    "ExtractionStopped": "gere.store.extract",
    "expected_manifest": "gere.store.fingerprint",
    "shared_manifest": "gere.store.fingerprint",
    "model_fingerprint": "gere.store.fingerprint",
    "tokenizer_fingerprint": "gere.store.fingerprint",
}
# Moved out of the store by the 0.2 layout; resolvable here until the next release.
_MOVED = {
    "pad_batch": "gere.batching",
    "pad_token_id": "gere.batching",
    "model_device": "gere.batching",
    "length_sorted_batches": "gere.batching",
    "check_context_length": "gere.batching",
    "replay_statistics": "gere.reference",
}
__all__ = ["FEATURE_DTYPES", *_EXPORTS]


def pad_right(token_lists, pad_id, device):
    """Deprecated: ``gere.batching.pad_batch(token_lists, pad_id, "right", device)[:2]``."""
    warnings.warn(
        "gere.store.pad_right moved to gere.batching.pad_batch(..., side='right'); the old name goes away "
        "in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    from gere.batching import pad_batch

    return pad_batch(token_lists, pad_id, "right", device)[:2]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MOVED:
        warnings.warn(
            f"gere.store.{name} moved to {_MOVED[name]}.{name}; import it from there "
            "(the old path goes away in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'gere.store' has no attribute {name!r}")
