"""Figure 3 of the engine benchmarks: the training-step time of ``ce+tm`` replay against ``ce``-only replay
(goal <= 1.05), and the TM loss alone. Run through `bench_engine.py` (``--figures 3``)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from bench_common import Sizes, clock, median, since, spread, task_batches

from gere.losses import CODE_NEUTRAL, coded_margin_loss


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
        check_store_model=False,  # the timed steps train the store's model on: it stays the store's base model
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
