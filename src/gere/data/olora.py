"""``gere data cl15 --from-olora``: O-LoRA's ``CL_Benchmark`` files as O-LoRA ships them, into gere's layout.

O-LoRA (Wang et al. 2023, github.com/cmnfriend/O-LoRA) releases the 15 tasks the paper trains on as
``CL_Benchmark/<group>/<Dataset>/{train,dev,test}.json`` with ``labels.json`` beside them: the groups are
``NLI`` (``MNLI``, ``CB``, ``RTE``), ``SC`` (``IMDB``, ``SST-2``, ``amazon``, ``yelp``), ``TC``
(``agnews``, ``dbpedia``, ``yahoo``) and one group per remaining task (``QQP/QQP``, ``BoolQA/BoolQA``,
``MultiRC/MultiRC``, ``WiC/WiC``, ``COPA/COPA``). Each split is a plain JSON list of ``{"sentence",
"label"}`` whose label is one of the words in ``labels.json``. Its ``dev.json`` holds the same examples
as ``test.json``, so only ``train`` and ``test`` are converted (see docs/benchmark_cl15.md, "never
select on test").

Each row becomes ``{"input": sentence, "label": word}`` with the label spelled as gere's benchmark
definition spells it (``src/gere/benchmarks/cl15.yaml``; compared without case, so O-LoRA's "Mean of
Transportation" is dbpedia's "Mean Of Transportation"). A row without a gold label (``"-"``, as 131 rows
of MNLI's test split are released, an empty label or ``null``) is left out and counted per task and split in
``manifest.json`` (``without_gold_label``) and in the log; any other label that is not a label word is a
problem. Every file is read before anything is written, every problem of every file is listed in one error
(with the ``--tasks`` that would convert the tasks that are complete), and nothing is written while there
is one (`gere.data.staging`). With O-LoRA's instruction file (`gere.data.olora_prompts`) each task's O-LoRA
prompt is recorded beside its data, for ``benchmark.prompts: olora``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gere.continual.tasks import load_benchmark_definition
from gere.data.olora_prompts import INSTRUCTION_FILE, RECORD, prompt_record, read_instructions
from gere.data.staging import MANIFEST, StagedConversion
from gere.errors import GeReError, check_task_names, shown
from gere.io_utils import read_utf8
from gere.reading import parse_json, read_json

logger = logging.getLogger(__name__)

# gere's task name -> (O-LoRA's group folder, O-LoRA's dataset folder).
OLORA_FOLDERS: dict[str, tuple[str, str]] = {
    "mnli": ("NLI", "MNLI"), "cb": ("NLI", "CB"), "rte": ("NLI", "RTE"),
    "qqp": ("QQP", "QQP"), "boolq": ("BoolQA", "BoolQA"), "multirc": ("MultiRC", "MultiRC"),
    "wic": ("WiC", "WiC"), "copa": ("COPA", "COPA"),
    "imdb": ("SC", "IMDB"), "sst2": ("SC", "SST-2"), "yelp": ("SC", "yelp"), "amazon": ("SC", "amazon"),
    "agnews": ("TC", "agnews"), "dbpedia": ("TC", "dbpedia"), "yahoo": ("TC", "yahoo"),
}  # fmt: skip
SPLITS = ("train", "test")
#: A label (stripped) that marks a row released without a gold label; JSON null counts too.
NO_GOLD_LABEL = ("-", "")
SHOWN_ROWS, SHOWN_KINDS = 5, 3  # per file: row numbers shown per kind of problem, kinds shown
MESSAGE_LIMIT = 1150  # characters of the error (GeReError keeps 1,200); problems past it are counted and logged


@dataclass
class TaskFiles:
    """One task read from O-LoRA's folder: its rows per split, the rows left out per split, its O-LoRA prompt
    record, and every problem found (each naming the file, the rows and the fix)."""

    folder: Path | None
    splits: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    without_gold_label: dict[str, int] = field(default_factory=dict)
    record: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)


def from_olora(benchmark_dir: str | Path, out: str | Path, tasks: list[str] | None = None,
               instructions: str | Path | None = None) -> Path:  # fmt: skip
    """Convert O-LoRA's ``CL_Benchmark`` (or the repository holding it) into ``out/<task>/{train,test}.json``
    and ``out/manifest.json``, keeping its exact samples; ``tasks``: only these (gere's names).

    ``instructions``: O-LoRA's ``configs/instruction_config.json`` (or the repository folder holding it);
    found by itself when ``benchmark_dir`` is that repository. With it, ``out/<task>/olora_prompt.json``
    records each task's O-LoRA prompt. Raises `GeReError` listing every problem, writing nothing.
    """
    root = _benchmark_root(Path(benchmark_dir))
    definition = load_benchmark_definition("cl15")["tasks"]
    wanted = check_task_names(tasks, list(definition))
    instruction_file, general = _instruction_file(Path(benchmark_dir), instructions)
    texts = {}
    if instruction_file is not None:
        texts, general = read_instructions(instruction_file)
    read = {task: read_task(root, task, definition[task]["labels"], texts, instruction_file) for task in wanted}
    refuse_problems(root, general, read)
    if instruction_file is None:
        logger.warning("no O-LoRA instruction file given: the data converts, but benchmark.prompts: olora will "
                       "refuse it; pass --olora-instructions FILE (O-LoRA's %s) to record its prompts", INSTRUCTION_FILE)  # fmt: skip
    with StagedConversion(out) as staged:
        for task, files in read.items():
            documents = {RECORD: files.record} if files.record is not None else {}
            staged.write_task(task, files.splits, documents=documents, source=str(files.folder),
                              origin="O-LoRA CL_Benchmark", without_gold_label=files.without_gold_label)  # fmt: skip
            _log_task(root, task, files)
        return staged.commit(benchmark="cl15")


def _benchmark_root(path: Path) -> Path:
    if not path.is_dir():
        raise GeReError(f"--from-olora {path} is not a folder; pass O-LoRA's CL_Benchmark folder")
    return path / "CL_Benchmark" if (path / "CL_Benchmark").is_dir() else path


def _instruction_file(given_dir: Path, given: str | Path | None) -> tuple[Path | None, list[str]]:
    """The instruction file to read (the one given, or O-LoRA's own when ``given_dir`` is its repository),
    and a problem when the one given is not there."""
    if given is None:
        found = given_dir / INSTRUCTION_FILE
        return (found, []) if found.is_file() else (None, [])
    path = Path(given)
    path = path / INSTRUCTION_FILE if path.is_dir() else path
    if not path.is_file():
        return None, [f"--olora-instructions {given}: {path} does not exist; pass O-LoRA's configs/instruction_config.json "
                      "(or the O-LoRA repository folder that holds it)"]  # fmt: skip
    return path, []


def read_task(root: Path, task: str, words: list[str], instructions: dict[str, str],
              instruction_file: Path | None) -> TaskFiles:  # fmt: skip
    """Every file of ``task`` in O-LoRA's folder read and checked; problems are collected, not raised."""
    group, dataset = OLORA_FOLDERS[task]
    folder, problem = _task_folder(root, task)
    if folder is None:
        return TaskFiles(None, problems=[problem])
    files = TaskFiles(folder)
    options = _labels_file(root, folder / "labels.json", task, words, files.problems, needed=instruction_file is not None)
    missing = [f"{split}.json" for split in SPLITS if not (folder / f"{split}.json").is_file()]
    if missing:
        files.problems.append(f"{_shown_path(root, folder)} has no {' and no '.join(missing)}; copy "
                              f"{'it' if len(missing) == 1 else 'them'} from O-LoRA's CL_Benchmark, or leave {task} out "
                              "with --tasks")  # fmt: skip
    for split in SPLITS:
        path = folder / f"{split}.json"
        rows, left_out, problems = split_rows(path, words, _shown_path(root, path)) if path.is_file() else ([], 0, [])
        files.splits[split], files.without_gold_label[split] = rows, left_out
        files.problems += problems
    if instruction_file is not None and options is not None:
        try:
            files.record = prompt_record(group, dataset, options, instructions, str(instruction_file))
        except GeReError as err:
            files.problems.append(str(err))
    return files


def _task_folder(root: Path, task: str) -> tuple[Path | None, str]:
    """O-LoRA's folder of ``task``: ``<group>/<Dataset>`` as O-LoRA names them; a folder named as gere names
    the task, or differing only in case, is accepted too when it holds a split file."""
    group, dataset = OLORA_FOLDERS[task]
    exact = root / group / dataset
    if exact.is_dir():
        return exact, ""
    names = {dataset.lower(), task}
    candidates = [p.parent for s in SPLITS for p in (*root.glob(f"*/*/{s}.json"), *root.glob(f"*/{s}.json"))]
    found = sorted({p for p in candidates if p.name.lower() in names})
    if len(found) > 1:
        return None, f"{task} is there twice ({', '.join(_shown_path(root, p) for p in found)}); keep one of them"
    if not found:
        return None, (f"{group}/{dataset} does not exist (O-LoRA's folder of {task}); copy it from O-LoRA's "
                      f"CL_Benchmark, or leave {task} out with --tasks")  # fmt: skip
    return found[0], ""


def _labels_file(root: Path, path: Path, task: str, words: list[str], problems: list[str], needed: bool) -> list[str] | None:
    """O-LoRA's ``labels.json`` (its options, in its order), checked against the task's label words; a
    missing one is a problem only when the O-LoRA prompt needs it."""
    where = _shown_path(root, path)
    if not path.exists():
        if needed:
            problems.append(f"{where} does not exist, and O-LoRA's prompt lists its options; copy it from O-LoRA's "
                            "CL_Benchmark")  # fmt: skip
        return None
    try:
        labels = read_json(path, what="O-LoRA labels file", kind="data")
    except GeReError as err:
        problems.append(str(err))
        return None
    if not isinstance(labels, list) or sorted(str(w).lower() for w in labels) != sorted(w.lower() for w in words):
        problems.append(f"{where} lists the labels {shown(labels, 200)}, but cl15's {task} has {words}; is this "
                        f"O-LoRA's {task} folder? (pass O-LoRA's CL_Benchmark as released)")  # fmt: skip
        return None
    return [str(w) for w in labels]


def split_rows(path: Path, words: list[str], where: str) -> tuple[list[dict[str, str]], int, list[str]]:
    """The ``{"input", "label"}`` rows of one O-LoRA split file (a JSON list of ``{"sentence", "label"}``),
    how many rows it holds without a gold label (left out), and its problems (bad rows grouped by kind)."""
    if not path.is_file():
        return [], 0, [f"{where} does not exist; copy it from O-LoRA's CL_Benchmark"]
    try:
        data = parse_json(read_utf8(path, "O-LoRA split file"), where, "copy the file again from O-LoRA's release")
    except GeReError as err:
        return [], 0, [str(err)]
    if not isinstance(data, list):
        return [], 0, [f"{where}: expected a JSON list of objects {{'sentence', 'label'}}, got {type(data).__name__}; "
                       "pass O-LoRA's file as released"]  # fmt: skip
    lowered = {w.lower(): w for w in words}
    rows, left_out, bad = [], 0, defaultdict(list)
    for number, item in enumerate(data, start=1):
        what = _row_problem(item, lowered, words)
        if what is None:
            rows.append({"input": item["sentence"], "label": lowered[str(item["label"]).strip().lower()]})
        elif what == NO_GOLD_LABEL:
            left_out += 1
        else:
            bad[what].append(number)
    problems = [f"{where}, {_items(numbers)}: {what}; fix or remove {'that row' if len(numbers) == 1 else 'those rows'}"
                for what, numbers in list(bad.items())[:SHOWN_KINDS]]  # fmt: skip
    if len(bad) > SHOWN_KINDS:
        problems.append(f"{where}: {sum(map(len, list(bad.values())[SHOWN_KINDS:]))} more rows with "
                        f"{len(bad) - SHOWN_KINDS} other kinds of problem; fix those above and run again")  # fmt: skip
    if not rows and not bad:
        problems.append(f"{where} holds no labelled rows; O-LoRA's files hold a JSON list of {{'sentence', 'label'}}")
    return rows, left_out, problems


def _row_problem(item: Any, lowered: dict[str, str], words: list[str]) -> str | tuple | None:
    """None for a good row, `NO_GOLD_LABEL` for a row without a gold label, else what is wrong with it."""
    if not isinstance(item, dict):
        return f"expected a JSON object {{'sentence', 'label'}}, got {type(item).__name__}"
    sentence = item.get("sentence")
    if not isinstance(sentence, str):
        return f"'sentence' is {'missing' if sentence is None else type(sentence).__name__}, not text"
    if "label" not in item:
        return "the row has no 'label'"
    label = item["label"]
    if label is None or (isinstance(label, str) and label.strip() in NO_GOLD_LABEL):
        return NO_GOLD_LABEL
    if isinstance(label, str | int | float) and not isinstance(label, bool) and str(label).strip().lower() in lowered:
        return None
    return f"label {shown(label, 60)} is not one of {shown(words, 200)}"


def _items(numbers: list[int]) -> str:
    shown_numbers = ", ".join(map(str, numbers[:SHOWN_ROWS]))
    more = f" (and {len(numbers) - SHOWN_ROWS} more)" if len(numbers) > SHOWN_ROWS else ""
    return f"item{'s' if len(numbers) > 1 else ''} {shown_numbers}{more}"


def _shown_path(root: Path, path: Path) -> str:
    """A file as the problems name it: relative to the benchmark folder named once at their head."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def refuse_problems(root: Path, general: list[str], read: dict[str, TaskFiles]) -> None:
    """Raise one `GeReError` listing every problem (when they do not all fit its length, the rest are named by
    count and every problem is logged), ending with the ``--tasks`` that would convert the complete tasks."""
    problems = general + [p for files in read.values() for p in files.problems]
    if not problems:
        return
    complete = [task for task, files in read.items() if not files.problems]
    if not complete:
        hint = "No task is complete."
    else:
        after = " once the instruction file is fixed" if general else ""
        some = f"The {len(complete)} complete tasks convert" if len(complete) > 1 else "The complete task converts"
        hint = f"{some}{after} with: --tasks {' '.join(complete)}"
    head = (f"O-LoRA's files in {root} have {len(problems)} problem{'s' if len(problems) > 1 else ''}; nothing was "
            "written. Fix each as it says and run again:")  # fmt: skip
    room = MESSAGE_LIMIT - len(head) - len(hint) - 80  # 80: the line that counts the problems left out
    lines = []
    for problem in problems:
        if len(problem) + 5 > room and lines:
            break
        lines.append(f"  - {problem}")
        room -= len(problem) + 5
    if len(lines) < len(problems):
        for problem in problems:
            logger.error("%s", problem)
        lines.append(f"  - ... and {len(problems) - len(lines)} more (every problem is logged above)")
    raise GeReError("\n".join([head, *lines, hint]))


def _log_task(root: Path, task: str, files: TaskFiles) -> None:
    counts = ", ".join(f"{len(files.splits[s])} {s}" for s in SPLITS)
    logger.info("cl15 %s: %s rows from %s%s", task, counts, files.folder,
                "" if files.record is None else " (O-LoRA prompt recorded)")  # fmt: skip
    for split, count in files.without_gold_label.items():
        if count:
            logger.warning("%s: %d rows without a gold label (e.g. '-') left out; manifest.json counts them under "
                           "%s.without_gold_label", _shown_path(root, files.folder / f"{split}.json"), count, task)  # fmt: skip


def conversion_summary(out: str | Path) -> str:
    """One line per task of ``out/manifest.json``: rows per split, rows left out, whether an O-LoRA prompt
    is recorded."""
    manifest = read_json(Path(out) / MANIFEST, what="conversion manifest")
    lines = []
    for task, entry in manifest["tasks"].items():
        rows = {name.rsplit("/", 1)[-1]: info.get("rows") for name, info in entry["files"].items()}
        left = {s: n for s, n in (entry.get("without_gold_label") or {}).items() if n}
        lines.append(f"  {task}: {rows.get('train.json')} train, {rows.get('test.json')} test"
                     + (f"; left out without a gold label: {left}" if left else "")
                     + ("; O-LoRA prompt recorded" if RECORD in rows else ""))  # fmt: skip
    return "\n".join(lines)
