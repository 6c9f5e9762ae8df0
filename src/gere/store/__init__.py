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
__all__ = ["FEATURE_DTYPES", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gere.store' has no attribute {name!r}")
