"""The demo's data, built from real corpora: disjoint splits, the probe, and the continual tasks.

Pure functions from the corpora's text to rows; `gere.demo.assets` reads the wheels and writes files.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from gere.errors import GeReError

logger = logging.getLogger(__name__)

PROBE_SECTIONS = ("capital-common-countries", "capital-world")
#: questions-words.txt section -> relation label of the grammar task.
GRAMMAR_SECTIONS = {
    "gram2-opposite": "opposite",
    "gram3-comparative": "comparative",
    "gram4-superlative": "superlative",
    "gram7-past-tense": "past",
    "gram8-plural": "plural",
}


def split_disjoint(
    items: Sequence[Any], sizes: Sequence[int], *, seed: int, group: Callable[[Any], Hashable] | None = None
) -> list[list[Any]]:
    """Shuffle `items` (with `seed`) and cut them into disjoint parts of at most `sizes[i]` items.

    With `group`, items sharing a group key (e.g. the Wikipedia article) all go to the same part, so
    held-out text never comes from an article in the replay set; surplus items of a group are dropped.
    """
    rng = random.Random(seed)
    groups: dict[Hashable, list[Any]] = {}
    for i, item in enumerate(items):
        groups.setdefault(group(item) if group else i, []).append(item)
    order = list(groups)
    rng.shuffle(order)
    parts: list[list[Any]] = [[] for _ in sizes]
    part = 0
    for key in order:
        while part < len(sizes) and len(parts[part]) >= sizes[part]:
            part += 1
        if part == len(sizes):
            break
        parts[part].extend(groups[key][: sizes[part] - len(parts[part])])
    return parts


def stratified_split(
    examples: Sequence[dict[str, str]], n_train: int, n_test: int, *, seed: int, name: str = "task"
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Disjoint, class-balanced train/test splits of `{"input", "label"}` examples.

    Duplicate inputs are dropped first (so no input is in both splits). Classes are interleaved round-robin
    after shuffling, so both splits are as balanced as the data allows. When the source has fewer than
    `n_train + n_test` examples both sizes shrink in proportion (logged).
    """
    rng = random.Random(seed)
    unique: dict[str, dict[str, str]] = {}
    for ex in examples:
        unique.setdefault(ex["input"], ex)
    by_label: dict[str, list[dict[str, str]]] = {}
    for ex in unique.values():
        by_label.setdefault(ex["label"], []).append(ex)
    for label in sorted(by_label):
        rng.shuffle(by_label[label])
    interleaved, columns = [], [by_label[k] for k in sorted(by_label)]
    for i in range(max((len(c) for c in columns), default=0)):
        interleaved.extend(c[i] for c in columns if i < len(c))
    total = len(interleaved)
    if total < n_train + n_test:
        n_test_new = round(total * n_test / (n_train + n_test))
        logger.warning(
            "%s has %d distinct examples, fewer than %d train + %d test; using %d train + %d test",
            name,
            total,
            n_train,
            n_test,
            total - n_test_new,
            n_test_new,
        )
        n_train, n_test = total - n_test_new, n_test_new
    test, train = interleaved[:n_test], interleaved[n_test : n_test + n_train]
    rng.shuffle(test)
    rng.shuffle(train)
    return train, test


