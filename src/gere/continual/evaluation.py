"""Evaluation of a causal LM: task accuracy and perplexity, and the log-likelihood scoring they share.

General ability by multiple choice is `gere.continual.multiple_choice`.

Everything runs batched under ``torch.no_grad()`` with the model in eval mode, and puts the model back in
the training mode it was in. GeRe (arXiv 2508.04676, Sec. 5) reports task accuracy after each task of the
sequence and general ability (MMLU among others) to measure forgetting of both.

Two ways to read a task answer:

* ``"label"`` (default): score every label word as a continuation of the prompt (sum of the log-likelihood
  of its tokens, with the leading space used in training targets) and pick the most likely one; always
  yields a valid label.
* ``"generate"``: greedy decoding, then exact match with the label word after stripping whitespace, as
  O-LoRA reports.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch

from gere.batching import accepts_argument, batches, eval_mode, model_device, pad_batch, pad_token_id
from gere.continual.prompts import encode_prompt_and_target, fit_prompt, format_prompt, format_target
from gere.continual.tasks import Example, TaskSpec
from gere.errors import GeReError
from gere.replay.replay_set import bounded_text


def sequence_logprobs(
    model,
    tokenizer,
    pairs: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 16,
) -> list[float]:
    """Sum of log p(target tokens | prompt tokens) for each (prompt ids, target ids) pair, batched."""
    device = model_device(model)
    side = getattr(tokenizer, "padding_side", "right") or "right"
    # Longest first: similar lengths share a batch, so less padding is computed.
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    scores = [0.0] * len(pairs)
    with eval_mode(model):
        for idx in batches(order, batch_size):
            seqs = [pairs[i][0] + pairs[i][1] for i in idx]
            ids, mask, positions, offsets = pad_batch(seqs, pad_token_id(tokenizer), side, device)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            rows, cols, targets, owner = [], [], [], []
            for b, i in enumerate(idx):
                prompt, target = pairs[i]
                for k, tok in enumerate(target):
                    # The token at position p is predicted by the logits at position p - 1.
                    rows.append(b)
                    cols.append(offsets[b] + len(prompt) + k - 1)
                    targets.append(tok)
                    owner.append(i)
            picked = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)].float()
            logp = torch.log_softmax(picked, dim=-1)
            token_lp = logp.gather(1, torch.tensor(targets, device=device).unsqueeze(1)).squeeze(1).tolist()
            for i, lp in zip(owner, token_lp, strict=True):
                scores[i] += lp
    return scores


def _cache_argument(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` during 5.x; use the one this model takes."""
    return "cache" if accepts_argument(model, "cache") else "past_key_values"


def _output_cache(out):
    cache = out.get("cache") if isinstance(out, dict) else None
    return cache if cache is not None else out.past_key_values


def shared_prompt_logprobs(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    targets: Sequence[list[int]],
    batch_size: int = 16,
) -> list[float]:
    """``sequence_logprobs`` for every (prompt, target) pair, prompt-major: `continuation_logprobs` with the
    same targets after every prompt, flattened."""
    nested = continuation_logprobs(model, tokenizer, prompts, [list(targets)] * len(prompts), batch_size)
    return [score for row in nested for score in row]


#: The fewest tokens every prompt must share for `continuation_logprobs` to run them once for all prompts.
MIN_SHARED_PREFIX = 4


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens at the start of every prompt that all prompts share, leaving each prompt at least one of its
    own (its last position gives the first continuation token's logits)."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for prompt in prompts[1:]:
        n = next((k for k in range(n) if prompt[k] != first[k]), n)
    return max(n, 0)


def _prefix_cache(model, prefix: list[int], cache_arg: str):
    """The key/value cache of ``prefix`` alone (batch 1), or None where the cache cannot be copied per batch."""
    device = model_device(model)
    ids = torch.tensor([prefix], device=device)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(len(prefix),
                device=device).unsqueeze(0), use_cache=True, logits_to_keep=1)  # fmt: skip
    cache = _output_cache(out)
    return cache if hasattr(cache, "batch_repeat_interleave") and hasattr(cache, "crop") else None


def continuation_logprobs(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    continuations: Sequence[Sequence[list[int]]],
    batch_size: int = 16,
) -> list[list[float]]:
    """Sum of log p(continuation tokens | prompt) for each prompt's own continuations (`continuation_scores`
    without the greedy flags)."""
    scored = continuation_scores(model, tokenizer, prompts, continuations, batch_size)
    return [[value for value, _ in row] for row in scored]


