"""One process of the two-process tests in test_distributed.py; also the single-process reference.

Run by ``torchrun --nproc_per_node 2 tests/dist_worker.py OUT`` (gloo on CPU). Each process writes what it
saw to ``OUT/rank<r>.json``: the extraction (interrupted, then resumed), the statistics merged across
processes, and for two short GeReTrainer runs (batch interpolation, separate replay batch) the logged loss
parts and the replay / task samples of every micro-batch. The test calls the same functions in its own
process with gradient accumulation 2 instead of 2 processes, so both see the same global batches.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import DataCollatorForSeq2Seq, TrainingArguments

from gere import distributed
from gere.config import GeReConfig
from gere.replay.replay_set import ReplaySet
from gere.stats import RunningStats
from gere.store import ExtractionStopped, StoreSpec, extract_store
from gere.trainer import GeReTrainer

from tiny import replay_texts, sft_rows, tiny_llama, tiny_tokenizer

# 13 replay samples in extraction batches of 3: 5 batches, so the two processes get 3 and 2 of them.
EXTRACT_SPEC = dict(max_length=16, batch_size=3, features=True, topk=4)
NUM_TASK = 10  # with k = 1 in a global batch of 4: blocks of 3 task samples, the last block partial
PER_DEVICE_BATCH = 2


def replay_set(n: int = 13) -> ReplaySet:
    return ReplaySet(tuple(f"g{i}" for i in range(n)), tuple(replay_texts(n, seed=5)))


def task_dataset(tok, n: int = NUM_TASK) -> list[dict]:
    """Every sample has 2 label tokens, so a mean over micro-batch means equals the token mean."""
    prompts = [f"review the {WORDS_FOR_TASK[i % len(WORDS_FOR_TASK)]} was good answer :" for i in range(n)]
    return sft_rows(tok, prompts, [" good" if i % 2 else " bad" for i in range(n)])


WORDS_FOR_TASK = ("movie", "film", "book", "song", "game")


def local_rows(rank: int, n: int = 37, dim: int = 6) -> np.ndarray:
    """Rows with a large mean and unequal counts per process, for the cross-process merge."""
    g = np.random.default_rng(100 + rank)
    return 1e4 + g.standard_normal((n + 11 * rank, dim))


def run_extraction(store_dir: Path) -> dict:
    model, tok = tiny_llama(), tiny_tokenizer()
    spec = StoreSpec(**EXTRACT_SPEC)
    cut = None
    try:
        extract_store(model, tok, replay_set(), store_dir, spec, progress=False, stop_after_batches=1)
    except ExtractionStopped as err:
        cut = type(err).__name__
    rank, world = distributed.rank(), distributed.world_size()
    name = "progress.json" if world == 1 else f"progress.rank{rank}.json"
    progress = json.loads((store_dir / "partial" / name).read_text())["done"]
    distributed.barrier()  # every process has read its progress before the resumed run removes partial/
    store = extract_store(model, tok, replay_set(), store_dir, spec, progress=False)
    stats = RunningStats(local_rows(rank).shape[1])
    stats.update(local_rows(rank))
    merged = distributed.merge_stats_across_ranks(stats)
    return {
        "cut": cut,
        "progress_after_cut": progress,
        "files": store.manifest["files"],
        "merged": {"count": merged.count, "mean": merged.mean.tolist(), "m2": merged.m2.tolist()},
    }


class RecordingTrainer(GeReTrainer):
    """Records, for every micro-batch, the optimisation step, its task samples and replay indices."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro: list[dict] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            ids = inputs.get("input_ids")
            self.micro.append(
                {
                    "step": self.state.global_step,
                    "task": 0 if ids is None else int(ids.shape[0]),
                    "replay": [],
                }
            )
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _replay_losses(self, model, indices):
        self.micro[-1]["replay"] = [int(i) for i in indices]
        return super()._replay_losses(model, indices)


def run_training(out: Path, mode: str, grad_accum: int, per_device: int = PER_DEVICE_BATCH) -> dict:
    """One epoch of full fine-tuning with ce+tm: 4 steps (``bi``) or 3 steps (``separate``, 12 samples)."""
    tok, model = tiny_tokenizer(), tiny_llama()
    bi = mode == "bi"
    name = f"{mode}-{per_device}"
    args = TrainingArguments(
        output_dir=str(out / f"train-{name}"),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=grad_accum,
        max_steps=-1 if bi else 3,
        num_train_epochs=1,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        # accelerate rejects a backend in a single process (it then asks for a process group)
        ddp_backend="gloo" if distributed.is_distributed() else None,
        seed=0,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
    )
    config = GeReConfig(
        objective="ce+tm",
        replay_max_length=16,
        margin_weight="1",
        num_interpolate_per_batch=1 if bi else 0,
        replay_batch_size=2,
        extract_batch_size=3,
        store_dir=str(out / f"store-{name}"),
    )
    trainer = RecordingTrainer(
        model=model,
        args=args,
        train_dataset=task_dataset(tok, NUM_TASK if bi else 12),
        processing_class=tok,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True),
        gere_config=config,
        replay_set=replay_set(),
    )
    trainer.train()
    with torch.no_grad():
        checksum = sum(float(p.double().sum()) for p in model.parameters())
    return {
        "logs": [h for h in trainer.state.log_history if "loss" in h],
        "micro": trainer.micro,
        "param_checksum": checksum,
    }


def main(out: Path) -> None:
    distributed.init_from_env("gloo")
    result = {"rank": distributed.rank(), "world": distributed.world_size()}
    result["extraction"] = run_extraction(out / "store")
    for mode in ("bi", "separate"):
        result[mode] = run_training(out, mode, grad_accum=1)
    # Per-device batch 1 with accumulation 2: some micro-batches hold one replay row and nothing else, so
    # one process runs a replay-only micro-batch while the other runs a task one.
    result["bi_batch1"] = run_training(out, "bi", grad_accum=2, per_device=1)
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps(result))
    distributed.barrier()


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    main(Path(sys.argv[1]))
