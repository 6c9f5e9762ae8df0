"""Classification tasks of a continual-learning sequence: specs, loading and subsampling.

A task is a text classification problem answered with a *label word* (the verbalizer); how it is put to
the model is `gere.continual.prompts`.

Sources a `TaskSpec` can point at:

* a local ``.json`` (a list of objects), ``.jsonl`` (one object per line) or ``.csv`` file; a single file
  holds both splits, so a seeded test set of ``test_size`` rows (20% when unset) is held out of it;
* a local folder with ``<train_split>.{json,jsonl,csv}`` and ``<test_split>.{json,jsonl,csv}``, plus an
  optional ``task.json`` that may give ``name``, ``instruction``, ``labels`` and field settings;
* a folder written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
* ``hf:<dataset name>[:<config>]``, loaded with ``datasets.load_dataset(name, config, split=...)``.
"""

from __future__ import annotations

import math
import os
import random
import string
import typing
from collections import defaultdict
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

from gere.config_reading import coerce, parse_yaml
from gere.errors import GeReError, shown
from gere.io_utils import HF_PREFIX, ROW_SUFFIXES, load_hub_dataset, read_rows
from gere.reading import read_json, read_text

TASK_FILE = "task.json"
# Fraction of a single-file source held out as the test split when `test_size` is unset.
SINGLE_FILE_TEST_FRACTION = 0.2


@dataclass
class Example:
    """One classification example: the raw input text and its label word."""

    input: str
    label: str


