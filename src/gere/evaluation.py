"""Evaluation of a causal LM: task accuracy, general ability (MMLU-style multiple choice) and perplexity.

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

import contextlib
import inspect
import json
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from gere.errors import GeReError
from gere.tasks import (
    Example,
    TaskSpec,
    encode_prompt_and_target,
    fit_prompt,
    format_prompt,
    format_target,
)

CHOICE_LETTERS = "ABCDEFGHIJ"


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put `model` in eval mode without gradients; restore its previous training mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Pad id lists to one tensor.

    Returns ``(input_ids, attention_mask, position_ids, offsets)``, each tensor (B, L); `offsets[b]` is
    where sequence b starts (0 for right padding). Position ids count real tokens only, so a left-padded
    sequence sees the same positions as unpadded.
    """
    if side not in ("left", "right"):
        raise GeReError(f"padding side must be 'left' or 'right', got {side!r}; set tokenizer.padding_side")
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    offsets = []
    for b, seq in enumerate(sequences):
        start = length - len(seq) if side == "left" else 0
        ids[b, start : start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[b, start : start + len(seq)] = 1
        offsets.append(start)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device), offsets


def _batches(order: list[int], size: int) -> Iterator[list[int]]:
    if size < 1:
        raise GeReError(f"batch_size must be at least 1, got {size}")
    for start in range(0, len(order), size):
        yield order[start : start + size]


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
        for idx in _batches(order, batch_size):
            seqs = [pairs[i][0] + pairs[i][1] for i in idx]
            ids, mask, positions, offsets = pad_batch(seqs, _pad_id(tokenizer), side, device)
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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


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
    """``sequence_logprobs`` for every (prompt, target) pair, prompt-major, running each prompt once.

    The prompts of a batch are left-padded and encoded once with a key/value cache; each target is then
    scored as a short continuation, and the cache is cropped back to the prompt before the next target.
    Equal to `sequence_logprobs` on the concatenations (up to float rounding), at about 1/len(targets) of
    the cost when targets are short.
    """
    device = model_device(model)
    cache_arg = _cache_argument(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    scores = [0.0] * (len(prompts) * len(targets))
    with eval_mode(model):
        for idx in _batches(order, batch_size):
            ids, mask, positions, _ = pad_batch([prompts[i] for i in idx], _pad_id(tokenizer), "left", device)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            cache = _output_cache(out)
            first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            next_pos = positions[:, -1:] + 1
            for t, target in enumerate(targets):
                lp = first[:, target[0]].clone()
                if len(target) > 1:
                    rest = torch.tensor(target[:-1], device=device).expand(len(idx), -1)
                    cont_mask = torch.cat([mask, torch.ones_like(rest)], dim=1)
                    cont_pos = next_pos + torch.arange(len(target) - 1, device=device)
                    logits = model(
                        input_ids=rest,
                        attention_mask=cont_mask,
                        position_ids=cont_pos,
                        **{cache_arg: cache},
                        use_cache=True,
                    ).logits.float()
                    logp = torch.log_softmax(logits, dim=-1)
                    follow = torch.tensor(target[1:], device=device)
                    lp += logp.gather(2, follow.expand(len(idx), -1).unsqueeze(-1)).squeeze(-1).sum(1)
                    cache.crop(-(len(target) - 1))  # back to the prompt alone
                for b, i in enumerate(idx):
                    scores[i * len(targets) + t] = float(lp[b])
    return scores


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
    pad_id = _pad_id(tokenizer)
    encoded = [
        list(p) if not isinstance(p, str) else tokenizer(p, add_special_tokens=True)["input_ids"]
        for p in prompts
    ]
    room = max(1, max_length - max_new_tokens)
    encoded = [ids[-room:] for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs = [""] * len(encoded)
    with eval_mode(model):
        for idx in _batches(order, batch_size):
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


# ------------------------------------------------------------------------------ general ability: multiple choice

# MMLU's 57 subjects in the four reporting categories (the grouping of Hendrycks et al. 2021).
_CATEGORY_SUBJECTS = {
    "STEM": """abstract_algebra astronomy college_biology college_chemistry college_computer_science
        college_mathematics college_physics computer_security conceptual_physics electrical_engineering
        elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science
        high_school_mathematics high_school_physics high_school_statistics machine_learning""",
    "humanities": """formal_logic high_school_european_history high_school_us_history high_school_world_history
        international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy
        prehistory professional_law world_religions""",
    "social sciences": """econometrics high_school_geography high_school_government_and_politics
        high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality
        professional_psychology public_relations security_studies sociology us_foreign_policy""",
    "other": """anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management
        marketing medical_genetics miscellaneous nutrition professional_accounting professional_medicine
        virology""",
}
MMLU_SUBJECT_CATEGORY: dict[str, str] = {
    subject: category for category, subjects in _CATEGORY_SUBJECTS.items() for subject in subjects.split()
}
MMLU_CATEGORIES = tuple(_CATEGORY_SUBJECTS)


def subject_category(subject: str) -> str:
    """MMLU category of `subject`; subjects outside MMLU count as "other"."""
    return MMLU_SUBJECT_CATEGORY.get(subject, "other")


def _check_question(q: Any, where: str) -> dict[str, Any]:
    if not isinstance(q, dict):
        raise GeReError(f"{where}: expected an object with question/choices/answer/subject")
    missing = [k for k in ("question", "choices", "answer") if k not in q]
    if missing:
        raise GeReError(
            f"{where}: missing {missing}; each question needs question, choices, answer (and subject)"
        )
    choices = q["choices"]
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(CHOICE_LETTERS):
        raise GeReError(
            f"{where}: `choices` must be a list of 2-{len(CHOICE_LETTERS)} options, got {choices!r}"
        )
    answer = q["answer"]
    if isinstance(answer, str) and len(answer) == 1 and answer.upper() in CHOICE_LETTERS:
        answer = CHOICE_LETTERS.index(answer.upper())
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise GeReError(
            f"{where}: `answer` must be a choice index 0-{len(choices) - 1} (or letter), got {answer!r}"
        )
    subject = str(q.get("subject") or "general")
    return {
        "question": str(q["question"]),
        "choices": [str(c) for c in choices],
        "answer": answer,
        "subject": subject,
        "category": str(q.get("category") or subject_category(subject)),
    }


def load_multiple_choice(path_or_hf: str | Path, split: str = "test", limit: int | None = None) -> list[dict]:
    """Read multiple-choice questions.

    Accepts a local ``.jsonl``/``.json`` file of ``{"question", "choices", "answer", "subject",
    "category"?}`` objects, or ``hf:<dataset>[:<config>]`` in the ``cais/mmlu`` layout (columns question,
    subject, choices, answer), e.g. ``hf:cais/mmlu:all``. A missing category is looked up from the subject.
    """
    source = str(path_or_hf)
    if source.startswith("hf:"):
        import datasets

        name, _, config = source[3:].partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split=split)
        except Exception as e:  # network, missing config or split: all fixable by the user
            raise GeReError(
                f"could not load {source} split {split!r}: {e}; check the name or use a local file"
            ) from e
        rows, where = [dict(r) for r in ds], f"{source} [{split}]"
    else:
        path = Path(source)
        if not path.is_file():
            raise GeReError(
                f"multiple-choice file {path} does not exist; pass a .jsonl/.json file or 'hf:cais/mmlu:all'"
            )
        if path.suffix.lower() == ".jsonl":
            rows = []
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise GeReError(
                            f"{path}, line {lineno}: malformed JSON ({e.msg}); fix that line"
                        ) from e
        else:
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise GeReError(f"{path}: malformed JSON at line {e.lineno} ({e.msg}); fix the file") from e
            if not isinstance(rows, list):
                raise GeReError(f"{path}: expected a JSON list of questions")
        where = str(path)
    questions = [_check_question(r, f"{where}, item {i + 1}") for i, r in enumerate(rows)]
    return questions[:limit] if limit is not None else questions


def format_mc_question(q: dict[str, Any], with_answer: bool) -> str:
    lines = [q["question"]]
    lines += [f"{CHOICE_LETTERS[k]}. {choice}" for k, choice in enumerate(q["choices"])]
    text = "\n".join(lines) + "\nAnswer:"
    if with_answer:
        text += f" {CHOICE_LETTERS[q['answer']]}\n\n"
    return text


def format_mc_prompt(q: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    """MMLU prompt: a header naming the subject, solved `shots`, then the question ending in ``Answer:``."""
    subject = q["subject"].replace("_", " ")
    header = f"The following are multiple choice questions about {subject}.\n\n"
    return header + "".join(format_mc_question(s, True) for s in shots) + format_mc_question(q, False)


def _letter_token_ids(tokenizer, prompt: str, n: int) -> list[int]:
    # The first token of " A" after the prompt, as the model would write it.
    return [encode_prompt_and_target(tokenizer, prompt, f" {CHOICE_LETTERS[k]}")[1][0] for k in range(n)]


def evaluate_multiple_choice(
    model,
    tokenizer,
    questions: list[dict[str, Any]],
    shots: int = 0,
    dev_questions: list[dict[str, Any]] | None = None,
    batch_size: int = 16,
    max_length: int = 2048,
) -> dict[str, Any]:
    """MMLU-style accuracy: the answer is the letter whose token (" A", " B", ...) has the largest logit
    at the last prompt position.

    `shots` solved examples come from `dev_questions` of the same subject (any subject when it has too
    few); they are dropped one by one when the prompt exceeds `max_length`. Returns ``{"accuracy"
    (question-weighted, 0-1), "n", "correct", "per_category" {category: acc}, "per_subject" {subject: acc},
    "category_mean" (mean over the categories present), "predictions" [choice index]}``.
    """
    if not questions:
        raise GeReError("no multiple-choice questions to evaluate; check the general-ability set")
    if shots and not dev_questions:
        raise GeReError(f"shots={shots} needs dev_questions to draw examples from; pass them or set shots=0")
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for d in dev_questions or []:
        by_subject[d["subject"]].append(d)
    prompts: list[list[int]] = []
    letter_ids: list[list[int]] = []
    for q in questions:
        pool = by_subject.get(q["subject"], [])[:shots]
        if len(pool) < shots:
            pool = pool + [d for d in dev_questions or [] if d not in pool][: shots - len(pool)]
        while True:
            text = format_mc_prompt(q, pool)
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            if len(ids) <= max_length or not pool:
                break
            pool = pool[:-1]
        prompts.append(ids[-max_length:])
        letter_ids.append(_letter_token_ids(tokenizer, text, len(q["choices"])))

    device = model_device(model)
    side = getattr(tokenizer, "padding_side", "right") or "right"
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    predictions = [0] * len(prompts)
    with eval_mode(model):
        for idx in _batches(order, batch_size):
            ids, mask, positions, offsets = pad_batch(
                [prompts[i] for i in idx], _pad_id(tokenizer), side, device
            )
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            for b, i in enumerate(idx):
                last = logits[b, offsets[b] + len(prompts[i]) - 1]
                letter_logits = last[torch.tensor(letter_ids[i], device=device)]
                predictions[i] = int(torch.argmax(letter_logits).item())

    hits = [int(p == q["answer"]) for p, q in zip(predictions, questions, strict=True)]
    per_subject = _group_mean(hits, [q["subject"] for q in questions])
    per_category = _group_mean(hits, [q["category"] for q in questions])
    return {
        "accuracy": sum(hits) / len(hits),
        "n": len(hits),
        "correct": sum(hits),
        "per_category": per_category,
        "per_subject": per_subject,
        "category_mean": sum(per_category.values()) / len(per_category),
        "predictions": predictions,
    }


def _group_mean(hits: list[int], keys: list[str]) -> dict[str, float]:
    total: dict[str, int] = defaultdict(int)
    count: dict[str, int] = defaultdict(int)
    for h, k in zip(hits, keys, strict=True):
        total[k] += h
        count[k] += 1
    return {k: total[k] / count[k] for k in sorted(count)}


# ------------------------------------------------------------------------------------------------ perplexity


def perplexity(model, tokenizer, texts: list[str], max_length: int = 256, batch_size: int = 8) -> float:
    """Token-weighted perplexity ``exp(sum NLL / number of predicted tokens)`` over `texts`.

    Each text is truncated to `max_length` tokens; only real (non-padding) tokens are predicted and
    counted, and the first token of each text is context only.
    """
    encoded = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_length] for t in texts]
    encoded = [ids for ids in encoded if len(ids) >= 2]
    if not encoded:
        raise GeReError("perplexity needs texts of at least two tokens; pass non-empty held-out texts")
    device = model_device(model)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    nll, count = 0.0, 0
    with eval_mode(model):
        for idx in _batches(order, batch_size):
            ids, mask, positions, _ = pad_batch(
                [encoded[i] for i in idx], _pad_id(tokenizer), "right", device
            )
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, :-1].float()
            targets = ids[:, 1:]
            keep = mask[:, 1:].bool()
            token_nll = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
            nll += token_nll.item()
            count += int(keep.sum().item())
    return math.exp(nll / count)
