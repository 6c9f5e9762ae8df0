"""GeRe in a plain Hugging Face Trainer script: `python examples/trainer.py MODEL general.jsonl`."""

import sys

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, TrainingArguments

from gere import GeReConfig, GeReTrainer

model_name, replay_file = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(model_name)
model = AutoModelForCausalLM.from_pretrained(model_name)


def example(prompt, answer):  # the loss covers the answer only
    p, a = tokenizer(prompt)["input_ids"], tokenizer(answer)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": p + a, "attention_mask": [1] * len(p + a), "labels": [-100] * len(p) + a}


train = Dataset.from_list([example(f"the movie was {w} answer :", f" {w}") for w in ("good", "bad") * 8])
trainer = GeReTrainer(
    model=model,
    args=TrainingArguments(output_dir="runs/example", max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                           report_to=[]),
    train_dataset=train,
    data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    processing_class=tokenizer,
    gere_config=GeReConfig(replay_source=replay_file, objective="ce+tm", replay_max_length=64),
)
trainer.train()
print({k: v for k, v in trainer.state.log_history[-2].items() if k in ("task_ce", "replay_ce", "replay_margin")})
