"""O-LoRA's prompts, built from its instruction file as its data loader builds them.

O-LoRA (Wang et al. 2023, github.com/cmnfriend/O-LoRA) reads ``configs/instruction_config.json``: a JSON
object from a task group (``NLI``, ``SC``, ``TC``, ``QQP``, ``BoolQA``, ``MultiRC``, ``WiC``) to a list of
``{"instruction_type": "zero-shot" | "few-shot", "instruction": text}``. Its scripts run with
``--instruction_strategy single`` (the group's first zero-shot instruction), ``--add_task_name True`` and
``--add_dataset_name True``, so its loader (``src/uie_dataset_lora.py``) and collator (``src/uie_collator.py``)
put each row to the model as::

    Task:{group}\\nDataset:{dataset}\\n{instruction}Option: {labels.json's words, ", "-joined} \\n{sentence}\\nAnswer:

where the instruction carries its own closing newline. COPA's sentence already holds its question and both
choices, and O-LoRA's loader gives COPA no instruction and no options: ``Task:COPA\\nDataset:COPA\\n{sentence}
\\nAnswer:``.

`gere data cl15 --from-olora` records what a task's prompt needs in ``<task>/olora_prompt.json`` (the group,
the dataset folder, the instruction, the options in ``labels.json``'s order and spelling, and where the
instruction came from); ``benchmark.prompts: olora`` builds the prompt from that record (`olora_prefix`), so
the converted folder needs nothing else. No instruction text is shipped with gere: it comes from the user's
copy of O-LoRA's repository.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gere.errors import GeReError, shown
from gere.reading import parse_json, read_json, read_text

RECORD = "olora_prompt.json"
#: Where O-LoRA's repository keeps its instruction file.
INSTRUCTION_FILE = Path("configs") / "instruction_config.json"
#: Groups whose prompt O-LoRA's loader builds without an instruction or options.
WITHOUT_INSTRUCTION = ("COPA",)
RECORD_KEYS = ("group", "dataset", "instruction", "options")


def read_instructions(path: Path) -> tuple[dict[str, str], list[str]]:
    """``{group: instruction}`` (each group's first zero-shot instruction, as ``--instruction_strategy single``
    takes it) and the problems of the file, each naming the fix; the file's name leads each problem."""
    try:
        data = parse_json(read_text(path, what="O-LoRA instruction file", kind="config"), str(path))
    except GeReError as err:
        return {}, [str(err)]
    if not isinstance(data, dict):
        return {}, [f"{path}: expected O-LoRA's JSON object {{group: [{{'instruction_type', 'instruction'}}]}}, got "
                    f"{type(data).__name__}; pass O-LoRA's configs/instruction_config.json"]  # fmt: skip
    found, problems = {}, []
    for group, entries in data.items():
        zero_shot = [e.get("instruction") for e in entries if isinstance(e, dict) and e.get("instruction_type") == "zero-shot"] \
            if isinstance(entries, list) else []  # fmt: skip
        if zero_shot and isinstance(zero_shot[0], str):
            found[str(group)] = zero_shot[0]
        else:
            problems.append(f"{path}: group {shown(group)} has no zero-shot entry {{'instruction_type': 'zero-shot', "
                            "'instruction': text}; fix that group as O-LoRA's file writes it")  # fmt: skip
    return found, problems


def prompt_record(group: str, dataset: str, options: list[str], instructions: dict[str, str], source: str) -> dict[str, Any]:
    """What ``<task>/olora_prompt.json`` holds for one task; raises when the file has no instruction for it."""
    if group in WITHOUT_INSTRUCTION:
        instruction = None
    elif group in instructions:
        instruction = instructions[group]
    else:
        raise GeReError(f"{source} has no zero-shot instruction for O-LoRA's group {group!r}; pass O-LoRA's own "
                        "configs/instruction_config.json")  # fmt: skip
    return {"group": group, "dataset": dataset, "instruction": instruction, "options": list(options),
            "instruction_file": source}  # fmt: skip


def olora_prefix(record: dict[str, Any]) -> str:
    """The prompt's text before the sentence, as O-LoRA's loader and collator write it (the prompt ends with
    the sentence and ``"\\nAnswer:"``)."""
    head = f"Task:{record['group']}\nDataset:{record['dataset']}\n"
    if record["group"] in WITHOUT_INSTRUCTION:
        return head
    return f"{head}{record['instruction']}Option: {', '.join(record['options'])} \n"


def read_record(folder: Path) -> dict[str, Any] | None:
    """The task's recorded O-LoRA prompt (``folder/olora_prompt.json``), or None when it has none."""
    path = folder / RECORD
    if not path.exists():
        return None
    record = read_json(path, what="O-LoRA prompt record", kind="data", fix="convert the task again")
    ok = isinstance(record, dict) and all(k in record for k in RECORD_KEYS) and isinstance(record["options"], list)
    if not ok or not (record["instruction"] is None or isinstance(record["instruction"], str)):
        raise GeReError(f"{path} is not a prompt record gere wrote (keys {list(RECORD_KEYS)}); convert the task "
                        "again with gere data cl15 --from-olora")  # fmt: skip
    return record


def olora_task_settings(folder: Path, words: list[str]) -> dict[str, Any] | None:
    """The `TaskSpec` settings that put a converted task to the model as O-LoRA does, from its record in
    ``folder`` (None when it has none): the prompt's prefix, and O-LoRA's label words in ``labels.json``'s order
    and spelling, onto which ``label_map`` maps the data's label words ``words`` (the same words but for case,
    as the conversion checked), so training targets and scoring use the words the prompt lists."""
    record = read_record(folder)
    if record is None:
        return None
    by_case = {str(o).lower(): str(o) for o in record["options"]}
    if sorted(by_case) != sorted(w.lower() for w in words):
        raise GeReError(f"{folder / RECORD} lists the options {shown(record['options'], 200)}, but the task's label "
                        f"words are {words}; convert the task again with gere data cl15 --from-olora")  # fmt: skip
    return {"labels": [str(o) for o in record["options"]], "label_map": {w: by_case[w.lower()] for w in words},
            "prompt_prefix": olora_prefix(record)}  # fmt: skip


def olora_benchmark_settings(words: dict[str, list[str]], data_dir: Path) -> dict[str, dict[str, Any]]:
    """`olora_task_settings` of every task in ``words`` (``{task: its label words}``) under ``data_dir``; one
    error names every task whose folder holds no record, and the conversion that writes them."""
    found = {task: olora_task_settings(data_dir / task, task_words) for task, task_words in words.items()}
    missing = [task for task, settings in found.items() if settings is None]
    if missing:
        raise GeReError(
            f"prompts: olora builds each prompt from O-LoRA's instructions recorded with the data, but {data_dir} holds "
            f"none for {', '.join(missing)} (no {RECORD}); convert with O-LoRA's instruction file: `gere data cl15 "
            f"--from-olora O-LoRA --out {data_dir}` (O-LoRA's repository folder, whose {INSTRUCTION_FILE} is read), "
            "or add --olora-instructions FILE; or use prompts: gere"
        )
    return found
