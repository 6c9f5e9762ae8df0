"""A general-ability suite of standard benchmarks (ARC-Easy, PIQA, OpenBookQA, CommonsenseQA, MMLU, LAMBADA)
read from local files in their released formats and scored as lm-evaluation-harness 0.4 scores them.

GeRe (arXiv 2508.04676, Sec. 5) measures general ability on standard benchmarks (MMLU among others) beside
the task sequence. The table of benchmarks is `gere.continual.general_benchmarks`. Scoring follows lm-eval:

* multiple choice: the log-likelihood of each continuation (delimiter + choice) after the context, summed
  over its tokens; ``acc`` picks the largest sum, ``acc_norm`` the largest sum divided by the choice's
  length in characters (lm-eval's ``completion_len``); ties go to the first choice (``np.argmax``).
* last word (LAMBADA): ``acc`` counts the passages whose last word is the greedy continuation (every token
  the most likely one: lm-eval's ``is_greedy``); ``perplexity`` is ``exp(-mean log-likelihood of the last
  word)`` over passages (lm-eval's ``perplexity`` aggregation).

Token ids are lm-eval's: trailing spaces of the context move to the continuation, the continuation's ids are
those of ``context + continuation`` after the context's own ids. The scorer is
`gere.continual.evaluation.continuation_scores` (each context runs once for all its choices).

Standard errors: ``sqrt(p (1 - p) / n)`` for an accuracy p over n questions (binomial; lm-eval's
``mean_stderr`` divides the sample standard deviation, ``sqrt(n / (n - 1))`` larger); for the perplexity the
delta method, ``ppl * sd(log-likelihood) / sqrt(n)``; for the suite's mean of K benchmarks (independent
questions) ``sqrt(sum se_k^2) / K``.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gere.continual.evaluation import continuation_scores
from gere.continual.general_benchmarks import BENCHMARKS, TARGET_DELIMITER, Benchmark, benchmark
from gere.errors import GeReError


@dataclass(frozen=True)
class Doc:
    """One question of a benchmark, ready to score."""

    key: tuple[str, int]  # (released file relative to the data folder, 0-based row): the same row elsewhere
    context: str
    choices: list[str]  # continuations' texts, without the target delimiter
    gold: int
    group: str = ""  # the stratum (MMLU's subject)


def read_benchmark(bench: Benchmark, data_dir: str | Path) -> list[Doc]:
    """Every row of `bench`'s released files under `data_dir`, as `Doc`s (a bad row is an error naming it)."""
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise GeReError(f"evaluation.general_suite_dir {folder} is not a folder; put the benchmarks' released files "
                        "there (docs/general_suite.md lists them) or point general_suite_dir at them")  # fmt: skip
    docs = []
    for key, row in bench.read(folder):
        choices = bench.choices(row)
        gold = bench.gold(row)
        if not choices or not 0 <= gold < len(choices) or not all(isinstance(c, str) and c for c in choices):
            raise GeReError(f"{folder / key[0]}, row {key[1] + 1}: the choices {choices} or the answer {gold} are "
                            "not usable (empty choice, or an answer outside them); fix or remove that row")  # fmt: skip
        docs.append(Doc(key, bench.prompt(row), choices, gold, bench.group(row) if bench.group else ""))
    if not docs:
        raise GeReError(f"general suite benchmark {bench.name!r}: {folder / bench.files} holds no rows; give the "
                        "released file")  # fmt: skip
    return docs


