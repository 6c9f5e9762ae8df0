"""Figures 1 and 2 of the engine benchmarks: the activation store's bits per TM label element (goal <= 2) and
extraction throughput against a plain no-grad forward over the same batches (goal >= 0.9). Run through
`bench_engine.py` (``--figures 1,2``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from bench_common import Sizes, clock, median, since, spread

from gere.batching import length_sorted_batches, pad_batch, pad_token_id
from gere.replay.replay_set import ReplaySet, tokenize_replay_set
from gere.store.extract import extract_store
from gere.store.fingerprint import expected_manifest
from gere.store.format import StoreSpec, label_codes

FORWARDS = {
    # what a user would call
    "plain": {},
    # what extract_store calls
    "extraction_forward": {"output_hidden_states": True, "use_cache": False},
    # the same without the vocabulary head on every position: the hidden states are unchanged
    "hidden_only": {"output_hidden_states": True, "use_cache": False, "logits_to_keep": 1},
}


def forward_pass(model, token_lists, batches, pad_id, variant: str, keep: bool = False):
    """No-grad forward over the batches, called as in `FORWARDS[variant]`.

    With ``keep`` returns the last-layer states of the real tokens, in sample order (float32 numpy).
    """
    model.eval()
    kept: dict[int, np.ndarray] = {}
    with torch.no_grad():
        for members in batches:
            ids, mask, _, _ = pad_batch([token_lists[i] for i in members], pad_id, "right", "cpu")
            if variant == "plain":
                model(ids, mask)
                continue
            out = model(input_ids=ids, attention_mask=mask, **FORWARDS[variant])
            if keep:
                for row, i in enumerate(members):
                    kept[i] = out.hidden_states[-1][row, : len(token_lists[i])].float().numpy()
    return np.concatenate([kept[i] for i in range(len(token_lists))]) if keep else None


def store_bits(store, states: np.ndarray, work: Path) -> dict:
    """Figure 1: the store's label codes against a float32 file of the same states."""
    layer = store.layers[0]
    codes_file = store.path / f"tm_codes.L{layer}.npy"
    fp32_file = work / "states_fp32.npy"
    np.save(fp32_file, states)
    low, high = (t.astype(np.float64) for t in store.thresholds(layer))
    stored = np.concatenate([store.codes(i, layer) for i in range(len(store))])
    recomputed = label_codes(states.astype(np.float64), low, high)
    shares = np.bincount(stored.reshape(-1), minlength=3)[:3] / stored.size
    entropy = -sum(p * np.log2(p) for p in shares if p > 0)
    store_bytes = sum(p.stat().st_size for p in store.path.iterdir() if p.is_file())
    return {
        "tokens": int(store.offsets[-1]),
        "hidden": store.hidden_size,
        "bits_per_element": store.bits_per_element(layer),
        "codes_bytes": codes_file.stat().st_size,
        "fp32_bytes": fp32_file.stat().st_size,
        "store_bytes": store_bytes,
        "shares": shares.tolist(),
        "entropy_bits": float(entropy),
        "codes_agree": float((stored == recomputed).mean()),
    }


def extraction_figure(model, tokenizer, replay_set: ReplaySet, spec: StoreSpec, sizes: Sizes, work: Path):
    """Figures 1 and 2: one warm-up extraction (kept as the store), then interleaved timed repeats."""
    token_lists = tokenize_replay_set(replay_set, tokenizer, spec.max_length)
    batches = length_sorted_batches([len(t) for t in token_lists], spec.batch_size)
    pad_id = pad_token_id(tokenizer)
    tokens = sum(len(t) for t in token_lists)
    store = extract_store(model, tokenizer, replay_set, work / "store", spec, progress=False)
    states = forward_pass(model, token_lists, batches, pad_id, "extraction_forward", keep=True)
    bits = store_bits(store, states, work)
    del states
    forward_pass(model, token_lists, batches, pad_id, "plain")  # warm-up
    names = ("plain", "extraction_forward", "hidden_only", "extract_store", "identity")
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(sizes.extract_repeats):
        spent = []
        for variant in FORWARDS:
            start = clock()
            forward_pass(model, token_lists, batches, pad_id, variant)
            spent.append(since(start))
        start = clock()
        extract_store(model, tokenizer, replay_set, work / f"store{repeat}", spec, progress=False)
        spent.append(since(start))
        # The identity (model fingerprint over every weight, tokenizer, replay set) is part of extraction.
        start = clock()
        expected_manifest(model, tokenizer, replay_set, spec)
        spent.append(since(start))
        shutil.rmtree(work / f"store{repeat}")
        for name, (w, c) in zip(names, spent):
            wall[name].append(w)
            cpu[name].append(c)
        print(f"  extraction repeat {repeat + 1}/{sizes.extract_repeats}: plain {spent[0][0]:.2f} s "
              f"(CPU {spent[0][1]:.2f}), extract_store {spent[3][0]:.2f} s (CPU {spent[3][1]:.2f})",
              flush=True)  # fmt: skip
    med = {name: median(v) for name, v in wall.items()}
    med_cpu = {name: median(v) for name, v in cpu.items()}
    per_repeat = [p / e for p, e in zip(wall["plain"], wall["extract_store"])]
    speed = {
        "tokens": tokens,
        "batches": len(batches),
        "median_s": med,
        "median_cpu_s": med_cpu,
        "all_s": wall,
        "all_cpu_s": cpu,
        "tokens_per_s": {name: tokens / med[name] for name in names[:4]},
        "ratio": med["plain"] / med["extract_store"],
        "ratio_cpu": med_cpu["plain"] / med_cpu["extract_store"],
        "ratio_min": min(wall["plain"]) / min(wall["extract_store"]),
        "min_s": {name: min(v) for name, v in wall.items()},
        "ratio_per_repeat": per_repeat,
        "ratio_paired": median(per_repeat),
        "spread": spread(per_repeat),
    }
    return store, bits, speed
