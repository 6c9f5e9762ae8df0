"""One process of the two-process GeReSFTTrainer test (``torchrun --nproc_per_node 2 ... OUT``, gloo).

Trains 2 steps with the separate replay batch and writes the logged entries to ``OUT/rank<r>.json``; then
asks for batch interpolation, which must be refused before training, and records the message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from test_trl_trainer import prompt_completion, replay_config, sft_args

from gere.errors import GeReError
from gere.trl_trainer import GeReSFTTrainer

from tiny import tiny_llama, tiny_tokenizer


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(__import__("os").environ["RANK"])
    trainer = GeReSFTTrainer(model=tiny_llama(), args=sft_args(out / "batch", max_steps=2, per_device_train_batch_size=2),
                             train_dataset=prompt_completion(), processing_class=tiny_tokenizer(),
                             gere_config=replay_config(out))  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    refused = None
    try:
        GeReSFTTrainer(model=tiny_llama(), args=sft_args(out / "bi", max_steps=2, per_device_train_batch_size=2),
                       train_dataset=prompt_completion(), processing_class=tiny_tokenizer(),
                       gere_config=replay_config(out, num_interpolate_per_batch=1)).train()  # fmt: skip
    except GeReError as err:
        refused = str(err)
    (out / f"rank{rank}.json").write_text(json.dumps({"logs": logs, "refused": refused}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
