"""One process of the FSDP test (``torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT``, gloo, CPU).

GeReTrainer under FSDP2 (fully sharded, one unit per decoder layer) with the separate replay batch: the
activation store is built from the full model before the Trainer shards it, then 2 steps train. Each
process writes its logged entries to ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from dist_worker import replay_set, task_dataset
from transformers import DataCollatorForSeq2Seq, TrainingArguments

from gere.config import GeReConfig
from gere.trainer import GeReTrainer

from tiny import tiny_llama, tiny_tokenizer


def main(out: Path) -> None:
    torch.set_num_threads(1)
    tok, model = tiny_tokenizer(), tiny_llama()
    args = TrainingArguments(
        output_dir=str(out / "train"), per_device_train_batch_size=2, max_steps=2, learning_rate=5e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, ddp_backend="gloo", seed=0,
        disable_tqdm=True, fsdp="full_shard",
        fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
    )  # fmt: skip
    config = GeReConfig(objective="ce+tm", replay_max_length=16, replay_batch_size=2, extract_batch_size=3,
                        store_dir=str(out / "store"))  # fmt: skip
    trainer = GeReTrainer(model=model, args=args, train_dataset=task_dataset(tok, 12), processing_class=tok,
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True), gere_config=config,
                          replay_set=replay_set())  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(logs))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
