"""General ability by multiple choice: MMLU-style questions, read from files or the hub, and scored.

GeRe (arXiv 2508.04676, Sec. 5) measures general ability with MMLU among others. Questions are
``{"question", "choices", "answer", "subject", "category"?}``; the answer is read as the letter whose token
has the largest logit after the prompt.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from gere.batching import batches, eval_mode, model_device, pad_batch, pad_token_id
from gere.continual.evaluation import continuation_logprobs
from gere.continual.prompts import encode_prompt_and_target
from gere.continual.tasks import MC_FORMATS
from gere.errors import GeReError, shown
from gere.io_utils import HF_PREFIX, iter_rows, load_hub_dataset

CHOICE_LETTERS = "ABCDEFGHIJ"
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
            f"{where}: `choices` must be a list of 2-{len(CHOICE_LETTERS)} options, got {shown(choices)}"
        )
    answer = q["answer"]
    if isinstance(answer, str) and len(answer) == 1 and answer.upper() in CHOICE_LETTERS:
        answer = CHOICE_LETTERS.index(answer.upper())
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise GeReError(
            f"{where}: `answer` must be a choice index 0-{len(choices) - 1} (or letter), got {shown(answer)}"
        )
    subject = str(q.get("subject") or "general")
    checked = {
        "question": str(q["question"]),
        "choices": [str(c) for c in choices],
        "answer": answer,
        "subject": subject,
        "category": str(q.get("category") or subject_category(subject)),
    }
    if q.get("stem") is not None:
        checked["stem"] = str(q["stem"])
    return checked


def load_multiple_choice(path_or_hf: str | Path, split: str = "test", limit: int | None = None) -> list[dict]:
    """Read multiple-choice questions.

    Accepts a local ``.jsonl``/``.json`` file of ``{"question", "choices", "answer", "subject",
    "category"?}`` objects, or ``hf:<dataset>[:<config>]`` in the ``cais/mmlu`` layout (columns question,
    subject, choices, answer), e.g. ``hf:cais/mmlu:all``. A missing category is looked up from the subject.
    """
    source = str(path_or_hf)
    if source.startswith(HF_PREFIX):
        ds = load_hub_dataset(source, split)
        located = [(f"{source} [{split}], item {i + 1}", dict(row)) for i, row in enumerate(ds)]
    else:
        path = Path(source)
        if not os.path.lexists(path):
            raise GeReError(
                f"multiple-choice file {path} does not exist; pass a .jsonl/.json file or 'hf:cais/mmlu:all'"
            )
        located = list(iter_rows(path, "multiple-choice file"))
    questions = [_check_question(row, where) for where, row in located]
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
    mc_format: str = "letter",
) -> dict[str, Any]:
    """Multiple-choice accuracy, read in one of two ways (``mc_format``):

    - ``letter`` (MMLU-style): the answer is the letter whose token (" A", " B", ...) has the largest logit
      after a prompt listing the lettered options. Suits large models; small ones sit at chance this way.
    - ``cloze``: each option's text is scored as a continuation of the question's ``stem`` (when it has one,
      e.g. "The capital of Iran is"; otherwise of the question itself), as lm-evaluation-harness does:
      ``accuracy`` picks the largest log-likelihood per character of the option (``acc_norm``) and
      ``accuracy_sum`` the largest summed log-likelihood (``acc``).

    `shots` solved examples come from `dev_questions` of the same subject (any subject when it has too
    few); they are dropped one by one when the prompt exceeds `max_length`. Returns ``{"format",
    "accuracy" (question-weighted, 0-1), "n", "correct", "per_category" {category: acc}, "per_subject"
    {subject: acc}, "category_mean" (mean over the categories present), "predictions" [choice index]}``,
    and for cloze also ``"accuracy_sum"`` and ``"predictions_sum"``.
    """
    if not questions:
        raise GeReError("no multiple-choice questions to evaluate; check the general-ability set")
    if shots and not dev_questions:
        raise GeReError(f"shots={shots} needs dev_questions to draw examples from; pass them or set shots=0")
    if mc_format not in MC_FORMATS:
        raise GeReError(f"multiple-choice format {shown(mc_format)} is not one of {', '.join(MC_FORMATS)}")
    pools = _shot_pools(questions, shots, dev_questions or [])
    if mc_format == "cloze":
        return _evaluate_cloze(model, tokenizer, questions, pools, batch_size, max_length)
    prompts, letter_ids = _letter_prompts(tokenizer, questions, pools, max_length)
    predictions = _letter_predictions(model, tokenizer, prompts, letter_ids, batch_size)
    return {"format": "letter", **mc_summary(predictions, questions)}


def _shot_pools(questions, shots: int, dev_questions) -> list[list[dict]]:
    """Up to ``shots`` solved examples per question: its subject's first, then any subject's."""
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for d in dev_questions:
        by_subject[d["subject"]].append(d)
    pools = []
    for q in questions:
        pool = by_subject.get(q["subject"], [])[:shots]
        if len(pool) < shots:
            pool = pool + [d for d in dev_questions if d not in pool][: shots - len(pool)]
        pools.append(pool)
    return pools


def _fitted_prompt(tokenizer, render, pool: list[dict], max_length: int) -> tuple[str, list[int]]:
    """``render(pool)`` and its ids, dropping solved examples from the end until it fits ``max_length``."""
    while True:
        text = render(pool)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) <= max_length or not pool:
            return text, ids[-max_length:]
        pool = pool[:-1]


def _letter_prompts(tokenizer, questions, pools, max_length: int):
    """Token ids of each question's lettered prompt and of its letters."""
    prompts: list[list[int]] = []
    letter_ids: list[list[int]] = []
    for q, pool in zip(questions, pools, strict=True):
        text, ids = _fitted_prompt(tokenizer, lambda shots, q=q: format_mc_prompt(q, shots), pool, max_length)
        prompts.append(ids)
        letter_ids.append(_letter_token_ids(tokenizer, text, len(q["choices"])))
    return prompts, letter_ids