def parse_analogy_sections(text: str) -> dict[str, list[tuple[str, str]]]:
    """`questions-words.txt` -> {section: distinct word pairs in file order}; each line `a b c d` holds (a, b), (c, d)."""
    sections: dict[str, dict[tuple[str, str], None]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith(":"):
            current = sections.setdefault(line[1:].strip(), {})
            continue
        words = line.split()
        if current is None or len(words) != 4:
            continue
        current[(words[0], words[1])] = None
        current[(words[2], words[3])] = None
    return {k: list(v) for k, v in sections.items()}


def build_probe(
    pairs: Sequence[tuple[str, str]],
    n: int,
    *,
    seed: int,
    subject: str = "world_capitals",
    category: str = "geography",
) -> list[dict[str, Any]]:
    """4-way questions from (capital, country) pairs, asked in both directions, with a cloze ``stem``
    ("The capital of X is" / "Y is the capital of") that an option's text completes.

    Distractors come from the same list and are never a correct answer to the question, so exactly one
    option is right; the position of the answer is drawn with `seed`.
    """
    rng = random.Random(seed)
    pairs = sorted(set(pairs))
    capitals_of: dict[str, set[str]] = {}
    countries_of: dict[str, set[str]] = {}
    for capital, country in pairs:
        capitals_of.setdefault(country, set()).add(capital)
        countries_of.setdefault(capital, set()).add(country)
    all_capitals, all_countries = sorted(countries_of), sorted(capitals_of)
    candidates = []
    for capital, country in pairs:
        candidates.append((f"What is the capital of {country}?", f"The capital of {country} is", capital,
                           all_capitals, capitals_of[country]))  # fmt: skip
        candidates.append((f"{capital} is the capital of which country?", f"{capital} is the capital of", country,
                           all_countries, countries_of[capital]))  # fmt: skip
    rng.shuffle(candidates)
    out = []
    for question, stem, correct, pool, also_correct in candidates[:n]:
        wrong = [x for x in pool if x not in also_correct]
        if len(wrong) < 3:
            raise GeReError(
                f"too few distinct answers to build the probe question {question!r}; pass more pairs"
            )
        choices = rng.sample(wrong, 3)
        answer = rng.randrange(4)
        choices.insert(answer, correct)
        out.append(
            {
                "question": question,
                "stem": stem,
                "choices": choices,
                "answer": answer,
                "subject": subject,
                "category": category,
            }
        )
    if len(out) < n:
        logger.warning("probe: only %d questions available, fewer than the %d asked for", len(out), n)
    return out


def without_words(examples: list[dict[str, str]], words: set[str]) -> list[dict[str, str]]:
    """Examples whose input contains none of ``words`` (lowercase, whole words)."""
    return [e for e in examples if not set(re.findall(r"[a-z]+", e["input"].lower())) & words]


def _detokenize(sentence: str) -> str:
    """Undo the Pang & Lee tokenisation ("it 's good , really .") into readable text."""
    s = " ".join(sentence.split())
    s = re.sub(r" ([,.;:!?%)\]])", r"\1", s)
    s = re.sub(r"([(\[]) ", r"\1", s)
    s = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", s)
    return s[:1].upper() + s[1:]


def sentiment_examples(text: str) -> list[dict[str, str]]:
    """Pang & Lee polarity sentences (`__label__pos|neg sentence`) -> `{"input", "label": Good|Bad}`."""
    labels = {"__label__pos": "Good", "__label__neg": "Bad"}
    out = []
    for line in text.splitlines():
        tag, _, sentence = line.strip().partition(" ")
        if tag in labels and sentence.strip():
            out.append({"input": _detokenize(sentence), "label": labels[tag]})
    return out


def grammar_examples(sections: dict[str, list[tuple[str, str]]]) -> list[dict[str, str]]:
    """Word pairs from the gram* sections -> `{"input": "good : better", "label": "comparative"}`."""
    return [
        {"input": f"{a} : {b}", "label": label}
        for section, label in GRAMMAR_SECTIONS.items()
        for a, b in sections.get(section, [])
    ]


#: WordNet noun lexicographer files (``lexnames``: 5 noun.animal, ...) -> label of the category task.
NOUN_CATEGORIES = {5: "animal", 20: "plant", 13: "food", 6: "artifact", 18: "person"}


def wordnet_lexfiles(data_text: str) -> dict[str, int]:
    """WordNet ``data.<pos>`` -> {synset offset: lexicographer file number}. License lines start with spaces."""
    out = {}
    for line in data_text.splitlines():
        if line and not line.startswith(" "):
            fields = line.split(maxsplit=2)
            out[fields[0]] = int(fields[1])
    return out


def category_examples(index_text: str, data_text: str, categories: dict[int, str] = NOUN_CATEGORIES,
                      min_tagged: int = 1) -> list[dict[str, str]]:  # fmt: skip
    """Nouns whose most frequent sense lies in one of ``categories`` -> ``{"input": word, "label": category}``.

    From WordNet's ``index.noun`` (lemma, ..., tagged sense count, synset offsets by frequency) and
    ``data.noun``; only plain lowercase words of 3+ letters with at least ``min_tagged`` senses seen in the
    SemCor corpus, so that the words are ones a model has met.
    """
    lexfile = wordnet_lexfiles(data_text)
    out = []
    for line in index_text.splitlines():
        if not line or line.startswith(" "):
            continue
        fields = line.split()
        lemma, senses, pointers = fields[0], int(fields[2]), int(fields[3])
        tagged = int(fields[5 + pointers])
        first = fields[6 + pointers]
        if senses < 1 or tagged < min_tagged or not re.fullmatch(r"[a-z]{3,}", lemma):
            continue
        label = categories.get(lexfile.get(first, -1))
        if label:
            out.append({"input": lemma, "label": label})
    return out


# In training order. Grammar first: at the demo's learning rate, sentiment trained first on the fresh model
# is unstable (it swings between 50% and 83% from one step count to the next); trained second it is learned.
TASKS = {
    "grammar": "Which relation holds between the two words?",
    "sentiment": "Is the sentiment of this movie review sentence Good or Bad?",
    "category": "What kind of thing does this word name?",
}
TASK_LABELS = {
    "grammar": list(GRAMMAR_SECTIONS.values()),
    "sentiment": ["Good", "Bad"],
    "category": list(NOUN_CATEGORIES.values()),
}


def truncate_at_sentence(text: str, max_chars: int) -> str:
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    end = max(cut.rfind(". "), cut.rfind("? "), cut.rfind("! "))
    return cut[: end + 1] if end > max_chars // 3 else cut.rsplit(" ", 1)[0]
