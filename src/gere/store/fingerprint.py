"""The identity of an activation store: fingerprints of the model, tokenizer and replay set, and settings.

A model's fingerprint hashes its configuration and a digest of its weights: for every tensor its name,
shape, dtype, its float64 sum and up to 4,096 evenly strided elements. This reads each weight once (no
copy to disk) and changes when any tensor is retrained, replaced or reshaped. For a PEFT model the adapter
weights are left out: the store describes the base model.

Where the weights are sharded across processes the fingerprint must still be the one of the full model,
so that a store extracted on one process is recognised by a sharded training run: DeepSpeed ZeRO-3
parameters are gathered one at a time (a collective: every process computes the fingerprint, in the same
order); FSDP flat parameters, DTensors and meta tensors are refused with a message naming the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json

import torch

from gere import __version__, distributed
from gere.batching import num_hidden_states, resolve_layers
from gere.distributed import is_zero3_partitioned, sharded_parameters
from gere.errors import GeReError
from gere.replay.replay_set import ReplaySet
from gere.store.format import StoreSpec, check_identity

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


def _gathered(tensor, deepspeed):
    """A context giving the full ``tensor``: ZeRO-3 partitions are gathered for its duration."""
    if deepspeed is not None and hasattr(tensor, "ds_numel"):
        return deepspeed.zero.GatheredParameters([tensor], modifier_rank=None)
    return contextlib.nullcontext()


def model_fingerprint(model) -> str:
    base = _base_model(model)
    config = {k: v for k, v in base.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    reason = sharded_parameters(base)
    deepspeed = None
    if reason is not None:
        if not is_zero3_partitioned(base):
            raise GeReError(
                f"cannot fingerprint the model for its activation store: {reason}. Build or check the store "
                "before the model is sharded (GeReTrainer does so before wrapping it), or extract it once "
                "on one process with `gere extract --store-dir DIR` and train with that store"
            )
        try:
            import deepspeed  # only present when ZeRO-3 made the parameters above
        except ImportError:
            raise GeReError(
                f"{reason}, but deepspeed cannot be imported to gather them; install gere[deepspeed]"
            ) from None
    with torch.no_grad():
        # keep_vars keeps the Parameter objects, whose ZeRO-3 attributes detach() would drop.
        for name, param in sorted(base.state_dict(keep_vars=True).items()):
            if "lora_" in name or "modules_to_save" in name:
                continue
            with _gathered(param, deepspeed):
                _hash_tensor(h, name, param.data)
    return h.hexdigest()


def _hash_tensor(h, name: str, tensor: torch.Tensor) -> None:
    if tensor.is_meta:
        raise GeReError(
            f"cannot fingerprint the model: {name} is on the meta device (not loaded in this process); "
            "load the weights on every process, or extract the store on one process with `gere extract`"
        )
    flat = tensor.detach().reshape(-1)
    h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    if flat.numel() == 0:
        return
    stride = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
    sample = flat[::stride][:_SAMPLES_PER_TENSOR].to(torch.float32).cpu().numpy()
    h.update(sample.tobytes())
    if flat.is_floating_point():
        # Summed on the CPU wherever the weights are: a float64 sum of a large tensor depends on the order of
        # its additions in the last digits, and a GPU adds in another order, so a store made on one device
        # would look like another model's on the other.
        h.update(repr(float(torch.sum(flat.cpu(), dtype=torch.float64))).encode())


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


def expected_manifest(model, tokenizer, replay_set: ReplaySet, spec: StoreSpec) -> dict:
    """The identity of a store: what produced it and with which settings (`gere.store.format.IDENTITY_KEYS`)."""
    return {
        "model": model_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "replay_set": None if replay_set is None else replay_set.content_hash(),
        "max_length": spec.max_length,
        "k": spec.threshold_k,
        "layers": list(resolve_layers(spec.layers, num_hidden_states(model))),
        "contents": spec.contents(),
        "version": __version__,
    }


def check_store_belongs(store, model, tokenizer, spec: StoreSpec) -> None:
    """Refuse a store made by another model or tokenizer, or with other settings, than ``model`` trains
    with (the replay set is not checked: the store carries its own texts)."""
    expected = expected_manifest(model, tokenizer, None, spec)
    found = {**store.manifest, "replay_set": None}
    try:
        check_identity(found, {**expected, "contents": found["contents"]}, store.path)
    except GeReError as err:
        raise GeReError(
            f"{err}. A store passed to GeReTrainer must come from the model it trains; if this model is a later "
            "stage trained from the store's model (as in a continual run), pass check_store_model=False",
            setting="reuse_store",
        ) from None


def shared_manifest(model, tokenizer, replay_set: ReplaySet, spec: StoreSpec) -> dict:
    """`expected_manifest`, the same on every process. Where each process holds the full weights, process
    0 alone reads them (the others may hold none yet, e.g. FSDP's ``cpu_ram_efficient_loading``); ZeRO-3
    partitions are gathered by all processes together."""
    if is_zero3_partitioned(model):
        return expected_manifest(model, tokenizer, replay_set, spec)
    return distributed.run_on_main(
        lambda: expected_manifest(model, tokenizer, replay_set, spec), "fingerprinting the model"
    )
