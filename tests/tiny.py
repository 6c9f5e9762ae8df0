"""Tiny real models and tokenizers built in code for the tests (never downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "the a of and to in is was for on that with as by at from it an be this are which or his her they "
    "river city king war music film book school water light house music game army ship island song "
    "north south east west old new great small first last many long high early late good bad true false "
    "yes no answer option review movie sum one two three four five six seven eight nine zero plus"
).split()
#: The label words of the shipped benchmark's and the demo's tasks that the tests run, after every other id
#: (so the ids above keep their values): a run refuses labels its tokenizer reads alike (all ``<unk>``).
LABEL_WORDS = (
    "Good Bad A B True False entailment contradiction neutral opposite comparative superlative past plural "
    "animal plant food artifact person"
).split()


def word_tokenizer(
    vocab_words: list[str],
    *,
    unk_token: str,
    pad_token: str | None = None,
    eos_token: str | None = None,
    bos_token: str | None = None,
    digits: bool = False,
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose ids follow ``vocab_words`` (special tokens included, first wins).

    With ``bos_token`` every encoded text starts with it; with ``digits`` numbers split into digits.
    """
    vocab: dict[str, int] = {}
    for word in vocab_words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    splitters = [pre_tokenizers.Whitespace()] + ([pre_tokenizers.Digits(individual_digits=True)] if digits else [])
    tok.pre_tokenizer = pre_tokenizers.Sequence(splitters) if digits else splitters[0]
    if bos_token is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", special_tokens=[(bos_token, vocab[bos_token])]
        )
    specials = {"pad_token": pad_token, "eos_token": eos_token, "bos_token": bos_token}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=unk_token, **{k: v for k, v in specials.items() if v is not None}
    )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The default test tokenizer: ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, then `WORDS`, punctuation and
    `LABEL_WORDS`."""
    return word_tokenizer(
        ["<pad>", "<eos>", "<unk>", *WORDS, *".,:;?!0123456789", *LABEL_WORDS],
        pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", digits=True,
    )  # fmt: skip


def bos_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """``[PAD]`` 0, ``[UNK]`` 1, ``<s>`` 2 (prepended to every text), ``</s>`` 3, then ``words``."""
    return word_tokenizer(
        ["[PAD]", "[UNK]", "<s>", "</s>", *words],
        pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>",
    )  # fmt: skip


def tiny_llama(
    vocab_size: int = 128, hidden: int = 32, layers: int = 2, seed: int = 0, **config
) -> LlamaForCausalLM:
    """A seeded 2-layer Llama; ``config`` overrides any `LlamaConfig` value."""
    torch.manual_seed(seed)
    settings = dict(
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
    return LlamaForCausalLM(LlamaConfig(**{**settings, **config}))


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
