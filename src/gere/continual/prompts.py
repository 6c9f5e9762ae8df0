"""How a classification task is put to a causal LM: the prompt, the target, and training features.

The prompt follows the long-sequence continual-learning benchmark (Razdaibiedina et al. 2023, Progressive
Prompts; Wang et al. 2023, O-LoRA), used by GeRe's experiments (arXiv 2508.04676, Sec. 5)::

    {instruction} Option: {label_1}, {label_2}, ... \\n{input}\\nAnswer:

and the training target is ``" " + label`` followed by the end-of-sequence token.
"""

from __future__ import annotations

from gere.batching import IGNORE_INDEX
from gere.continual.tasks import Example, TaskSpec
from gere.errors import GeReError
from gere.replay.replay_set import bounded_text


def format_prompt(spec: TaskSpec, input: str) -> str:
    """The benchmark prompt: ``f"{instruction} Option: {', '.join(labels)} \\n{input}\\nAnswer:"``, or with
    `TaskSpec.prompt_prefix` in place of the part before the input (O-LoRA's prompts, `gere.data.olora_prompts`)."""
    if spec.prompt_prefix is not None:
        return f"{spec.prompt_prefix}{input}\nAnswer:"
    return f"{spec.instruction} Option: {', '.join(spec.labels)} \n{input}\nAnswer:"


def format_target(label: str) -> str:
    """The training target for `label`: a leading space, then the label word."""
    return " " + label


def encode_prompt_and_target(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of `prompt` (with the tokenizer's special prefix, e.g. BOS) and of `target` after it.

    The target ids are taken from tokenizing ``prompt + target`` jointly, so a target that merges
    differently at the boundary (SentencePiece's "▁" handling) gets the ids the model sees at generation
    time; when the joint ids do not extend the prompt ids, the target is tokenized on its own.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    joint = tokenizer(prompt + target, add_special_tokens=True)["input_ids"]
    if len(joint) > len(prompt_ids) and joint[: len(prompt_ids)] == prompt_ids:
        target_ids = joint[len(prompt_ids) :]
    else:
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not target_ids:
        raise GeReError(f"the target {target!r} tokenizes to nothing; use a non-empty label word")
    return list(prompt_ids), list(target_ids)


def fit_prompt(spec: TaskSpec, input: str, tokenizer, budget: int) -> list[int]:
    """Prompt ids for `input` using at most `budget` tokens.

    When too long, tokens are dropped from the *left* of the input text (the instruction, the options and
    the trailing ``Answer:`` are kept, and so is the end of the input, where questions usually sit). If the
    prompt is still too long with an empty input, its ids are left-truncated.
    """
    if budget < 1:
        raise GeReError(f"no room left for the prompt of task {spec.name!r}; raise max_length")
    input = bounded_text(input, budget, keep="end")  # inputs are cut from the left; a huge one not tokenised whole
    prompt_ids = tokenizer(format_prompt(spec, input), add_special_tokens=True)["input_ids"]
    if len(prompt_ids) <= budget:
        return list(prompt_ids)
    input_ids = tokenizer(input, add_special_tokens=False)["input_ids"]
    excess = len(prompt_ids) - budget
    # Decoding and re-encoding can shift a token or two, so drop a little more until it fits.
    for _ in range(8):
        kept = input_ids[excess:] if excess < len(input_ids) else []
        text = tokenizer.decode(kept, skip_special_tokens=True) if kept else ""
        prompt_ids = tokenizer(format_prompt(spec, text), add_special_tokens=True)["input_ids"]
        if len(prompt_ids) <= budget:
            return list(prompt_ids)
        if not kept:
            break
        excess += len(prompt_ids) - budget
    return list(prompt_ids[-budget:])


def build_train_features(spec: TaskSpec, examples: list[Example], tokenizer, max_length: int) -> list[dict]:
    """Tokenize examples for causal-LM fine-tuning.

    Each feature holds ``input_ids`` = prompt + target + EOS, ``attention_mask`` (all ones, unpadded) and
    ``labels`` (``IGNORE_INDEX`` on prompt tokens, so the loss covers only the answer and EOS). Long prompts are
    shortened by `fit_prompt`; the answer is never cut.
    """
    if tokenizer.eos_token_id is None:
        raise GeReError("the tokenizer has no eos_token; set tokenizer.eos_token before building features")
    features = []
    for ex in examples:
        _, target_ids = encode_prompt_and_target(
            tokenizer, format_prompt(spec, ex.input), format_target(ex.label)
        )
        budget = max_length - len(target_ids) - 1
        if budget < 1:
            raise GeReError(
                f"max_length={max_length} leaves no room for a prompt before the answer {ex.label!r} "
                f"({len(target_ids)} tokens + EOS) of task {spec.name!r}; raise max_length"
            )
        prompt_ids = fit_prompt(spec, ex.input, tokenizer, budget)
        answer = target_ids + [tokenizer.eos_token_id]
        features.append(
            {
                "input_ids": prompt_ids + answer,
                "attention_mask": [1] * (len(prompt_ids) + len(answer)),
                "labels": [IGNORE_INDEX] * len(prompt_ids) + answer,
            }
        )
    return features
