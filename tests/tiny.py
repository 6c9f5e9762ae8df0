"""Tiny real models and tokenizers built in code for the tests (never downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "the a of and to in is was for on that with as by at from it an be this are which or his her they "
    "river city king war music film book school water light house music game army ship island song "
    "north south east west old new great small first last many long high early late good bad true false "
    "yes no answer option review movie sum one two three four five six seven eight nine zero plus"
).split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    for ch in ".,:;?!0123456789":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_llama(vocab_size: int = 128, hidden: int = 32, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def replay_texts(n: int = 12, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        length = int(torch.randint(5, 20, (1,), generator=g))
        picks = torch.randint(0, len(WORDS), (length,), generator=g).tolist()
        texts.append(" ".join(WORDS[i] for i in picks) + " .")
    return texts


def write_tiny_run_files(root: Path) -> Path:
    """A tiny model folder, two tiny tasks (mood, compass), replay and held-out texts under ``root``.

    Returns the model folder; tasks are ``root/mood`` and ``root/compass``, texts ``root/replay.jsonl`` and
    ``root/heldout.jsonl``.
    """
    model_dir = root / "model"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    for name, labels in (("mood", ["good", "bad"]), ("compass", ["north", "south"])):
        folder = root / name
        folder.mkdir()
        for split, n in (("train", 16), ("test", 8)):
            rows = [{"input": f"the river {i} is {labels[i % 2]}", "label": labels[i % 2]} for i in range(n)]
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "task.json").write_text(json.dumps({"name": name, "instruction": "pick one", "labels": labels}))
    (root / "replay.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in replay_texts(8)))
    (root / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in replay_texts(4, seed=9)))
    return model_dir


def sft_rows(tok, prompts: list[str], answers: list[str]) -> list[dict]:
    """Causal-LM training rows: prompt + answer + eos, with the loss only on the answer tokens."""
    rows = []
    for prompt_text, answer in zip(prompts, answers, strict=True):
        prompt = tok(prompt_text)["input_ids"]
        target = tok(answer)["input_ids"] + [tok.eos_token_id]
        rows.append(
            {
                "input_ids": prompt + target,
                "attention_mask": [1] * (len(prompt) + len(target)),
                "labels": [-100] * len(prompt) + target,
            }
        )
    return rows
