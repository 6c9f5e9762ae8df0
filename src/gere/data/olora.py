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
Transportation" is dbpedia's "Mean Of Transportation"). Every file is read before anything is written
(`gere.data.staging`), so a truncated or malformed file leaves an earlier conversion as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gere.continual.tasks import load_benchmark_definition
from gere.data.staging import StagedConversion
from gere.errors import GeReError, nearest
from gere.io_utils import iter_rows, read_utf8

# gere's task name -> (O-LoRA's group folder, O-LoRA's dataset folder).
OLORA_FOLDERS: dict[str, tuple[str, str]] = {
    "mnli": ("NLI", "MNLI"), "cb": ("NLI", "CB"), "rte": ("NLI", "RTE"),
    "qqp": ("QQP", "QQP"), "boolq": ("BoolQA", "BoolQA"), "multirc": ("MultiRC", "MultiRC"),
    "wic": ("WiC", "WiC"), "copa": ("COPA", "COPA"),
    "imdb": ("SC", "IMDB"), "sst2": ("SC", "SST-2"), "yelp": ("SC", "yelp"), "amazon": ("SC", "amazon"),
    "agnews": ("TC", "agnews"), "dbpedia": ("TC", "dbpedia"), "yahoo": ("TC", "yahoo"),
}  # fmt: skip
SPLITS = ("train", "test")


def from_olora(benchmark_dir: str | Path, out: str | Path, tasks: list[str] | None = None) -> Path:
    """Convert O-LoRA's ``CL_Benchmark`` (or a folder holding it) into ``out/<task>/{train,test}.json`` and
    ``out/manifest.json``, keeping its exact samples; ``tasks``: only these (gere's names)."""
    root = _benchmark_root(Path(benchmark_dir))
    definition = load_benchmark_definition("cl15")["tasks"]
    wanted = check_task_names(tasks, list(definition))
    folders = {task: _task_folder(root, task) for task in wanted}  # every folder found before any is read
    with StagedConversion(out) as staged:
        for task in wanted:
            words = definition[task]["labels"]
            _check_labels_file(folders[task] / "labels.json", task, words)
            splits = {split: olora_rows(folders[task] / f"{split}.json", words) for split in SPLITS}
            staged.write_task(task, splits, source=str(folders[task]), origin="O-LoRA CL_Benchmark")
        return staged.commit(benchmark="cl15")


def check_task_names(tasks: list[str] | None, known: list[str], benchmark: str = "cl15", flag: str = "--tasks") -> list[str]:
    """``tasks`` (or every known task), refusing unknown and repeated names with the nearest known one."""
    if not tasks:
        return list(known)
    for task in tasks:
        if task not in known:
            raise GeReError(f"{flag}: {benchmark} has no task {task!r}{nearest(task, known)}; choose from "
                            f"{', '.join(known)}")  # fmt: skip
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:
        raise GeReError(f"{flag} names {', '.join(repeated)} more than once; name each task once")
    return list(tasks)


def _benchmark_root(path: Path) -> Path:
    if not path.is_dir():
        raise GeReError(f"--from-olora {path} is not a folder; pass O-LoRA's CL_Benchmark folder")
    return path / "CL_Benchmark" if (path / "CL_Benchmark").is_dir() else path


def _task_folder(root: Path, task: str) -> Path:
    """O-LoRA's folder of ``task``: ``<group>/<Dataset>`` as O-LoRA names them; a folder named as gere names
    the task, or differing only in case, is accepted too."""
    group, dataset = OLORA_FOLDERS[task]
    exact = root / group / dataset
    if (exact / "train.json").is_file():
        return exact
    names = {dataset.lower(), task}
    found = sorted({p.parent for p in root.glob("*/*/train.json") if p.parent.name.lower() in names}
                   | {p.parent for p in root.glob("*/train.json") if p.parent.name.lower() in names})  # fmt: skip
    if len(found) > 1:
        raise GeReError(f"{root} holds {task} twice ({', '.join(map(str, found))}); keep one of them")
    if not found:
        raise GeReError(
            f"{root} has no {group}/{dataset}/train.json (O-LoRA's folder of {task}); pass O-LoRA's CL_Benchmark "
            f"folder, or leave {task} out with --tasks"
        )
    return found[0]


def _check_labels_file(path: Path, task: str, words: list[str]) -> None:
    """O-LoRA's ``labels.json``, when there, must list the task's label words (in any order and case)."""
    if not path.exists():
        return
    labels = read_json(path)
    if not isinstance(labels, list) or sorted(str(w).lower() for w in labels) != sorted(w.lower() for w in words):
        shown = labels if isinstance(labels, list) and len(labels) <= 20 else type(labels).__name__
        raise GeReError(
            f"{path} lists the labels {shown}, but cl15's {task} has {words}; is this O-LoRA's {task} folder? "
            "(pass O-LoRA's CL_Benchmark as released)"
        )


def olora_rows(path: Path, words: list[str]) -> list[dict[str, str]]:
    """The ``{"input", "label"}`` rows of one O-LoRA split file (a JSON list of ``{"sentence", "label"}``)."""
    if not path.is_file():
        raise GeReError(f"{path} does not exist; O-LoRA's CL_Benchmark has train.json and test.json per task")
    lowered = {w.lower(): w for w in words}
    rows = []
    for where, item in iter_rows(path):
        sentence, label = item.get("sentence"), item.get("label")
        if not isinstance(sentence, str):
            raise GeReError(f"{where}: expected O-LoRA's {{'sentence': text, 'label': word}}, but 'sentence' is "
                            f"{'missing' if sentence is None else type(sentence).__name__}; fix or remove that row")  # fmt: skip
        word = lowered.get(str(label).strip().lower()) if isinstance(label, (str, int, float)) else None
        if word is None:
            raise GeReError(f"{where}: label {_short(label)} is not one of {words}; fix or remove that row")
        rows.append({"input": sentence, "label": word})
    if not rows:
        raise GeReError(f"{path} holds no rows; O-LoRA's files hold a JSON list of {{'sentence', 'label'}}")
    return rows


def read_json(path: Path) -> Any:
    """One whole JSON document (``labels.json``), with an error naming the file for invalid JSON."""
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as err:
        raise GeReError(f"{path}: not valid JSON at line {err.lineno} ({err.msg}); fix the file") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
