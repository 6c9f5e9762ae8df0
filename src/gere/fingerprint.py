"""Fingerprints that decide whether an activation store still belongs to a model, tokenizer and replay set.

A model's fingerprint hashes its configuration and a digest of its weights: for every tensor its name,
shape, dtype, its float64 sum and up to 4,096 evenly strided elements. This reads each weight once (no
copy to disk) and changes when any tensor is retrained, replaced or reshaped. For a PEFT model the adapter
weights are left out: the store describes the base model.
"""

from __future__ import annotations

import hashlib
import json

import torch

# Config keys that describe how a model was loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "quantization_config",
    "_commit_hash",
    "use_cache",
    "output_hidden_states",
    "_attn_implementation_autoset",
}
_SAMPLES_PER_TENSOR = 4096


def _base_model(model):
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_fingerprint(model) -> str:
    base = _base_model(model)
    config = {k: v for k, v in base.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(base.state_dict().items()):
            if "lora_" in name or "modules_to_save" in name:
                continue
            flat = tensor.detach().reshape(-1)
            h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            if flat.numel() == 0:
                continue
            stride = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
            sample = flat[::stride][:_SAMPLES_PER_TENSOR].to(torch.float32).cpu().numpy()
            h.update(sample.tobytes())
            if flat.is_floating_point():
                h.update(repr(float(torch.sum(flat, dtype=torch.float64))).encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Truncation and padding are call-time settings that transformers changes on the fly.
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()
