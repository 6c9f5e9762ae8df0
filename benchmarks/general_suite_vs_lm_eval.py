"""Does gere's general suite score as lm-evaluation-harness scores? The same questions, question by question.

For a model folder and a folder of the benchmarks' released files, a seeded subsample of N questions per
benchmark (gere's own `subsample`, MMLU stratified by subject) is scored twice:

* by gere: `gere.continual.general_suite.score_benchmark` on the docs `read_benchmark` makes;
* by lm-eval itself (``lm_eval.simple_evaluate`` with ``HFLM`` wrapping the same loaded model,
  ``log_samples=True``) on local task YAMLs that ``include`` lm-eval's own task configs (``arc_easy``,
  ``piqa``, ``openbookqa``, ``commonsense_qa``, ``mmlu_<subject>``, ``lambada_openai``) and replace only
  where the rows come from: ``dataset_path: json`` with ``dataset_kwargs.data_files`` naming a JSON Lines
  file of the same rows, converted here from the released format to the fields of the Hugging Face copy
  each lm-eval config reads (``question``/``choices``/``answerKey`` for ARC, ``question_stem`` for
  OpenBookQA, ``goal``/``sol1``/``sol2``/``label`` for PIQA, ``question``/``choices``/``answer`` for MMLU,
  ``text`` for LAMBADA). The conversion reads the released files itself, not through gere's readers.

Per benchmark it prints both scores, the questions whose contexts or continuations differ as strings, the
questions whose pick differs (acc and acc_norm; LAMBADA: the greedy flag), the largest absolute difference
of a per-choice log-likelihood and the longest sequence scored, then the command. A differing pick where
either scorer's best two choices are within `TIE` is counted as a near-tie (float rounding decides it).

lm-eval's ``HFLM`` reuses one forward pass for every request whose ``context + continuation[:-1]`` tokens
are equal (its ``logits_cache``, on by default) and reads each request's log-likelihood at the first
positions of that pass: exact when the requests also split context and continuation at the same token, off
when they do not (one question's context is another's context plus part of its choice). With a real
tokenizer that needs two questions of the same tokens; with the tests' word-level tokenizer, where most
benchmark words are ``<unk>``, it happens (an OpenBookQA question scored after the wrong context, 6.9e-3
off). ``--no-logits-cache`` scores every request on its own. Run from the repository root::

    .venv/bin/python benchmarks/general_suite_vs_lm_eval.py --model data/demo/model --n 100
    .venv/bin/python benchmarks/general_suite_vs_lm_eval.py --model runs/x/stages/1 --data-dir data/general

The table goes into ``benchmarks/RESULTS.md`` (section ``general-vs-lm-eval-<label>``) unless
``--no-write``; ``--keep DIR`` keeps the task YAMLs and converted rows (run them with ``lm_eval --tasks
gere_check_arc_easy --include_path DIR``) and writes ``DIR/questions.json``, every question's numbers.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import HERE, command_line, made_by, write_results  # noqa: E402

from gere.continual.general_benchmarks import BENCHMARKS, TARGET_DELIMITER  # noqa: E402
from gere.continual.general_suite import Doc, read_benchmark, score_benchmark, subsample  # noqa: E402

#: gere's benchmark name -> (lm-eval task config, relative to lm_eval/tasks; the split lm-eval evaluates on).
LM_EVAL_TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "piqa": ("piqa/piqa.yaml", "validation"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test"),
    "commonsenseqa": ("commonsense_qa/default.yaml", "validation"),
    "mmlu": ("mmlu/default/mmlu_{subject}.yaml", "test"),
    "lambada": ("lambada/lambada_openai.yaml", "test"),
}
SPLITS = ("training_split", "validation_split", "test_split", "fewshot_split")


def _jsonl_rows(path: Path) -> list[dict]:
    """The non-blank lines of a released JSON Lines file, in order (the row numbers gere's keys count)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip(" \t\r")]


def _labelled(row: dict) -> tuple[str, dict]:
    """The question text and the Hugging Face ``choices`` dict of a released ARC / OpenBookQA / CSQA row."""
    q = row["question"]
    return q["stem"], {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}


def released_rows(name: str, data_dir: Path, key: tuple[str, int]) -> dict:
    """The row at `key` (released file, 0-based row) of benchmark `name`, in the fields lm-eval's config reads."""
    rel, i = key
    path = data_dir / rel
    cache = _FILES.setdefault(str(path), {})
    if not cache:
        if name == "mmlu":
            text = path.read_text(encoding="utf-8")
            cache["rows"] = [v for v in csv.reader(io.StringIO(text, newline="")) if v]
        else:
            cache["rows"] = _jsonl_rows(path)
        if name == "piqa":
            labels = (data_dir / "piqa/valid-labels.lst").read_text().split()
            cache["rows"] = [{**r, "label": int(x)} for r, x in zip(cache["rows"], labels, strict=True)]
    row = cache["rows"][i]
    if name == "arc_easy":
        stem, choices = _labelled(row)
        out = {"id": row["id"], "question": stem, "choices": choices, "answerKey": row["answerKey"]}
    elif name == "openbookqa":
        stem, choices = _labelled(row)
        out = {"id": row["id"], "question_stem": stem, "choices": choices, "answerKey": row["answerKey"]}
    elif name == "commonsenseqa":
        stem, choices = _labelled(row)
        out = {"id": row["id"], "question": stem, "question_concept": row["question"].get("question_concept", ""),
               "choices": choices, "answerKey": row["answerKey"]}  # fmt: skip
    elif name == "piqa":
        out = {"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": row["label"]}
    elif name == "mmlu":
        subject = Path(rel).name[: -len("_test.csv")]
        out = {"question": row[0], "subject": subject, "choices": row[1:5], "answer": "ABCD".index(row[5])}
    else:
        out = {"text": row["text"]}
    return {**out, "gere_file": rel, "gere_row": i}


_FILES: dict[str, dict] = {}


def write_tasks(folder: Path, data_dir: Path, suite: dict[str, list[Doc]]) -> dict[str, list[str]]:
    """Converted rows and task YAMLs for `suite` under `folder`; gere's name -> the lm-eval tasks it became."""
    import lm_eval

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    made: dict[str, list[str]] = {}
    for name, docs in suite.items():
        config, split = LM_EVAL_TASKS[name]
        groups = sorted({d.group for d in docs}) if name == "mmlu" else [""]
        for group in groups:
            task = f"gere_check_{name}" + (f"_{group}" if group else "")
            rows = [released_rows(name, data_dir, d.key) for d in docs if d.group == group]
            data = folder / f"{task}.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            spec = {
                "include": str(tasks_dir / config.format(subject=group)),
                "task": task,
                "tag": ["gere_check_mmlu_tasks"] if group else [],
                "dataset_path": "json",
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {split: str(data)}},
                **{s: None for s in SPLITS},
                f"{split}_split": split,
            }
            (folder / f"{task}.yaml").write_text(json.dumps(spec, indent=1), encoding="utf-8")  # JSON is YAML
            made.setdefault(name, []).append(task)
    return made