@dataclass
class TaskSpec:
    """How to load one task and how to phrase it for the model."""

    name: str = field(default="", metadata={"help": "Task name, e.g. 'mnli'; used in reports."})
    instruction: str = field(default="", metadata={"help": "Instruction put at the start of each prompt."})
    labels: list[str] = field(
        default_factory=list,
        metadata={"help": "Label words (the verbalizer), in the order shown in prompts."},
    )
    source: str = field(
        default="",
        metadata={
            "help": "Local .json/.jsonl/.csv file, a folder with train/test files, a save_to_disk folder, "
            "or 'hf:<dataset>[:<config>]'."
        },
    )
    input_field: str | list[str] = field(
        default="input",
        metadata={
            "help": "Row field holding the input; a list of fields (joined with newlines) or a format string "
            "such as '{premise} Question: {hypothesis}'."
        },
    )
    label_field: str = field(default="label", metadata={"help": "Row field holding the label."})
    label_map: dict[str, str] | None = field(
        default=None,
        metadata={"help": "Map from raw labels (e.g. 0, 1) to label words; keys compared as text."},
    )
    train_split: str = field(default="train", metadata={"help": "Name of the training split / file stem."})
    test_split: str = field(default="test", metadata={"help": "Name of the test split / file stem."})
    train_size: int | None = field(default=None, metadata={"help": "Training examples to keep (None = all)."})
    test_size: int | None = field(default=None, metadata={"help": "Test examples to keep (None = all)."})
    seed: int = field(default=0, metadata={"help": "Seed of the subsampling."})
    stratify: bool = field(
        default=True,
        metadata={"help": "Subsample class-balanced (round robin over labels) instead of uniformly."},
    )
    prompt_prefix: str | None = field(default=None, metadata={"help": "The prompt's text before the input, in place "
        "of '{instruction} Option: {labels} \\n' (the input and '\\nAnswer:' follow); set by benchmark.prompts: olora."})  # fmt: skip

    def __post_init__(self) -> None:
        self._fill_from_task_file()
        where = f"task {shown(self.name)}" if self.name else f"task with source {shown(self.source)}"
        if not self.name:
            if self.source and not self.source.startswith(HF_PREFIX) and not os.path.lexists(self.source):
                raise GeReError(  # a misread path is named as one, not as a task without a name
                    f"task source {shown(self.source)} is not a file or folder (no such path); a relative source in "
                    "a run config is read from the config file's folder: fix the path, or make the data there")  # fmt: skip
            raise GeReError(f"{where} has no name; set `name` (or give one in the folder's {TASK_FILE})")
        if not self.instruction:
            raise GeReError(f"{where} has no instruction; set `instruction` (or give one in {TASK_FILE})")
        if not self.source:
            raise GeReError(f"{where} has no source; set `source` to a file, a folder or 'hf:<dataset>'")
        if isinstance(self.labels, str) or not all(isinstance(w, str) for w in self.labels):
            raise GeReError(f"{where}: `labels` must be a list of label words, got {shown(self.labels)}")
        self.labels = [w.strip() for w in self.labels]
        if any(not w for w in self.labels):
            raise GeReError(f"{where}: a label word is empty; give every label a non-empty word")
        if len(self.labels) < 2:
            raise GeReError(
                f"{where} has {len(self.labels)} label word(s) {self.labels}; a classification task needs at "
                "least two, so list every class in `labels`"
            )
        duplicates = sorted({w for w in self.labels if self.labels.count(w) > 1})
        if duplicates:
            raise GeReError(
                f"{where} lists the label word(s) {duplicates} more than once; make each label unique"
            )
        if isinstance(self.input_field, list | tuple):
            if not self.input_field or not all(isinstance(f, str) and f for f in self.input_field):
                raise GeReError(
                    f"{where}: `input_field` list must hold field names, got {shown(self.input_field)}"
                )
            self.input_field = list(self.input_field)
        elif not isinstance(self.input_field, str) or not self.input_field:
            raise GeReError(
                f"{where}: `input_field` must be a field name, a list of names or a format string"
            )
        elif "{" in self.input_field or "}" in self.input_field:
            _check_template(self.input_field, where)
        if self.label_map is not None:
            self.label_map = {str(k): str(v).strip() for k, v in self.label_map.items()}
            unknown = sorted({v for v in self.label_map.values() if v not in self.labels})
            if unknown:
                raise GeReError(
                    f"{where}: `label_map` maps to {unknown}, which are not label words {self.labels}; "
                    "map raw labels only onto listed label words"
                )
        for flag in ("train_size", "test_size"):
            value = getattr(self, flag)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise GeReError(f"{where}: `{flag}` must be a positive integer or None (all), got {shown(value)}")

    def _fill_from_task_file(self) -> None:
        """Take name/instruction/labels (and unset field settings) from ``<source>/task.json``."""
        if not self.source or self.source.startswith(HF_PREFIX):
            return
        task_file = Path(self.source) / TASK_FILE
        if not os.path.lexists(task_file):
            return
        meta = read_json(task_file, what="task file", kind="config", fix="fix the file or remove it")
        if not isinstance(meta, dict):
            raise GeReError(f"{task_file} must hold a JSON object with name/instruction/labels")
        defaults = TaskSpec.__dataclass_fields__
        hints = typing.get_type_hints(TaskSpec)
        for key, value in meta.items():
            if key not in defaults or key == "source":
                raise GeReError(
                    f"{task_file} has the unknown key {shown(key)}; allowed keys: "
                    f"{sorted(k for k in defaults if k != 'source')}"
                )
            current = getattr(self, key)
            default = defaults[key].default
            if default is MISSING:
                default = defaults[key].default_factory()
            if current == default:  # explicit arguments win over the file
                setattr(self, key, coerce(value, hints[key], f"{task_file}: {key}"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_template(template: str, where: str) -> None:
    """A format-string `input_field` names row fields only: ``{premise} Question: {hypothesis}``."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise GeReError(f"{where}: `input_field` {shown(template)} is not a valid format string ({err}); write "
                        "fields as {name} and a literal brace as {{ or }}") from None  # fmt: skip
    bad = [n for n in names if not n or n.isdigit() or any(c in n for c in ".[]")]
    if bad or not names:
        raise GeReError(f"{where}: `input_field` {shown(template)} must name row fields, as in "
                        "'{premise} Question: {hypothesis}' (no empty {}, positions or attributes)")  # fmt: skip


@dataclass
class TaskData:
    """A loaded task: its spec and the (subsampled) train and test examples."""

    spec: TaskSpec
    train: list[Example]
    test: list[Example]


# --------------------------------------------------------------------------------------------- reading rows


def _split_file(folder: Path, split: str) -> Path | None:
    for suffix in ROW_SUFFIXES:
        candidate = folder / f"{split}{suffix}"
        if os.path.lexists(candidate):  # whatever it is: the reader refuses a pipe or a device by name
            return candidate
    return None


def _load_hf_split(source: str, split: str) -> tuple[list[dict[str, Any]], str]:
    return [dict(row) for row in load_hub_dataset(source, split)], f"{source} [{split}]"


def _load_from_disk_split(folder: Path, split: str) -> tuple[list[dict[str, Any]], str]:
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise GeReError(f"{folder} has splits {list(loaded)}, not {shown(split)}; set train_split/test_split")
        loaded = loaded[split]
    elif split != "train":
        raise GeReError(f"{folder} holds a single dataset; it can only serve as the train split")
    return [dict(row) for row in loaded], f"{folder} [{split}]"


def load_split_rows(spec: TaskSpec) -> tuple[list[dict], str, list[dict], str]:
    """Return (train rows, where they came from, test rows, where they came from) for `spec.source`."""
    if spec.source.startswith(HF_PREFIX):
        train, train_where = _load_hf_split(spec.source, spec.train_split)
        test, test_where = _load_hf_split(spec.source, spec.test_split)
        return train, train_where, test, test_where
    path = Path(spec.source)
    if os.path.lexists(path) and not path.is_dir():  # a file (the reader refuses a pipe or a device by name)
        rows = read_rows(path, "task file")
        # One file holds both splits: hold out a seeded test set so train and test never overlap.
        order = list(range(len(rows)))
        random.Random(spec.seed).shuffle(order)
        n_test = spec.test_size or max(1, math.ceil(SINGLE_FILE_TEST_FRACTION * len(rows)))
        if n_test >= len(rows):
            raise GeReError(
                f"{path} has {len(rows)} rows, too few to hold out {n_test} test rows; add rows, lower "
                "`test_size`, or give separate train/test files in a folder"
            )
        test_idx, train_idx = sorted(order[:n_test]), sorted(order[n_test:])
        # Keep the original row numbers in error messages: `where` names the file, rows carry an index.
        train = [dict(rows[i], __row__=i + 1) for i in train_idx]
        test = [dict(rows[i], __row__=i + 1) for i in test_idx]
        return train, str(path), test, str(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            train, tw = _load_from_disk_split(path, spec.train_split)
            test, sw = _load_from_disk_split(path, spec.test_split)
            return train, tw, test, sw
        found = {}
        for split in (spec.train_split, spec.test_split):
            split_path = _split_file(path, split)
            if split_path is None:
                raise GeReError(
                    f"folder {path} has no {split}.json/.jsonl/.csv; add it or set train_split/test_split to the "
                    "file names it holds"
                )
            found[split] = split_path
        train_path, test_path = found[spec.train_split], found[spec.test_split]
        return read_rows(train_path), str(train_path), read_rows(test_path), str(test_path)
    raise GeReError(
        f"task {shown(spec.name)}: source {shown(spec.source)} is neither a file, a folder nor 'hf:<dataset>'; fix the path"
    )


# ------------------------------------------------------------------------------------------ rows -> examples


def row_input(spec: TaskSpec, row: dict[str, Any], where: str) -> str:
    """The input text of `row` according to `spec.input_field` (field, list of fields, or format string)."""
    try:
        if isinstance(spec.input_field, list):
            return "\n".join(str(row[f]) for f in spec.input_field)
        if "{" in spec.input_field:
            return spec.input_field.format(**row)
        return str(row[spec.input_field])
    except (ValueError, TypeError) as e:  # a format spec the value does not take, e.g. {n:d} on text
        raise GeReError(f"{where}: `input_field` {shown(spec.input_field)} cannot format this row ({e}); fix "
                        "the format string or the data") from None  # fmt: skip
    except KeyError as e:
        raise GeReError(
            f"{where}: no field {shown(e.args[0])} (row has {shown(sorted(str(k) for k in row if k != '__row__'), 200)}); set "
            "`input_field` to the field(s) holding the input"
        ) from None


def row_label(spec: TaskSpec, row: dict[str, Any], where: str) -> str:
    """The label word of `row`: the raw label, mapped through `spec.label_map` when given."""
    if spec.label_field not in row:
        raise GeReError(
            f"{where}: no field {shown(spec.label_field)} (row has {shown(sorted(str(k) for k in row if k != '__row__'), 200)}); set "
            "`label_field` to the field holding the label"
        )
    raw = row[spec.label_field]
    if spec.label_map is not None:
        key = str(raw).strip()
        if key not in spec.label_map:
            raise GeReError(
                f"{where}: label {shown(raw)} is not a key of `label_map` {sorted(spec.label_map)}; add it to label_map"
            )
        return spec.label_map[key]
    label = str(raw).strip()
    if label not in spec.labels:
        raise GeReError(
            f"{where}: label {shown(raw)} is not one of the label words {spec.labels}; fix the data, or add a "
            "`label_map` from raw labels to label words"
        )
    return label


def rows_to_examples(spec: TaskSpec, rows: list[dict[str, Any]], where: str) -> list[Example]:
    examples = []
    for i, row in enumerate(rows):
        row_where = f"{where}, row {row.get('__row__', i + 1)}"
        examples.append(Example(input=row_input(spec, row, row_where), label=row_label(spec, row, row_where)))
    return examples


def subsample(examples: list[Example], size: int | None, seed: int, stratify: bool = True) -> list[Example]:
    """Seeded subsample of `size` examples (all when None or larger than the set).

    Stratified mode shuffles each label's examples and takes them round robin over the labels, so the
    classes are as balanced as their counts allow; the result is shuffled with the same seed.
    """
    if size is None or size >= len(examples):
        return list(examples)
    rng = random.Random(seed)
    if not stratify:
        return rng.sample(examples, size)
    by_label: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_label[ex.label].append(ex)
    pools = [by_label[label] for label in sorted(by_label)]
    for pool in pools:
        rng.shuffle(pool)
    chosen: list[Example] = []
    depth = 0
    while len(chosen) < size:
        for pool in pools:
            if depth < len(pool) and len(chosen) < size:
                chosen.append(pool[depth])
        depth += 1
    rng.shuffle(chosen)
    return chosen


def load_task(spec: TaskSpec) -> TaskData:
    """Load `spec`'s train and test examples, checking every label, then subsample with `spec.seed`."""
    train_rows, train_where, test_rows, test_where = load_split_rows(spec)
    train = rows_to_examples(spec, train_rows, train_where)
    test = rows_to_examples(spec, test_rows, test_where)
    if not train:
        raise GeReError(f"task {shown(spec.name)}: {train_where} holds no examples; add training data")
    if not test:
        raise GeReError(f"task {shown(spec.name)}: {test_where} holds no examples; add test data")
    return TaskData(
        spec=spec,
        train=subsample(train, spec.train_size, spec.seed, spec.stratify),
        test=subsample(test, spec.test_size, spec.seed + 1, spec.stratify),
    )


# ------------------------------------------------------------------------------------------ the CL benchmark


BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"  # shipped as package data


def benchmark_path(name: str) -> Path:
    path = BENCHMARKS_DIR / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in BENCHMARKS_DIR.glob("*.yaml"))
        raise GeReError(f"no benchmark named {shown(name)}; available: {available}")
    return path


def load_benchmark_definition(name: str = "cl15") -> dict[str, Any]:
    """The parsed benchmark YAML: ``{"tasks": {name: {...}}, "orders": {int: [names]}, ...}``."""
    path = benchmark_path(name)
    return parse_yaml(read_text(path, what="benchmark definition", kind="config"), str(path))


PROMPTS = ("gere", "olora")
MC_FORMATS = ("letter", "cloze")  # how the general multiple-choice probe is put (continual/multiple_choice.py)


def load_benchmark(
    name: str = "cl15",
    order: int = 4,
    data_dir: str | Path = "data/cl15",
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    tasks: list[str] | None = None,
    prompts: str = "gere",
    **overrides: Any,
) -> list[TaskSpec]:
    """TaskSpecs of benchmark `name` in the given `order`, reading ``<data_dir>/<task>/{train,test}.json``.

    `train_size` defaults to the benchmark's per-task size (about 1,000 examples per class); `tasks`: only
    these of the order's tasks, in its sequence; `prompts`: ``"gere"`` (the benchmark's own instructions) or
    ``"olora"`` (O-LoRA's prompts, recorded with the data by ``gere data cl15 --from-olora``, see
    `gere.data.olora_prompts`); `overrides` (e.g. ``input_field="sentence"``) apply to every task. Every task's
    folder must be there; the error for a missing one names the tasks present. See docs/benchmark_cl15.md.
    """
    definition = load_benchmark_definition(name)
    orders = {int(k): v for k, v in definition["orders"].items()}
    if order not in orders:
        raise GeReError(f"benchmark {shown(name)} has orders {sorted(orders)}, not {order}; pick one of them")
    if prompts not in PROMPTS:
        raise GeReError(f"prompts {shown(prompts)} is not one of {list(PROMPTS)}; pick one of them")
    unknown = [t for t in tasks or [] if t not in definition["tasks"]]
    if unknown:
        raise GeReError(f"benchmark {shown(name)} has no task {shown(unknown)}; choose from {list(definition['tasks'])}")
    sequence = [t for t in orders[order] if tasks is None or t in tasks]
    data_dir = Path(data_dir)
    _check_task_folders(name, order, data_dir, sequence)
    prompt_settings = {}
    if prompts == "olora":
        from gere.data.olora_prompts import olora_benchmark_settings

        prompt_settings = olora_benchmark_settings({t: definition["tasks"][t]["labels"] for t in sequence}, data_dir)
    specs = []
    for task in sequence:
        entry = dict(definition["tasks"][task])
        per_class = entry.pop("train_per_class", None)
        default_train = per_class * len(entry["labels"]) if per_class else None
        kwargs = {**entry, **prompt_settings.get(task, {}), **overrides}
        specs.append(
            TaskSpec(
                name=task,
                source=str(data_dir / task),
                train_size=train_size if train_size is not None else default_train,
                test_size=test_size,
                seed=seed,
                **kwargs,
            )
        )
    return specs


def _check_task_folders(name: str, order: int, data_dir: Path, sequence: list[str]) -> None:
    """Every task's folder is there, or one error names the missing ones and the ``tasks`` that are present."""
    if not data_dir.is_dir():
        raise GeReError(f"benchmark data_dir {data_dir} does not exist; build it with `gere data {name} --out "
                        f"{data_dir}` (docs/benchmark_{name}.md), or set data_dir to the folder that holds it")  # fmt: skip
    missing = [t for t in sequence if not os.path.lexists(data_dir / t)]
    if missing:
        present = [t for t in sequence if t not in missing]
        then = f"train on the {len(present)} present with tasks: [{', '.join(present)}]" if present else "check data_dir"
        raise GeReError(f"{data_dir} has no folder for {', '.join(missing)} ({len(missing)} of the {len(sequence)} "
                        f"tasks of order {order}); add {'it' if len(missing) == 1 else 'them'} (gere data {name} --out "
                        f"{data_dir} --tasks {' '.join(missing)}), or {then}")  # fmt: skip
