"""The general suite: released formats read, lm-eval's prompts, scoring against a slow reference, seeded and
stratified subsamples, errors for missing files and bad rows."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from gere.continual.compare import compare_runs
from gere.continual.general_benchmarks import BENCHMARKS
from gere.continual.general_suite import (
    Doc,
    evaluate_suite,
    lm_eval_pair,
    load_suite,
    read_benchmark,
    score_benchmark,
    subsample,
)
from gere.continual.run_config import load_run_config
from gere.errors import GeReError
from tests.tiny import tiny_llama, tiny_tokenizer
from tests.tiny_runs import run

ALL = list(BENCHMARKS)


def _jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _labelled(i: int, texts: list[str], key: str, stem_first: bool = False) -> dict:
    choices = [{"text": t, "label": "ABCDE"[k]} for k, t in enumerate(texts)]
    question = {"stem": f"the river {i} is", "choices": choices}
    return {"answerKey": key, "id": f"q{i}", "question": question}


def write_fixtures(root: Path, n: int = 4) -> Path:
    """A few rows of every benchmark in its released format and file name, under ``root``."""
    _jsonl(root / "arc_easy/ARC-Easy-Test.jsonl", [_labelled(i, ["north", "south city", "east", "west"], "ABCD"[i % 4])
                                                   for i in range(n)])  # fmt: skip
    _jsonl(root / "openbookqa/test.jsonl", [_labelled(i, ["old", "new", "great", "small"], " B") for i in range(n)])
    csqa = [_labelled(i, ["one", "two", "three", "four", "five"], "C") for i in range(n)]
    for row in csqa:
        row["question"]["question_concept"] = "river"
    _jsonl(root / "commonsenseqa/dev_rand_split.jsonl", csqa)
    _jsonl(root / "piqa/valid.jsonl", [{"goal": f"the king {i}", "sol1": "a song", "sol2": "the long war"}
                                       for i in range(n)])  # fmt: skip
    (root / "piqa/valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(n)))
    _jsonl(root / "lambada/lambada_test.jsonl", [{"text": f"the city of the {i} river is the city"} for i in range(n)])
    (root / "mmlu/test").mkdir(parents=True)
    for subject in ("anatomy", "world_religions", "virology"):
        lines = [f'"the book {i} is, a",one,two,three,four,{"ABCD"[i % 4]}\n' for i in range(n)]
        (root / f"mmlu/test/{subject}_test.csv").write_text("".join(lines))
    return root


def test_readers_parse_the_released_formats_with_lm_evals_prompts(tmp_path):
    root = write_fixtures(tmp_path)
    arc = read_benchmark(BENCHMARKS["arc_easy"], root)
    assert (arc[1].context, arc[1].choices, arc[1].gold) == ("Question: the river 1 is\nAnswer:",
                                                             ["north", "south city", "east", "west"], 1)  # fmt: skip
    assert arc[1].key == ("arc_easy/ARC-Easy-Test.jsonl", 1)
    obqa = read_benchmark(BENCHMARKS["openbookqa"], root)[0]
    assert (obqa.context, obqa.gold) == ("the river 0 is", 1)  # answerKey " B" read as lm-eval does (lstrip)
    csqa = read_benchmark(BENCHMARKS["commonsenseqa"], root)[0]
    assert csqa.context == "Question: the river 0 is\nA. one\nB. two\nC. three\nD. four\nE. five\nAnswer:"
    assert (csqa.choices, csqa.gold) == (list("ABCDE"), 2)
    piqa = read_benchmark(BENCHMARKS["piqa"], root)
    assert [d.gold for d in piqa] == [0, 1, 0, 1] and piqa[0].context == "Question: the king 0\nAnswer:"
    mmlu = read_benchmark(BENCHMARKS["mmlu"], root)
    assert len(mmlu) == 12 and mmlu[0].group == "anatomy" and mmlu[0].choices == list("ABCD")
    assert mmlu[1].context == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                               "the book 1 is, a\nA. one\nB. two\nC. three\nD. four\nAnswer:")  # fmt: skip
    assert mmlu[1].gold == 1 and mmlu[-1].group == "world_religions"
    lam = read_benchmark(BENCHMARKS["lambada"], root)[2]
    assert (lam.context, lam.choices) == ("the city of the 2 river is the", ["city"])


def _reference_logprob(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """Slow and obvious: the whole sequence once, the sum of each continuation token's log-probability."""
    ctx, cont = lm_eval_pair(tok, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    rows = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    total = sum(float(logp[p, t]) for p, t in zip(rows, cont, strict=True))
    greedy = all(int(logp[p].argmax()) == t for p, t in zip(rows, cont, strict=True))
    return total, greedy


@pytest.mark.parametrize("name", ["arc_easy", "piqa", "lambada"])
def test_scores_equal_a_slow_reference(tmp_path, name):
    root = write_fixtures(tmp_path)
    model, tok = tiny_llama(vocab_size=len(tiny_tokenizer())), tiny_tokenizer()
    bench = BENCHMARKS[name]
    docs = read_benchmark(bench, root)
    out = score_benchmark(model, tok, bench, docs, batch_size=3, details=True)
    hits, hits_norm, lls_all = 0, 0, []
    for doc, row in zip(docs, out["docs"], strict=True):
        ref = [_reference_logprob(model, tok, doc.context, " " + c) for c in doc.choices]
        torch.testing.assert_close(row["ll"], [r[0] for r in ref], atol=1e-4, rtol=1e-5)
        assert row["greedy"] == [r[1] for r in ref]
        lls = [r[0] for r in ref]
        hits += max(range(len(lls)), key=lambda k: (lls[k], -k)) == doc.gold
        norm = [v / len(c) for v, c in zip(lls, doc.choices, strict=True)]  # per character, as lm-eval
        hits_norm += max(range(len(norm)), key=lambda k: (norm[k], -k)) == doc.gold
        lls_all.append(lls[0])
    if bench.scoring == "multiple_choice":
        assert out["acc"] == hits / len(docs) and out["acc_norm"] == hits_norm / len(docs)
    else:
        assert out["acc"] == sum(r["greedy"][0] for r in out["docs"]) / len(docs)
        assert out["perplexity"] == pytest.approx(math.exp(-sum(lls_all) / len(lls_all)), rel=1e-4)
    assert out["acc_stderr"] == pytest.approx(math.sqrt(out["acc"] * (1 - out["acc"]) / len(docs)))


def test_acc_norm_divides_by_the_choice_length_in_characters():
    """A long choice with the larger sum loses under acc_norm to a short one with the better per-character
    score; built so that the two picks differ."""
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    doc = Doc(("x", 0), "the river", ["city", "city of the great north south east west river"], gold=0)
    out = score_benchmark(model, tok, BENCHMARKS["arc_easy"], [doc], details=True)
    lls = out["docs"][0]["ll"]
    by_sum, by_char = int(lls[1] > lls[0]), int(lls[1] / 44 > lls[0] / 4)
    assert out["docs"][0]["pred"] == by_sum and out["docs"][0]["pred_norm"] == by_char
    assert out["acc"] == float(by_sum == 0) and out["acc_norm"] == float(by_char == 0)


def test_lambada_greedy_word_counts_as_right(tmp_path):
    """A passage ending in the model's own greedy word is right, one ending in another word is not."""
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    context = "the city of the river is the"
    with torch.no_grad():
        top = model(input_ids=torch.tensor([tok(context)["input_ids"]])).logits[0, -1].argsort(descending=True)
    words = [w for w in (tok.decode([int(t)]) for t in top) if w.isalpha() and w in tok.get_vocab()]
    root = write_fixtures(tmp_path)
    _jsonl(root / "lambada/lambada_test.jsonl", [{"text": f"{context} {words[0]}"}, {"text": f"{context} {words[1]}"}])
    docs = read_benchmark(BENCHMARKS["lambada"], root)
    out = score_benchmark(model, tok, BENCHMARKS["lambada"], docs, details=True)
    assert [r["greedy"] for r in out["docs"]] == [[True], [False]] and out["acc"] == 0.5


def test_subsample_is_seeded_and_mmlu_stratified(tmp_path):
    root = write_fixtures(tmp_path, n=10)
    mmlu = read_benchmark(BENCHMARKS["mmlu"], root)
    picked = subsample(mmlu, 7, seed=3)
    assert picked == subsample(mmlu, 7, seed=3) and picked != subsample(mmlu, 7, seed=4)
    counts = Counter(d.group for d in picked)
    assert sorted(counts.values()) == [2, 2, 3]  # 7 // 3 each, the one left over to a seeded subject
    assert [d.key for d in picked] == sorted(d.key for d in picked)  # file order kept
    arc = read_benchmark(BENCHMARKS["arc_easy"], root)
    assert len(subsample(arc, 4, 0)) == 4 and subsample(arc, 99, 0) == arc
    suite = load_suite(["mmlu", "arc_easy"], root, {"mmlu": 6}, seed=0)
    assert Counter(d.group for d in suite["mmlu"]) == {"anatomy": 2, "virology": 2, "world_religions": 2}
    assert len(suite["arc_easy"]) == 10


def test_missing_files_and_bad_rows_are_clear_errors(tmp_path):
    root = write_fixtures(tmp_path)
    (root / "lambada/lambada_test.jsonl").unlink()
    with pytest.raises(GeReError, match=r"lambada_test.jsonl does not exist.*general_suite_dir"):
        read_benchmark(BENCHMARKS["lambada"], root)
    with pytest.raises(GeReError, match="is not a folder"):
        read_benchmark(BENCHMARKS["arc_easy"], root / "nowhere")
    with pytest.raises(GeReError, match="not a benchmark of the suite"):
        load_suite(["hellaswag"], root, {}, 0)
    (root / "piqa/valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(GeReError, match="2 labels for the 4 rows"):
        read_benchmark(BENCHMARKS["piqa"], root)
    _jsonl(root / "arc_easy/ARC-Easy-Test.jsonl", [_labelled(0, ["a", "b"], "Z")])
    with pytest.raises(GeReError, match=r"row 1: answerKey 'Z' is none of the labels"):
        read_benchmark(BENCHMARKS["arc_easy"], root)
    _jsonl(root / "openbookqa/test.jsonl", [{"id": "x", "answerKey": "A"}])
    with pytest.raises(GeReError, match=r"line 1: missing field\(s\) \['question'\]"):
        read_benchmark(BENCHMARKS["openbookqa"], root)
    (root / "mmlu/test/anatomy_test.csv").write_text("q,one,two,three,four,E\n")
    with pytest.raises(GeReError, match="anatomy_test.csv, row 1: expected 6 fields"):
        read_benchmark(BENCHMARKS["mmlu"], root)


def test_suite_score_is_the_mean_of_the_benchmarks_scores(tmp_path):
    root = write_fixtures(tmp_path)
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    out = evaluate_suite(model, tok, load_suite(ALL, root, {}, 0))
    scores = [out["suite"][name]["score"] for name in ALL]
    assert out["suite_score"] == pytest.approx(sum(scores) / len(ALL))
    assert out["suite"]["arc_easy"]["score"] == out["suite"]["arc_easy"]["acc_norm"]
    assert out["suite"]["mmlu"]["score"] == out["suite"]["mmlu"]["acc"]
    ses = [out["suite"][name]["score_stderr"] for name in ALL]
    assert out["suite_stderr"] == pytest.approx(math.sqrt(sum(s * s for s in ses)) / len(ALL))


def test_a_run_with_the_suite_scores_it_every_stage_and_takes_its_mean_as_the_general_score(setup, tmp_path):
    data = write_fixtures(tmp_path / "general")
    results = run(setup, tmp_path / "r", "evaluation.general=suite", f"evaluation.general_suite_dir={data}",
                  "evaluation.general_suite=[arc_easy, mmlu, lambada]", "evaluation.general_suite_limits={mmlu: 6}")
    entries = results["general"]
    assert len(entries) == 3 and all(list(e["suite"]) == ["arc_easy", "mmlu", "lambada"] for e in entries)
    assert [e["suite"]["mmlu"]["n"] for e in entries] == [6, 6, 6]  # 2 of each of the 3 subjects, every stage
    assert entries[0]["suite"]["arc_easy"]["n"] == 4
    assert results["metrics"]["general_scores"] == [e["suite_score"] for e in entries]
    assert results["metrics"]["general_final"] == entries[-1]["suite_score"]
    assert entries[-1]["mc_accuracy"] is not None  # the probe is still measured beside it, not scored
    report = (tmp_path / "r" / "report.md").read_text()
    assert "suite mean (%)" in report and "mmlu acc on 6" in report
    digests = json.loads((tmp_path / "r" / "run_state.json").read_text())["inputs"]
    assert str(data / "mmlu" / "test" / "virology_test.csv") in digests  # a resume sees a changed suite file
    assert not any("piqa" in k for k in digests)  # only the benchmarks the run reads
    mc_run = run(setup, tmp_path / "mc")
    compare_runs([tmp_path / "r", tmp_path / "mc"], tmp_path / "cmp")
    note = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "general scores come from different sources" in note and "suite: arc_easy (4), lambada (4), mmlu (6)" in note
    assert mc_run["metrics"]["general_final"] == mc_run["general"][-1]["mc_accuracy"]


@pytest.mark.parametrize("overrides,message", [
    (["evaluation.general_suite=[arc_easy]"], "read only with general: suite"),
    (["evaluation.general=suite", "evaluation.general_suite=[arc]"], "'arc' is not a benchmark of the suite"),
    (["evaluation.general=suite", "evaluation.general_suite=[piqa, piqa]"], "each benchmark once"),
    (["evaluation.general=suite", "evaluation.general_suite=[piqa]", "evaluation.general_suite_limits={mmlu: 5}"],
     "general_suite_limits.mmlu"),
])  # fmt: skip
def test_suite_settings_that_cannot_work_are_refused_when_the_config_is_read(setup, overrides, message):
    with pytest.raises(GeReError, match=message):
        load_run_config(setup / "run.yaml", overrides)


def test_a_missing_suite_file_stops_the_run_before_any_work(setup, tmp_path):
    with pytest.raises(GeReError, match="general_suite_dir .*none is not a folder"):
        run(setup, tmp_path / "r", "evaluation.general=suite", f"evaluation.general_suite_dir={tmp_path / 'none'}",
            "evaluation.general_suite=[piqa]")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GeReError, match="piqa"):
        run(setup, tmp_path / "r", "evaluation.general=suite", f"evaluation.general_suite_dir={tmp_path / 'empty'}",
            "evaluation.general_suite=[piqa]")
    assert not (tmp_path / "r" / "gere_store").exists()


def test_lm_eval_itself_scores_the_suite_as_gere_does(tmp_path):
    """benchmarks/general_suite_vs_lm_eval.py on a tiny Llama: lm-eval 0.4.13, reading the same rows through
    its own task configs (converted from the released files by the script), builds the same contexts,
    continuations and golds and finds the same log-likelihoods and picks, question by question."""
    pytest.importorskip("lm_eval")
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "general_suite_vs_lm_eval", Path(__file__).resolve().parent.parent / "benchmarks" / "general_suite_vs_lm_eval.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    data = write_fixtures(tmp_path / "data", n=4)
    suite = load_suite(ALL, data, {}, seed=0)
    rows, reported, _ = script.measure(tiny_llama(), tiny_tokenizer(), data, suite, tmp_path / "tasks", batch_size=3)
    assert set(rows) == set(ALL) and sorted(reported) == sorted(ALL)
    for name, row in rows.items():
        assert row["n"] == len(suite[name]) and row["diff"]["missing"] == 0, name
        assert {k: v for k, v in row["diff"].items() if v} == {}, (name, row["diff"])
        assert row["max_abs_ll"] < 1e-4, name
        assert row["lm_eval"]["acc"] == pytest.approx(row["gere"]["acc"]), name
    assert (tmp_path / "tasks" / "gere_check_mmlu_virology.yaml").is_file()  # one lm-eval task per MMLU subject