def run_lm_eval(model, tokenizer, folder: Path, tasks: list[str], batch_size: int, max_length: int,
                logits_cache: bool = True) -> dict:  # fmt: skip
    """lm-eval's results and logged samples for `tasks` (defined by the YAMLs in `folder`) on `model`."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              logits_cache=logits_cache)  # fmt: skip
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(folder)),
                                   num_fewshot=0, log_samples=True, bootstrap_iters=0)  # fmt: skip


def _pairs(sample: dict) -> list[tuple[str, str]]:
    """The (context, continuation) strings lm-eval scored for one logged sample."""
    args = sample["arguments"]
    if isinstance(args, dict):  # {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}
        args = [tuple(v.values()) for _, v in sorted(args.items(), key=lambda kv: int(kv[0].split("_")[-1]))]
    return [(a[0], a[1]) for a in args]


def _lls(sample: dict) -> list[tuple[float, bool]]:
    """Per-choice (log-likelihood, greedy) of one logged sample."""
    out = []
    for resp in sample["filtered_resps"]:
        ll, greedy = resp if not isinstance(resp[0], (list, tuple)) else resp[0]
        out.append((float(ll), bool(greedy)))
    return out


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda k: (values[k], -k))


#: Two choices closer than this (nats, or nats per character) are a tie that float rounding may break either way.
TIE = 1e-4


def _near_tie(*scores: list[float]) -> bool:
    """Whether the best two of any of `scores` are within `TIE` (a pick that rounding alone can flip)."""
    return any(len(v) > 1 and sorted(v)[-1] - sorted(v)[-2] < TIE for v in scores)


def _gold(target, choices: list[str]) -> int:
    """lm-eval's logged target as a choice index (an index, its digits, or a choice's text such as 'C')."""
    if isinstance(target, str) and not target.strip().isdigit():
        return choices.index(target) if target in choices else 0  # LAMBADA: the target is the word itself
    return int(target)


def compare(name: str, docs: list[Doc], gere: dict, samples: list[dict], tokenizer) -> dict:
    """Both scores of one benchmark and where they differ, question by question."""
    by_key = {(s["doc"]["gere_file"], int(s["doc"]["gere_row"])): s for s in samples}
    multiple = BENCHMARKS[name].scoring == "multiple_choice"
    diff = {"context": 0, "continuation": 0, "gold": 0, "pred": 0, "pred_norm": 0, "ties": 0, "greedy": 0,
            "missing": 0}  # fmt: skip
    max_ll, longest, lm = 0.0, 0, {"acc": [], "acc_norm": [], "ll": []}
    questions = []
    for doc, mine in zip(docs, gere["docs"], strict=True):
        sample = by_key.get(tuple(doc.key))
        if sample is None:
            diff["missing"] += 1
            continue
        pairs, scored = _pairs(sample), _lls(sample)
        diff["context"] += any(c != doc.context for c, _ in pairs)
        diff["continuation"] += [c for _, c in pairs] != [TARGET_DELIMITER + c for c in doc.choices]
        theirs = [ll for ll, _ in scored]
        max_ll = max(max_ll, *(abs(a - b) for a, b in zip(theirs, mine["ll"], strict=True)))
        longest = max(longest, *(len(tokenizer(c + x)["input_ids"]) for c, x in pairs))
        pred = _argmax(theirs)
        pred_norm = _argmax([ll / len(c) for ll, c in zip(theirs, doc.choices, strict=True)])
        diff["gold"] += _gold(sample["target"], doc.choices) != doc.gold
        if multiple:
            diff["pred"] += pred != mine["pred"]
            diff["pred_norm"] += pred_norm != mine["pred_norm"]
            norms = [[ll / len(c) for ll, c in zip(v, doc.choices, strict=True)] for v in (theirs, mine["ll"])]
            diff["ties"] += (pred != mine["pred"] and _near_tie(theirs, mine["ll"])) + (
                pred_norm != mine["pred_norm"] and _near_tie(*norms))  # fmt: skip
            lm["acc"].append(float(sample["acc"]))
            # CommonsenseQA's and MMLU's lm-eval configs list acc only: acc_norm from lm-eval's own lls here
            gold = _gold(sample["target"], doc.choices)
            lm["acc_norm"].append(float(sample["acc_norm"]) if "acc_norm" in sample else float(pred_norm == gold))
        else:
            diff["greedy"] += scored[0][1] != mine["greedy"][0]
            lm["acc"].append(float(sample["acc"]))
            lm["ll"].append(theirs[0])
        questions.append({"key": doc.key, "gere_ll": mine["ll"], "lm_eval_ll": theirs, "gere_pred": mine["pred"],
                          "lm_eval_pred": pred, "gold": doc.gold})  # fmt: skip
    n = len(lm["acc"])
    theirs = {"acc": sum(lm["acc"]) / n if n else math.nan}
    if multiple:
        theirs["acc_norm"] = sum(lm["acc_norm"]) / n if n else math.nan
    else:
        theirs["perplexity"] = math.exp(-sum(lm["ll"]) / n) if n else math.nan
    return {"n": len(docs), "gere": gere, "lm_eval": theirs, "diff": diff, "max_abs_ll": max_ll,
            "longest": longest, "questions": questions}  # fmt: skip


def table(rows: dict[str, dict], lm_eval_results: dict) -> str:
    lines = ["| benchmark | n | gere acc | gere acc_norm / ppl | lm-eval acc | lm-eval acc_norm / ppl | lm-eval "
             "reported | contexts / continuations / golds differ | picks differ (acc / norm or greedy) | max abs ll diff | longest (tokens) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        g, t, d = r["gere"], r["lm_eval"], r["diff"]
        second = "acc_norm" if "acc_norm" in g else "perplexity"
        fmt = "{:.4f}" if second == "acc_norm" else "{:.3f}"
        reported = lm_eval_results.get(name)
        picks = f"{d['pred']} / {d['pred_norm']}" if second == "acc_norm" else f"{d['greedy']} (greedy)"
        picks += f" ({d['ties']} near-tie)" if d["ties"] else ""
        missing = f" ({d['missing']} missing)" if d["missing"] else ""
        lines.append(
            f"| {name} | {r['n']}{missing} | {g['acc']:.4f} ± {g['acc_stderr']:.4f} | {fmt.format(g[second])} | "
            f"{t['acc']:.4f} | {fmt.format(t[second])} | {reported} | {d['context']} / {d['continuation']} / {d['gold']} | "
            f"{picks} | {r['max_abs_ll']:.2e} | {r['longest']} |"
        )
    return "\n".join(lines)


def _reported(name: str, tasks: list[str], out: dict) -> str:
    """lm-eval's own aggregate for the benchmark (its ``results`` table; MMLU: the group's size-weighted acc)."""
    results = out["results"]
    if name == "mmlu":
        pairs = [(results[t]["acc,none"], len(out["samples"][t])) for t in tasks]
        return f"acc {sum(a * k for a, k in pairs) / sum(k for _, k in pairs):.4f} (size-weighted)"
    row = results[tasks[0]]
    return ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in row.items()
                     if k.endswith(",none") and "stderr" not in k and isinstance(v, float))  # fmt: skip


def measure(model, tokenizer, data_dir: Path, suite: dict[str, list[Doc]], keep: Path | None = None,
            batch_size: int = 16, max_length: int = 2048, logits_cache: bool = True):  # fmt: skip
    """Both scorers on `suite` (benchmark -> docs): ``(rows, lm-eval's reported scores, (gere s, lm-eval s))``,
    a row per benchmark as `compare` makes it; task YAMLs and rows go to `keep` (else a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="gere-vs-lm-eval-") as tmp:
        folder = keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        made = write_tasks(folder, data_dir, suite)
        start = time.perf_counter()
        gere = {b: score_benchmark(model, tokenizer, BENCHMARKS[b], docs, batch_size, max_length, details=True)
                for b, docs in suite.items()}  # fmt: skip
        gere_s = time.perf_counter() - start
        start = time.perf_counter()
        out = run_lm_eval(model, tokenizer, folder, [t for ts in made.values() for t in ts], batch_size,
                          max_length, logits_cache)  # fmt: skip
        lm_s = time.perf_counter() - start
    rows = {b: compare(b, docs, gere[b], [s for t in made[b] for s in out["samples"][t]], tokenizer)
            for b, docs in suite.items()}  # fmt: skip
    return rows, {b: _reported(b, made[b], out) for b in suite}, (gere_s, lm_s)


def train_briefly(model, tokenizer, texts_path: str, steps: int, lr: float = 1e-4, batch: int = 4) -> None:
    """`steps` AdamW steps of full fine-tuning (causal LM loss, fp32) on the first texts of a JSON Lines file
    of ``{"text"}``, so a checkpoint that differs from the released weights is checked too."""
    texts = [json.loads(line)["text"] for line in Path(texts_path).read_text().splitlines() if line.strip()]
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        rows = texts[step * batch : (step + 1) * batch]
        enc = tokenizer(rows, return_tensors="pt", padding=True, truncation=True, max_length=64)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"train step {step + 1}/{steps}: loss {loss.item():.4f}")
    model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder (config.json and weights, its tokenizer)")
    parser.add_argument("--data-dir", default="data/general", help="the benchmarks' released files")
    parser.add_argument("--n", type=int, default=100, help="questions per benchmark (seeded subsample; 0: all)")
    parser.add_argument("--seed", type=int, default=0, help="the subsample's seed")
    parser.add_argument("--benchmarks", default=",".join(BENCHMARKS), help="comma-separated suite names")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=2048, help="both scorers' sequence limit (tokens)")
    parser.add_argument("--no-logits-cache", action="store_true",
                        help="HFLM(logits_cache=False): lm-eval scores every request on its own")  # fmt: skip
    parser.add_argument("--train-steps", type=int, default=0,
                        help="first fine-tune the model this many AdamW steps (lr 1e-4, 4 texts of 64 tokens)")
    parser.add_argument("--train-texts", default=None, help="JSON Lines of {'text'} for --train-steps")
    parser.add_argument("--label", default=None, help="RESULTS.md section suffix (default: the model folder's name)")
    parser.add_argument("--keep", default=None, help="keep the task YAMLs, rows and questions.json in this folder")
    parser.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/RESULTS.md alone")
    args = parser.parse_args(argv)
    command = command_line(__file__, argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = [b for b in args.benchmarks.split(",") if b]
    unknown = [b for b in names if b not in BENCHMARKS]
    if unknown:
        parser.error(f"--benchmarks: {unknown} are not benchmarks of the suite; use some of {list(BENCHMARKS)}")
    data_dir = Path(args.data_dir).expanduser().resolve()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.train_steps:
        if not args.train_texts:
            parser.error("--train-steps needs --train-texts (a JSON Lines file of {'text'})")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        train_briefly(model, tokenizer, args.train_texts, args.train_steps)
    suite = {b: subsample(read_benchmark(BENCHMARKS[b], data_dir), args.n or None, args.seed) for b in names}
    keep = Path(args.keep) if args.keep else None
    rows, reported, (gere_s, lm_s) = measure(model, tokenizer, data_dir, suite, keep, args.batch_size,
                                             args.max_length, not args.no_logits_cache)  # fmt: skip
    text = table(rows, reported)
    note = f" gere {gere_s:.0f} s, lm-eval {lm_s:.0f} s for the {sum(len(d) for d in suite.values())} questions."
    section_head = f"## General suite against lm-eval {metadata.version('lm_eval')}: {args.model}"
    section = f"{section_head}\n\n{made_by(command, note)}\n\n{text}\n"
    print(section)
    if keep:
        (keep / "questions.json").write_text(json.dumps({b: r["questions"] for b, r in rows.items()}, indent=1))
    if not args.no_write:
        label = args.label or Path(args.model).resolve().name
        write_results(HERE / "RESULTS.md", f"general-vs-lm-eval-{label}", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
