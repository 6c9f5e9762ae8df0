"""GeRe in a TRL SFT script: `python examples/sft.py MODEL general.jsonl` (pip install 'gere[trl]')."""

import sys

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from gere import GeReConfig, GeReSFTTrainer

model_name, replay_file = sys.argv[1], sys.argv[2]
rows = [{"prompt": f"the movie was {w} answer :", "completion": f" {w}"} for w in ("good", "bad") * 8]
trainer = GeReSFTTrainer(
    model=AutoModelForCausalLM.from_pretrained(model_name),
    args=SFTConfig(output_dir="runs/example-sft", max_steps=2, per_device_train_batch_size=4, logging_steps=1, report_to=[],
                   bf16=False),  # fp32 on a CPU
    train_dataset=Dataset.from_list(rows),
    processing_class=AutoTokenizer.from_pretrained(model_name),
    gere_config=GeReConfig(replay_source=replay_file, objective="ce+tm", replay_max_length=64),
)
trainer.train()
print({k: v for k, v in trainer.state.log_history[-2].items() if k in ("mean_token_accuracy", "replay_margin")})
