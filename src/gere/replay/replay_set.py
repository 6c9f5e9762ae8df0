"""The replay set: a small, fixed set of general texts replayed while training on every task.

The paper replays the first 1,000 texts of a SlimPajama chunk, tokenised without special tokens and cut to
563 tokens (GeRe, arXiv 2508.04676, Sec. 4.1). Sources here:

- a JSONL file (one object per line, the text under ``text_field``), a JSON file holding a list of such
  objects, or a CSV file with a ``text_field`` column (read by `gere.io_utils.iter_rows`);
- a plain text file or a folder of ``.txt`` files (paragraphs separated by blank lines);
- a Hugging Face dataset, written ``hf:<name>[:<config>]`` (``split`` and ``data_files`` as in
  ``datasets.load_dataset``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from gere.errors import GeReError, shown
from gere.io_utils import HF_PREFIX, ROW_SUFFIXES, iter_rows, load_hub_dataset, parse_hf_source, read_utf8

logger = logging.getLogger(__name__)

SELECTIONS = ("first", "random")
#: Replay texts are cut to this many tokens in the paper (Sec. 4.1).
PAPER_MAX_LENGTH = 563


@dataclass(frozen=True)
class ReplaySet:
    """Selected replay texts with stable ids (the source's id field, else ``<source name>:<position>``)."""

    ids: tuple[str, ...]
    texts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def content_hash(self) -> str:
        """sha256 over (id, text) pairs in order: names the exact selected set."""
        h = hashlib.sha256()
        for sample_id, text in zip(self.ids, self.texts):
            for part in (sample_id, text):
                data = part.encode("utf-8")
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
        return h.hexdigest()


#: What a replay source without its text field is told to do; other readers (held-out sets) give their own.
TEXT_FIELD_FIX = "set replay_text_field to the right name"


def _record(where: str, obj: dict, text_field: str, id_field: str | None, default_id: str,
            field_fix: str = TEXT_FIELD_FIX) -> tuple[str, str]:  # fmt: skip
    if text_field not in obj:
        raise GeReError(f"{where}: no field {shown(text_field)} (found {sorted(obj)}); {field_fix}",
                        setting="replay_text_field")  # fmt: skip
    text = obj[text_field]
    if not isinstance(text, str):
        raise GeReError(f"{where}: field {shown(text_field)} holds {type(text).__name__}, not text")
    sample_id = str(obj[id_field]) if id_field and id_field in obj else default_id
    return sample_id, text


def _records_from_text(path: Path, what: str) -> list[tuple[str, str]]:
    paragraphs = [p.strip() for p in read_utf8(path, what).replace("\r\n", "\n").split("\n\n")]
    return [(f"{path.stem}:{i}", p) for i, p in enumerate(p for p in paragraphs if p)]


def load_replay_records(
    source: str | Path,
    *,
    text_field: str = "text",
    id_field: str | None = "id",
    split: str = "train",
    data_files: str | list[str] | None = None,
    what: str = "replay source",
    field_fix: str = TEXT_FIELD_FIX,
) -> list[tuple[str, str]]:
    """Read (id, text) pairs from a file, folder or ``hf:`` dataset, in source order. ``what`` names the
    source in messages (``replay source``, ``perplexity set 'wiki'``); ``field_fix``: what a source without
    ``text_field`` is told to do."""
    source_str = str(source)
    if source_str.startswith(HF_PREFIX):
        return _records_from_hub(source_str, text_field, id_field, split, data_files, field_fix)
    path = Path(source_str).expanduser()
    if not os.path.lexists(path):
        raise GeReError(
            f"{what} {path} does not exist; pass a JSONL/JSON/text file, a folder of .txt files, "
            "or a Hugging Face dataset as hf:<name>[:<config>]"
        )
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise GeReError(f"{what}: folder {path} holds no .txt files to read as texts")
        return [r for f in files for r in _records_from_text(f, what)]
    if path.suffix.lower() not in ROW_SUFFIXES:
        return _records_from_text(path, what)
    return [
        _record(where, row, text_field, id_field, f"{path.stem}:{i}", field_fix)
        for i, (where, row) in enumerate(iter_rows(path, what))
    ]


def _records_from_hub(
    source: str, text_field: str, id_field: str | None, split: str, data_files: str | list[str] | None,
    field_fix: str = TEXT_FIELD_FIX,
) -> list[tuple[str, str]]:
    ds = load_hub_dataset(source, split, data_files)
    name = parse_hf_source(source)[0]
    if text_field not in ds.column_names:
        raise GeReError(
            f"dataset {shown(name)} has no column {shown(text_field)} (columns: {ds.column_names}); {field_fix}",
            setting="replay_text_field",
        )
    ids = (
        ds[id_field] if id_field and id_field in ds.column_names else [f"{name}:{i}" for i in range(len(ds))]
    )
    return [(str(i), t) for i, t in zip(ids, ds[text_field])]


def select_replay_set(
    records: list[tuple[str, str]], num_samples: int, selection: str = "first", seed: int = 0
) -> ReplaySet:
    """Choose ``num_samples`` records: the first N (as the paper does) or a seeded random N (kept in source
    order). Empty or whitespace-only texts are an error, as are duplicate ids."""
    if selection not in SELECTIONS:
        raise GeReError(f"replay selection {shown(selection)} is not one of {', '.join(SELECTIONS)}")
    if num_samples < 1:
        raise GeReError(
            f"number of replay samples is {num_samples}; set num_replay_samples to 1 or more",
            setting="num_replay_samples",
        )
    if not records:
        raise GeReError("the replay source holds no texts; point replay_source at general text", setting="replay_source")
    if len(records) < num_samples:
        logger.warning("the replay source holds %d texts; num_replay_samples asks for %d, so %d are replayed",
                       len(records), num_samples, len(records))  # fmt: skip
    if selection == "first":
        chosen = records[:num_samples]
    else:
        positions = sorted(random.Random(seed).sample(range(len(records)), min(num_samples, len(records))))
        chosen = [records[i] for i in positions]
    for sample_id, text in chosen:
        if not text.strip():
            raise GeReError(
                f"replay text {shown(sample_id)} is empty or whitespace only; remove it from the source"
            )
    ids = [i for i, _ in chosen]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise GeReError(
            f"replay id {shown(dup)} appears more than once; ids must be unique (or drop the id field)"
        )
    return ReplaySet(tuple(ids), tuple(t for _, t in chosen))


#: Characters kept per token wanted before tokenising: far more than any real token spans, so the first
#: tokens never change, while a pathological text (one 10 MB line) is not tokenised whole.
CHARS_PER_TOKEN = 64


def bounded_text(text: str, max_tokens: int, keep: str = "start") -> str:
    """``text`` cut to ``CHARS_PER_TOKEN * max_tokens`` characters from its start (or its ``end``)."""
    limit = CHARS_PER_TOKEN * max_tokens
    if len(text) <= limit:
        return text
    return text[:limit] if keep == "start" else text[-limit:]


def tokenize_replay_set(replay_set: ReplaySet, tokenizer, max_length: int = PAPER_MAX_LENGTH) -> list[list[int]]:
    """Token ids of each text, without special tokens, cut to ``max_length``. A text of fewer than two
    tokens has nothing to predict and is an error."""
    if max_length < 2:
        raise GeReError(f"replay max length is {max_length}; set replay_max_length to 2 or more",
                        setting="replay_max_length")  # fmt: skip
    texts = [bounded_text(t, max_length) for t in replay_set.texts]
    encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)
    token_lists = [list(map(int, ids)) for ids in encoded["input_ids"]]
    for sample_id, ids in zip(replay_set.ids, token_lists):
        if len(ids) < 2:
            raise GeReError(
                f"replay text {shown(sample_id)} is {len(ids)} token(s) long; texts need at least 2 tokens, remove it"
            )
    return token_lists


def load_replay_set(
    source: str | Path,
    num_samples: int,
    *,
    selection: str = "first",
    seed: int = 0,
    text_field: str = "text",
    id_field: str | None = "id",
    split: str = "train",
    data_files: str | list[str] | None = None,
) -> ReplaySet:
    """Read a source and select the replay set in one call."""
    records = load_replay_records(
        source, text_field=text_field, id_field=id_field, split=split, data_files=data_files
    )
    return select_replay_set(records, num_samples, selection, seed)