def continuation_scores(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    continuations: Sequence[Sequence[list[int]]],
    batch_size: int = 16,
) -> list[list[tuple[float, bool]]]:
    """``(sum of log p(continuation tokens | prompt), greedy)`` for each prompt's own continuations, running
    each prompt once; ``greedy`` is True when every continuation token is the most likely token at its
    position (lm-evaluation-harness's ``is_greedy``, LAMBADA's accuracy).

    The tokens every prompt starts with (a task's instruction and options: `shared_prefix_length`, when at
    least `MIN_SHARED_PREFIX`) run once, and their key/value cache is copied for every batch. The rest of
    each prompt is left-padded after that prefix and encoded with the cache; the j-th continuation of every
    prompt in the batch is then scored together (right-padded to the longest), and the cache is cropped back
    to the prompts before the next j. Equal to `sequence_logprobs` on the concatenations (up to float
    rounding), at about 1/len(continuations) of the cost when continuations are short, less again by the
    shared prefix.
    """
    device = model_device(model)
    cache_arg = _cache_argument(model)
    pad_id = pad_token_id(tokenizer)
    # Only the prompts' last position is scored: the vocabulary projection runs there alone where the model
    # allows it (a fifth of a small model's forward pass, and a batch x length x vocabulary tensor, saved).
    last_only = {"logits_to_keep": 1} if accepts_argument(model, "logits_to_keep") else {}
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    scores: list[list[tuple[float, bool]]] = [[(0.0, False)] * len(options) for options in continuations]
    with eval_mode(model):
        shared = shared_prefix_length(prompts) if len(prompts) > 1 and last_only else 0
        prefix = _prefix_cache(model, list(prompts[0][:shared]), cache_arg) if shared >= MIN_SHARED_PREFIX else None
        shared = shared if prefix is not None else 0
        for idx in batches(order, batch_size):
            ids, mask, positions, _ = pad_batch([prompts[i][shared:] for i in idx], pad_id, "left", device)
            given = {}
            if prefix is not None:  # the prefix's cache, one copy per row; the rest follows its positions
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(idx))
                mask = torch.cat([torch.ones((len(idx), shared), dtype=mask.dtype, device=device), mask], dim=1)
                positions = positions + shared
                given = {cache_arg: cache}
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **given,
                        **last_only)  # fmt: skip
            context = (_output_cache(out), mask, positions[:, -1:] + 1, cache_arg)
            first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            for j in range(max(len(continuations[i]) for i in idx)):
                rows = {b: continuations[i][j] for b, i in enumerate(idx) if j < len(continuations[i])}
                for b, value in _score_step(model, context, first, rows, pad_id).items():
                    scores[idx[b]][j] = value
    return scores


def _score_step(model, context, first, rows: dict[int, list[int]], pad_id: int) -> dict[int, tuple[float, bool]]:
    """``(score, greedy)`` of one continuation per batch row (``rows``: row -> token ids) after the cached
    prompts."""
    cache, mask, next_pos, cache_arg = context
    device = first.device
    scores = {b: first[b, target[0]].clone() for b, target in rows.items()}
    greedy = {b: int(first[b].argmax()) == target[0] for b, target in rows.items()}
    width = max(len(target) - 1 for target in rows.values())
    if width > 0:
        rest = torch.full((mask.shape[0], width), pad_id, dtype=torch.long, device=device)
        follow = torch.zeros_like(rest)
        real = torch.zeros_like(rest)
        for b, target in rows.items():
            n = len(target) - 1
            rest[b, :n] = torch.tensor(target[:-1], device=device)
            follow[b, :n] = torch.tensor(target[1:], device=device)
            real[b, :n] = 1
        logits = model(
            input_ids=rest,
            attention_mask=torch.cat([mask, real], dim=1),
            position_ids=next_pos + torch.arange(width, device=device),
            **{cache_arg: cache},
            use_cache=True,
        ).logits.float()
        token_lp = torch.log_softmax(logits, dim=-1).gather(2, follow.unsqueeze(-1)).squeeze(-1)
        totals = (token_lp * real).sum(1)
        misses = ((logits.argmax(-1) != follow) & real.bool()).any(1).tolist()
        for b in rows:
            scores[b] = scores[b] + totals[b]
            greedy[b] = greedy[b] and not misses[b]
        cache.crop(-width)  # back to the prompts alone
    return {b: (float(v), greedy[b]) for b, v in scores.items()}


def score_labels(
    model,
    tokenizer,
    prompts: list[str],
    label_words: list[str],
    batch_size: int = 16,
    max_length: int = 1024,
) -> list[int]:
    """Index of the most likely label word for each prompt.

    A label's score is the summed log-likelihood of the tokens of ``" " + label`` after the prompt, the
    same tokens the model was trained to produce. Prompts longer than `max_length` minus the label length
    are truncated from the left. Ties go to the earlier label.
    """
    if not prompts:
        return []
    if not label_words:
        raise GeReError("score_labels needs at least one label word; pass the task's labels")
    pairs = []
    for prompt in prompts:
        for word in label_words:
            prompt_ids, target_ids = encode_prompt_and_target(tokenizer, prompt, format_target(word))
            room = max_length - len(target_ids)
            if room < 1:
                raise GeReError(f"max_length={max_length} cannot hold the label {word!r}; raise max_length")
            pairs.append((prompt_ids[-room:], target_ids))
    return _argmax_rows(sequence_logprobs(model, tokenizer, pairs, batch_size=batch_size), len(label_words))


