"""One process of the two-process task-replay test in test_task_replay.py; also its single-process reference.

Run by ``torchrun --nproc_per_node 2 tests/task_replay_worker.py OUT`` (gloo on CPU). A `GeReTrainer` trains
one epoch on 9 task rows and 3 buffered rows of an earlier task, mixed by task replay's ``interpolate``
sampler (1 buffered row per global batch of 4); each process writes, for every micro-batch, its step and
how many of its rows were buffered ones to ``OUT/rank<r>.json``. The test calls the same function in its
own process with gradient accumulation 2 instead of 2 processes, so both have global batches of 4.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import DataCollatorForSeq2Seq, TrainingArguments

from gere import distributed
from gere.baselines.task_replay import interpolating_sampler
from gere.config import GeReConfig
from gere.trainer import GeReTrainer

from tiny import sft_rows, tiny_llama, tiny_tokenizer

NUM_TASK, NUM_BUFFERED, PER_BATCH, PER_DEVICE = 9, 3, 1, 2  # 3 global batches of 3 task rows + 1 buffered


class CountingTrainer(GeReTrainer):
    """Records, for every micro-batch, the optimisation step and how many of its rows are buffered ones."""

    def __init__(self, *args, marker: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.marker, self.micro = marker, []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            buffered = int((inputs["input_ids"] == self.marker).any(dim=1).sum())
            self.micro.append(
                {"step": self.state.global_step, "rows": len(inputs["input_ids"]), "buffered": buffered}
            )
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def run_task_replay(out: Path, grad_accum: int) -> list[dict]:
    tok, model = tiny_tokenizer(), tiny_llama()
    task = sft_rows(
        tok, [f"review the movie was good answer : {i}" for i in range(NUM_TASK)], [" good"] * NUM_TASK
    )
    buffered = sft_rows(tok, ["north or south answer :"] * NUM_BUFFERED, [" north"] * NUM_BUFFERED)
    args = TrainingArguments(
        output_dir=str(out / f"train-{grad_accum}"), per_device_train_batch_size=PER_DEVICE,
        gradient_accumulation_steps=grad_accum, num_train_epochs=1, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        ddp_backend="gloo" if distributed.is_distributed() else None,
    )  # fmt: skip
    sampler = interpolating_sampler(NUM_TASK, NUM_BUFFERED, PER_BATCH, PER_DEVICE, grad_accum, seed=3)
    trainer = CountingTrainer(
        model=model, args=args, train_dataset=task + buffered, processing_class=tok,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True), gere_config=GeReConfig(objective="none"),
        train_sampler=sampler, marker=tok.convert_tokens_to_ids("north"),
    )  # fmt: skip
    trainer.train()
    return trainer.micro


def main(out: Path) -> None:
    distributed.init_from_env("gloo")
    micro = run_task_replay(out, grad_accum=1)
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps(micro))
    distributed.barrier()


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    main(Path(sys.argv[1]))