def _letter_predictions(model, tokenizer, prompts, letter_ids, batch_size: int) -> list[int]:
    """The choice whose letter token has the largest logit at each prompt's last position."""
    device = model_device(model)
    side = getattr(tokenizer, "padding_side", "right") or "right"
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    predictions = [0] * len(prompts)
    with eval_mode(model):
        for idx in batches(order, batch_size):
            ids, mask, positions, offsets = pad_batch([prompts[i] for i in idx], pad_token_id(tokenizer), side, device)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            for b, i in enumerate(idx):
                last = logits[b, offsets[b] + len(prompts[i]) - 1]
                letter_logits = last[torch.tensor(letter_ids[i], device=device)]
                predictions[i] = int(torch.argmax(letter_logits).item())
    return predictions


def cloze_context(q: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    """The text a cloze option continues: solved shots (stem and answer), then the question's stem."""
    solved = "".join(f"{s.get('stem', s['question'])} {s['choices'][s['answer']]}\n\n" for s in shots)
    return solved + q.get("stem", q["question"])


def _evaluate_cloze(model, tokenizer, questions, pools, batch_size: int, max_length: int) -> dict[str, Any]:
    prompts, options = [], []
    for q, pool in zip(questions, pools, strict=True):
        longest = max(len(tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for c in q["choices"])
        text, ids = _fitted_prompt(tokenizer, lambda shots, q=q: cloze_context(q, shots), pool,
                                   max_length - longest)  # fmt: skip
        prompts.append(ids)
        options.append([encode_prompt_and_target(tokenizer, text, " " + c)[1] for c in q["choices"]])
    scores = continuation_logprobs(model, tokenizer, prompts, options, batch_size)
    by_sum = [_first_argmax(row) for row in scores]
    by_char = [
        _first_argmax([v / max(len(c), 1) for v, c in zip(row, q["choices"], strict=True)])
        for row, q in zip(scores, questions, strict=True)
    ]
    summed = mc_summary(by_sum, questions)
    return {"format": "cloze", **mc_summary(by_char, questions), "accuracy_sum": summed["accuracy"],
            "predictions_sum": by_sum}  # fmt: skip


def _first_argmax(values: list[float]) -> int:
    """Index of the largest value; ties go to the earlier option."""
    return max(range(len(values)), key=lambda k: (values[k], -k))


def mc_summary(predictions: list[int], questions: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall, per subject and per category of predicted choice indices."""
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
