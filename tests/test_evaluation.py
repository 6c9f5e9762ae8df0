from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from gere.continual.evaluation import (
    evaluate_task,
    generate_predictions,
    perplexity,
    score_labels,
    shared_prompt_logprobs,
)
from gere.continual.multiple_choice import (
    MMLU_SUBJECT_CATEGORY,
    evaluate_multiple_choice,
    format_mc_prompt,
    load_multiple_choice,
)
from gere.continual.prompts import encode_prompt_and_target, format_prompt
from gere.continual.tasks import Example, TaskSpec
from gere.errors import GeReError

from tiny import bos_tokenizer, tiny_llama

WORDS = (
    "The following are multiple choice questions about algebra history law . A B C D Answer : Option , "
    "Good Bad very negative positive neutral Is this review good or bad ? the movie was great awful fun "
    "boring what is 1 2 3 4 x"
).split()


def make_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    fast = bos_tokenizer(WORDS)
    fast.padding_side = padding_side
    return fast


def make_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    # Untied head (bias_only_head replaces it); peaked distributions, so label scores are far apart.
    return tiny_llama(vocab_size, seed=seed, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
                      initializer_range=0.5)  # fmt: skip


def bias_only_head(model, tokenizer, favoured: dict[str, float]) -> None:
    """Make the next-token distribution constant: zero weights, a bias favouring the given tokens."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        for token, value in favoured.items():
            head.bias[tokenizer.convert_tokens_to_ids(token)] = value
    model.lm_head = head


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    # Seed chosen so the reference answers differ across prompts (a constant answer would prove little).
    return make_model(len(tok), seed=6)


def slow_logprob(model, prompt_ids, target_ids) -> float:
    ids = torch.tensor([prompt_ids + target_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logp[len(prompt_ids) + k - 1, t].item() for k, t in enumerate(target_ids))


PROMPTS = [
    "Is this review good or bad ? Option : Good, Bad \nthe movie was great fun\nAnswer:",
    "Is this review good or bad ?\nthe movie was awful\nAnswer:",
    "what is 1\nAnswer:",
    "the movie was boring boring boring and awful , what is 2 ?\nAnswer:",
]
LABELS = ["Good", "Bad", "very negative", "neutral"]


def test_score_labels_matches_slow_reference(model, tok):
    expected = []
    for prompt in PROMPTS:
        scores = [slow_logprob(model, *encode_prompt_and_target(tok, prompt, " " + w)) for w in LABELS]
        expected.append(max(range(len(LABELS)), key=scores.__getitem__))
    assert len(set(expected)) > 1
    assert score_labels(model, tok, PROMPTS, LABELS, batch_size=3) == expected
    left = make_tokenizer("left")
    assert score_labels(model, left, PROMPTS, LABELS, batch_size=5) == expected
    assert score_labels(model, tok, PROMPTS, LABELS, batch_size=1) == expected


def test_score_labels_logprobs_same_under_padding_sides(model, tok):
    from gere.continual.evaluation import sequence_logprobs

    pairs = [encode_prompt_and_target(tok, p, " " + w) for p in PROMPTS for w in LABELS]
    reference = torch.tensor([slow_logprob(model, *p) for p in pairs])
    for side in ("left", "right"):
        got = torch.tensor(sequence_logprobs(model, make_tokenizer(side), pairs, batch_size=4))
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)


def test_score_labels_known_preference(tok):
    model = make_model(len(tok), seed=1)
    # Constant next-token distribution: "Bad" is most likely; a two-token label pays for both tokens.
    bias_only_head(model, tok, {"Bad": 4.0, "very": 6.0, "negative": 1.0})
    assert score_labels(model, tok, PROMPTS, ["Good", "Bad", "very negative"]) == [1] * len(PROMPTS)
    bias_only_head(model, tok, {"Bad": 4.0, "very": 6.0, "negative": 5.0})
    assert score_labels(model, tok, PROMPTS, ["Good", "Bad", "very negative"]) == [2] * len(PROMPTS)


def test_eval_restores_training_mode(model, tok):
    model.train()
    score_labels(model, tok, PROMPTS[:1], LABELS)
    assert model.training
    model.eval()
    score_labels(model, tok, PROMPTS[:1], LABELS)
    assert not model.training


def test_evaluate_task_label_and_generate(tok):
    model = make_model(len(tok), seed=2)
    bias_only_head(model, tok, {"Good": 5.0})
    spec = TaskSpec(
        name="sent", instruction="Is this review good or bad ?", labels=["Good", "Bad"], source="x.json"
    )
    examples = [Example("the movie was great", "Good"), Example("awful", "Bad"), Example("fun", "Good")]
    result = evaluate_task(model, tok, spec, examples, method="label", batch_size=2)
    assert result == {"accuracy": 2 / 3, "n": 3, "correct": 2, "predictions": ["Good"] * 3}
    gen = evaluate_task(model, tok, spec, examples, method="generate", max_new_tokens=1)
    assert gen["predictions"] == ["Good"] * 3 and gen["correct"] == 2
    with pytest.raises(GeReError, match="'label' or 'generate'"):
        evaluate_task(model, tok, spec, examples, method="vote")


def test_generate_batched_matches_one_by_one(model, tok):
    prompts = [
        format_prompt(
            TaskSpec(
                name="t", instruction="Is this review good or bad ?", labels=["Good", "Bad"], source="x"
            ),
            x,
        )
        for x in ("the movie was great fun", "awful", "what is 1 2 3")
    ]
    batched = generate_predictions(model, tok, prompts, max_new_tokens=4, batch_size=3)
    single = [generate_predictions(model, tok, [p], max_new_tokens=4, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(p, str) and p for p in batched)


QUESTIONS = [
    {"question": "what is 1", "choices": ["1", "2", "3", "4"], "answer": 0, "subject": "abstract_algebra"},
    {"question": "what is 2", "choices": ["1", "2", "3", "4"], "answer": 1, "subject": "abstract_algebra"},
    {
        "question": "the movie was",
        "choices": ["great", "awful", "fun", "boring"],
        "answer": 1,
        "subject": "high_school_us_history",
    },
    {"question": "what is x", "choices": ["1", "x", "3", "4"], "answer": 3, "subject": "international_law"},
    {"question": "what is law", "choices": ["law", "x", "history", "4"], "answer": 1, "subject": "marketing"},
]


def slow_mc(model, tok, q, shots):
    prompt = format_mc_prompt(q, shots)
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        last = model(input_ids=torch.tensor([ids])).logits[0, -1]
    letters = [encode_prompt_and_target(tok, prompt, f" {c}")[1][0] for c in "ABCD"]
    return int(torch.argmax(last[letters]).item())


def test_multiple_choice_matches_slow_reference(model, tok, tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    questions = load_multiple_choice(path)
    assert questions[3]["category"] == "humanities" and questions[4]["category"] == "other"
    dev = questions[:2]
    for shots in (0, 1):
        expected = [slow_mc(model, tok, q, dev[:shots] if shots else []) for q in questions]
        assert len(set(expected)) > 1
        result = evaluate_multiple_choice(model, tok, questions, shots=shots, dev_questions=dev, batch_size=2)
        assert result["predictions"] == expected
        left = evaluate_multiple_choice(
            model, make_tokenizer("left"), questions, shots=shots, dev_questions=dev
        )
        assert left["predictions"] == expected


def test_multiple_choice_category_averages(tok):
    model = make_model(len(tok), seed=3)
    bias_only_head(model, tok, {"B": 5.0})  # always answers B (index 1)
    result = evaluate_multiple_choice(model, tok, load_multiple_choice_rows(QUESTIONS))
    # Answers are [0, 1, 1, 3, 1]: hits [0, 1, 1, 0, 1].
    assert result["accuracy"] == pytest.approx(3 / 5) and result["correct"] == 3
    assert result["per_category"] == {"STEM": 0.5, "humanities": 0.5, "other": 1.0}
    assert result["per_subject"]["abstract_algebra"] == 0.5
    assert result["category_mean"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)


def load_multiple_choice_rows(rows):
    from gere.continual.multiple_choice import _check_question

    return [_check_question(r, f"item {i}") for i, r in enumerate(rows)]


def test_mmlu_table_and_bad_input(tmp_path):
    assert len(MMLU_SUBJECT_CATEGORY) == 57
    counts = {c: list(MMLU_SUBJECT_CATEGORY.values()).count(c) for c in set(MMLU_SUBJECT_CATEGORY.values())}
    assert counts == {"STEM": 18, "humanities": 13, "social sciences": 12, "other": 14}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(GeReError, match="line 1: `answer`"):
        load_multiple_choice(bad)


def test_load_multiple_choice_hf_layout(monkeypatch):
    import datasets

    def fake_load_dataset(name, config, split):
        assert (name, config, split) == ("cais/mmlu", "all", "test")
        return datasets.Dataset.from_list([dict(q) for q in QUESTIONS[:2]])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    questions = load_multiple_choice("hf:cais/mmlu:all")
    assert [q["category"] for q in questions] == ["STEM", "STEM"] and questions[1]["answer"] == 1


def test_perplexity_matches_slow_reference(model, tok):
    texts = ["the movie was great fun", "what is 1 2 3 4", "awful", "Good Bad Good Bad Good Bad Good Bad"]
    nll, count = 0.0, 0
    for t in texts:
        ids = tok(t)["input_ids"][:6]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    expected = math.exp(nll / count)
    for side in ("left", "right"):
        got = perplexity(model, make_tokenizer(side), texts, max_length=6, batch_size=3)
        assert got == pytest.approx(expected, rel=1e-4)
    with pytest.raises(GeReError, match="at least two tokens"):
        perplexity(model, tok, [""])


def test_shared_prompt_logprobs_match_slow_reference_with_multi_token_targets(model, tok):
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    targets = [encode_prompt_and_target(tok, PROMPTS[0], " " + w)[1] for w in LABELS]
    assert max(len(t) for t in targets) > 1  # "very negative" continues past the first token
    got = shared_prompt_logprobs(model, tok, prompts, targets, batch_size=3)
    want = [slow_logprob(model, p, t) for p in prompts for t in targets]
    assert got == pytest.approx(want, abs=1e-4)


SHARED = "Is this review good or bad ? Option : Good, Bad \n"
REVIEWS = ["the movie was great fun", "awful", "the movie was boring boring boring and awful , what is 2 ?",
           "fun", "what is 1 2 3 4 x"]  # fmt: skip


def test_shared_prefix_runs_once_and_matches_slow_reference(model, tok):
    """Prompts that start alike (a task's instruction and options): the shared tokens run once, and every
    score still equals the slow one-sequence-at-a-time reference, for any batch size and label length."""
    from gere.continual import evaluation

    prompts = [tok(SHARED + r + "\nAnswer:")["input_ids"] for r in REVIEWS]
    targets = [encode_prompt_and_target(tok, SHARED + REVIEWS[0] + "\nAnswer:", " " + w)[1] for w in LABELS]
    shared = evaluation.shared_prefix_length(prompts)
    assert shared >= evaluation.MIN_SHARED_PREFIX and shared == len(tok(SHARED.strip())["input_ids"])
    want = [slow_logprob(model, p, t) for p in prompts for t in targets]
    fed: list[int] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, args, out: fed.append(args[0].numel()))
    try:
        for batch_size in (1, 2, 3, 8):
            fed.clear()
            got = evaluation.shared_prompt_logprobs(model, tok, prompts, targets, batch_size=batch_size)
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-4)
            # The prefix once (batch 1), then the first batch's own tokens, left-padded to its longest.
            first = sorted(prompts, key=len, reverse=True)[:batch_size]
            assert fed[:2] == [shared, len(first) * (len(first[0]) - shared)]
    finally:
        hook.remove()


def test_shared_prefix_length_leaves_every_prompt_a_token_of_its_own():
    from gere.continual.evaluation import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_length([[7, 2], [1, 2]]) == 0
    assert shared_prefix_length([[1], [1, 2]]) == 0


# ------------------------------------------------------------------------------------------ cloze scoring

CLOZE = [
    {"question": "the movie was what ?", "stem": "the movie was", "choices": ["great fun", "awful", "boring x"],
     "answer": 0, "subject": "film"},
    {"question": "what is 1 2 ?", "choices": ["3", "4 4", "x"], "answer": 1, "subject": "algebra"},
    {"question": "Is this review good or bad ?", "stem": "this review is",
     "choices": ["Good", "Bad", "very negative", "neutral"], "answer": 3, "subject": "film"},
]  # fmt: skip


def test_cloze_scores_match_slow_reference_and_use_the_stem(model, tok):
    from gere.continual.evaluation import continuation_logprobs

    questions = load_multiple_choice_rows(CLOZE)
    prompts = [tok(q.get("stem", q["question"]))["input_ids"] for q in questions]
    options = [[encode_prompt_and_target(tok, q.get("stem", q["question"]), " " + c)[1] for c in q["choices"]]
               for q in questions]  # fmt: skip
    expected = [[slow_logprob(model, p, o) for o in opts] for p, opts in zip(prompts, options, strict=True)]
    for batch_size in (1, 2, 3):
        got = continuation_logprobs(model, tok, prompts, options, batch_size=batch_size)
        torch.testing.assert_close(torch.tensor([x for r in got for x in r]),
                                   torch.tensor([x for r in expected for x in r]), rtol=1e-4, atol=1e-4)  # fmt: skip
    by_char = [max(range(len(r)), key=lambda k, r=r, q=q: r[k] / len(q["choices"][k]))
               for r, q in zip(expected, questions, strict=True)]  # fmt: skip
    result = evaluate_multiple_choice(model, tok, questions, mc_format="cloze", batch_size=2)
    assert result["format"] == "cloze" and result["predictions"] == by_char
    assert result["predictions_sum"] == [max(range(len(r)), key=r.__getitem__) for r in expected]
    # Scored after the question instead of the stem, the first question's options get other values.
    after_question = slow_logprob(model, tok(questions[0]["question"])["input_ids"], options[0][0])
    assert abs(after_question - expected[0][0]) > 1e-3


def test_cloze_known_preference_sum_and_per_character_differ(tok):
    model = make_model(len(tok), seed=1)
    # Constant next-token distribution: "very" alone beats "Good Good Good" in summed log-likelihood,
    # but per character the long, likely option wins.
    bias_only_head(model, tok, {"Good": 5.0, "very": 4.0})
    q = {"question": "the movie was", "choices": ["very", "Good Good Good", "Bad"], "answer": 1, "subject": "film"}
    result = evaluate_multiple_choice(model, tok, load_multiple_choice_rows([q] * 3), mc_format="cloze")
    assert result["predictions_sum"] == [0, 0, 0] and result["accuracy_sum"] == 0.0
    assert result["predictions"] == [1, 1, 1] and result["accuracy"] == 1.0
    with pytest.raises(GeReError, match="not one of letter, cloze"):
        evaluate_multiple_choice(model, tok, load_multiple_choice_rows([q]), mc_format="word")