def subsample(docs: list[Doc], size: int | None, seed: int) -> list[Doc]:
    """`size` of `docs` drawn with ``random.Random(seed)``, in file order; all of them when `size` is None or
    not smaller.

    Docs with groups (MMLU's subjects) are stratified with equal allocation: every group gives
    ``size // groups`` (all it has when fewer), and the questions left over go one each to groups drawn
    from the same generator, so 114 of MMLU are 2 per subject. The pooled accuracy of such a sample then
    weighs subjects equally (lm-eval's full-test MMLU weighs them by size).
    """
    if size is None or size >= len(docs):
        return list(docs)
    rng = random.Random(seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, doc in enumerate(docs):
        groups[doc.group].append(i)
    if len(groups) == 1:
        return [docs[i] for i in sorted(rng.sample(range(len(docs)), size))]
    names = sorted(groups)
    quota = {g: min(size // len(names), len(groups[g])) for g in names}
    while sum(quota.values()) < size:  # the rest, one each to seeded groups that still have questions
        open_groups = [g for g in names if quota[g] < len(groups[g])]
        quota[rng.choice(open_groups)] += 1
    picked = [i for g in names for i in rng.sample(groups[g], quota[g])]
    return [docs[i] for i in sorted(picked)]


def load_suite(names: list[str], data_dir: str | Path, limits: dict[str, int | None], seed: int) -> dict[str, list[Doc]]:
    """The seeded subsample (``limits[name]``, None for all) of each named benchmark, read once per run."""
    return {name: subsample(read_benchmark(benchmark(name), data_dir), limits.get(name), seed) for name in names}


def lm_eval_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as lm-eval's ``_encode_pair`` makes them (causal models)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    context_ids = tokenizer(context)["input_ids"]
    rest = whole[len(context_ids) :]
    if not rest:
        raise GeReError(f"the continuation {continuation!r} tokenizes to nothing after its context; fix that row")
    return list(context_ids), list(rest)


def _encoded(tokenizer, docs: list[Doc], max_length: int) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Each doc's context ids (left-cut to fit `max_length` with its longest continuation) and continuations'."""
    prompts, continuations = [], []
    for doc in docs:
        pairs = [lm_eval_pair(tokenizer, doc.context, TARGET_DELIMITER + c) for c in doc.choices]
        room = max_length - max(len(cont) for _, cont in pairs)
        if room < 1:
            raise GeReError(f"evaluation.general_suite_max_length {max_length} cannot hold a choice of {doc.key}; "
                            "raise it")  # fmt: skip
        prompts.append(pairs[0][0][-room:])
        continuations.append([cont for _, cont in pairs])
    return prompts, continuations


def _first_argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda k: (values[k], -k))


def binomial_stderr(p: float, n: int) -> float:
    """``sqrt(p (1 - p) / n)``: the standard error of an accuracy p over n questions."""
    return math.sqrt(p * (1 - p) / n)


def score_benchmark(model, tokenizer, bench: Benchmark, docs: list[Doc], batch_size: int = 16,
                    max_length: int = 2048, details: bool = False) -> dict[str, Any]:  # fmt: skip
    """The scores of `bench` on `docs`: ``{"n", "acc", "acc_stderr", "score", "score_stderr", "metric"}`` and
    ``acc_norm(_stderr)`` (multiple choice) or ``perplexity(_stderr)`` (last word); ``score`` is the entry's
    `metric`. With `details`, ``"docs"``: per question its key, log-likelihoods, greedy flags and picks."""
    if not docs:
        raise GeReError(f"general suite benchmark {bench.name!r} has no questions to score")
    prompts, continuations = _encoded(tokenizer, docs, max_length)
    scored = continuation_scores(model, tokenizer, prompts, continuations, batch_size)
    n = len(docs)
    rows = []
    for doc, row in zip(docs, scored, strict=True):
        lls = [ll for ll, _ in row]
        pick = _first_argmax(lls)
        pick_norm = _first_argmax([ll / len(c) for ll, c in zip(lls, doc.choices, strict=True)])
        rows.append({"key": list(doc.key), "ll": lls, "greedy": [g for _, g in row], "pred": pick,
                     "pred_norm": pick_norm, "gold": doc.gold})  # fmt: skip
    out: dict[str, Any] = {"n": n, "metric": bench.metric}
    if bench.scoring == "multiple_choice":
        out["acc"] = sum(r["pred"] == r["gold"] for r in rows) / n
        out["acc_norm"] = sum(r["pred_norm"] == r["gold"] for r in rows) / n
        out["acc_norm_stderr"] = binomial_stderr(out["acc_norm"], n)
    else:
        lls = [r["ll"][0] for r in rows]
        mean = sum(lls) / n
        sd = math.sqrt(sum((v - mean) ** 2 for v in lls) / (n - 1)) if n > 1 else 0.0
        out["acc"] = sum(r["greedy"][0] for r in rows) / n
        out["perplexity"] = math.exp(-mean)
        out["perplexity_stderr"] = out["perplexity"] * sd / math.sqrt(n)
    out["acc_stderr"] = binomial_stderr(out["acc"], n)
    out["score"], out["score_stderr"] = out[bench.metric], out[f"{bench.metric}_stderr"]
    if details:
        out["docs"] = rows
    return out


def evaluate_suite(model, tokenizer, suite: dict[str, list[Doc]], batch_size: int = 16,
                   max_length: int = 2048) -> dict[str, Any]:  # fmt: skip
    """``{"suite": {name: scores}, "suite_score": mean of the scores, "suite_stderr"}`` for the model as it is
    now: the general score of a stage (`gere.continual.metrics.general_score`)."""
    if not suite:
        raise GeReError("the general suite names no benchmark; list some in evaluation.general_suite")
    scores = {name: score_benchmark(model, tokenizer, BENCHMARKS[name], docs, batch_size, max_length)
              for name, docs in suite.items()}  # fmt: skip
    k = len(scores)
    return {
        "suite": scores,
        "suite_score": sum(s["score"] for s in scores.values()) / k,
        "suite_stderr": math.sqrt(sum(s["score_stderr"] ** 2 for s in scores.values())) / k,
    }
