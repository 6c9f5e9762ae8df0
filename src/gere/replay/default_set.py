"""The default replay set: the paper's source, fetched once from the Hugging Face Hub and cached.

GeRe replays the first 1,000 texts of a SlimPajama sample (arXiv 2508.04676, Sec. 4.1; the reference
implementation ships them as ``slimpajama_6B_chunk0_head1k.jsonl``). When no ``replay_source`` is given,
`default_replay_file` streams the first `DEFAULT_COUNT` texts of `DEFAULT_DATASET` (train split) from the
Hub, writes them once as JSONL under ``<cache>/replay/`` with their sha256 beside them, and reuses that
file afterwards without a network. Offline and without the cached file, the error says how to pass a
local file instead. The texts are the first rows of the Hub dataset's train split in its stored order,
which need not be the reference's exact file.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from gere.errors import GeReError
from gere.io_utils import atomic_write_json, atomic_write_text, default_cache_dir, sha256_file
from gere.reading import read_json

DEFAULT_DATASET = "DKYoon/SlimPajama-6B"
DEFAULT_COUNT = 1000


def default_replay_file(
    cache_dir: str | Path | None = None,
    *,
    dataset: str = DEFAULT_DATASET,
    count: int = DEFAULT_COUNT,
    data_files: str | list[str] | None = None,
) -> Path:
    """A local JSONL file of the first ``count`` texts of ``dataset`` (``{"id", "text"}`` per line).

    Fetched once (streamed, so only those rows are read) and verified by its recorded sha256 afterwards.
    ``dataset`` and ``data_files`` are as in ``datasets.load_dataset`` (tests point them at local files).
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    stem = f"{dataset.replace('/', '__')}.head{count}"
    path, record = folder / "replay" / f"{stem}.jsonl", folder / "replay" / f"{stem}.json"
    if path.is_file() and record.is_file():
        known = read_json(record, what="cache record", fix="delete it to fetch the texts again")
        if isinstance(known, dict) and known.get("sha256") == sha256_file(path):
            return path
    rows = _first_rows(dataset, count, data_files)
    text = "".join(json.dumps({"id": f"{dataset}:train:{i}", "text": t}, ensure_ascii=False) + "\n"
                   for i, t in enumerate(rows))  # fmt: skip
    atomic_write_text(path, text)
    atomic_write_json(record, {"dataset": dataset, "split": "train", "count": len(rows), "sha256": sha256_file(path)})
    return path


def _first_rows(dataset: str, count: int, data_files) -> list[str]:
    import datasets

    extra = {"data_files": data_files} if data_files is not None else {}
    try:
        stream = datasets.load_dataset(dataset, split="train", streaming=True, **extra)
        rows = [row["text"] for row in itertools.islice(stream, count)]
    except Exception as err:  # network, missing dataset, changed layout: the user passes a file instead
        raise GeReError(
            f"no replay_source was given, and the default replay set (the first {count} texts of the Hugging "
            f"Face dataset {dataset!r}) could not be fetched: {type(err).__name__}: {err}. Pass general text "
            "yourself: set replay_source (gere_data_file= in a reference-style script) to a JSONL file with a "
            "'text' field, a text file or a folder of .txt files",
            setting="replay_source",
        ) from None
    if len(rows) < count:
        raise GeReError(f"the default replay dataset {dataset!r} gave {len(rows)} texts, fewer than {count}")
    return rows