def _argmax_rows(flat: list[float], n: int) -> list[int]:
    """Argmax of each consecutive row of `n` scores; ties go to the earlier label."""
    return [max(range(n), key=lambda k: (flat[r + k], -k)) for r in range(0, len(flat), n)]


def generate_predictions(
    model,
    tokenizer,
    prompts: list[str] | list[list[int]],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    max_length: int = 1024,
) -> list[str]:
    """Greedy continuations of `prompts` (text or token ids), decoded and stripped.

    Batches are left-padded whatever `tokenizer.padding_side` says, because decoding appends to the right.
    """
    if not prompts:
        return []
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    encoded = [
        list(p) if not isinstance(p, str) else tokenizer(p, add_special_tokens=True)["input_ids"]
        for p in prompts
    ]
    room = max(1, max_length - max_new_tokens)
    encoded = [ids[-room:] for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs = [""] * len(encoded)
    with eval_mode(model):
        for idx in batches(order, batch_size):
            ids, mask, _, _ = pad_batch([encoded[i] for i in idx], pad_id, "left", device)
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = generated[:, ids.shape[1] :]
            for b, i in enumerate(idx):
                outputs[i] = tokenizer.decode(new_tokens[b], skip_special_tokens=True).strip()
    return outputs


def evaluate_task(
    model,
    tokenizer,
    spec: TaskSpec,
    examples: list[Example],
    method: str = "label",
    batch_size: int = 16,
    max_length: int = 1024,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Accuracy of `model` on `examples` of task `spec`.

    Returns ``{"accuracy": float in [0, 1], "n": int, "correct": int, "predictions": [str]}``; with
    ``method="generate"`` a prediction may be any text, and only an exact match (after strip) counts.
    """
    if not examples:
        raise GeReError(f"task {spec.name!r} has no examples to evaluate; check its test split and test_size")
    if method == "label":
        # Every prompt ends in "\nAnswer:", so the label tokens after it are the same for all examples.
        context = format_prompt(spec, "")
        targets = [encode_prompt_and_target(tokenizer, context, format_target(w))[1] for w in spec.labels]
        budget = max_length - max(len(t) for t in targets)
        prompt_ids = [fit_prompt(spec, ex.input, tokenizer, budget) for ex in examples]
        scores = shared_prompt_logprobs(model, tokenizer, prompt_ids, targets, batch_size=batch_size)
        picks = _argmax_rows(scores, len(spec.labels))
        predictions = [spec.labels[k] for k in picks]
        correct = sum(p == ex.label for p, ex in zip(predictions, examples, strict=True))
    elif method == "generate":
        if max_new_tokens is None:
            max_new_tokens = 2 + max(
                len(tokenizer(format_target(w), add_special_tokens=False)["input_ids"]) for w in spec.labels
            )
        prompt_ids = [fit_prompt(spec, ex.input, tokenizer, max_length - max_new_tokens) for ex in examples]
        predictions = generate_predictions(
            model,
            tokenizer,
            prompt_ids,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            max_length=max_length,
        )
        correct = sum(p.strip() == ex.label.strip() for p, ex in zip(predictions, examples, strict=True))
    else:
        raise GeReError(f"unknown evaluation method {method!r}; use 'label' or 'generate'")
    return {
        "accuracy": correct / len(examples),
        "n": len(examples),
        "correct": correct,
        "predictions": predictions,
    }


# ------------------------------------------------------------------------------------------------ perplexity


def perplexity(model, tokenizer, texts: list[str], max_length: int = 256, batch_size: int = 8) -> float:
    """Token-weighted perplexity ``exp(sum NLL / number of predicted tokens)`` over `texts`.

    Each text is truncated to `max_length` tokens; only real (non-padding) tokens are predicted and
    counted, and the first token of each text is context only.
    """
    encoded = [tokenizer(bounded_text(t, max_length), add_special_tokens=True)["input_ids"][:max_length] for t in texts]
    encoded = [ids for ids in encoded if len(ids) >= 2]
    if not encoded:
        raise GeReError("perplexity needs texts of at least two tokens; pass non-empty held-out texts")
    device = model_device(model)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    nll, count = 0.0, 0
    with eval_mode(model):
        for idx in batches(order, batch_size):
            ids, mask, positions, _ = pad_batch(
                [encoded[i] for i in idx], pad_token_id(tokenizer), "right", device
            )
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, :-1].float()
            targets = ids[:, 1:]
            keep = mask[:, 1:].bool()
            token_nll = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
            nll += token_nll.item()
            count += int(keep.sum().item())
    return math.exp(nll / count)
