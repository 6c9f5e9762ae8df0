"""Files in and out: atomic writes, and one reader for JSON / JSONL / CSV rows and ``hf:`` datasets.

Every artifact is written to a temporary file in the same folder and renamed into place, so a crash or a
full disk never leaves a half-written file under the final name. Every module that reads records (replay
texts, task rows, multiple-choice questions, held-out texts) reads them through `iter_rows`,
`read_rows` or `load_hub_dataset`, so a malformed file gets the same message naming the file and line.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gere.errors import GeReError

HF_PREFIX = "hf:"
ROW_SUFFIXES = (".json", ".jsonl", ".csv")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed onto `path`.

    On any exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def default_cache_dir() -> Path:
    """gere's cache (converted models, demo data, the default replay set): `$GERE_CACHE`, else
    `~/.cache/gere`."""
    env = os.environ.get("GERE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gere"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_join(root: str | os.PathLike, name: str) -> Path:
    """Join `name` (taken from data or a config) under `root`, refusing anything that would escape it."""
    root_p = Path(root).resolve()
    candidate = (root_p / name).resolve()
    if candidate != root_p and root_p not in candidate.parents:
        raise GeReError(
            f"the name {name!r} would write outside {root_p}; use a plain name without '..' or absolute paths"
        )
    return candidate


# ---------------------------------------------------------------------------------------------- reading


def read_utf8(path: str | os.PathLike) -> str:
    """The text of ``path``; bytes that are not UTF-8 are an error naming the byte and the fix."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise GeReError(
            f"{path}: byte {err.start} is not valid UTF-8; re-encode the file as UTF-8 "
            f"(for example `iconv -f latin1 -t utf-8 {path.name}`)"
        ) from None


def iter_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each row of a ``.jsonl`` (one object per line), ``.json`` (a list of objects,
    or ``{"data": [...]}``) or ``.csv`` file; ``where`` names the file and line / item / row for messages."""
    path = Path(path)
    if not path.is_file():
        raise GeReError(f"data file {path} does not exist; check the path")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for number, line in enumerate(read_utf8(path).splitlines(), start=1):
            if line.strip():
                yield _json_object(line, f"{path}, line {number}")
    elif suffix == ".json":
        try:
            data = json.loads(read_utf8(path))
        except json.JSONDecodeError as err:
            raise GeReError(f"{path}: not valid JSON at line {err.lineno} ({err.msg}); fix the file") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise GeReError(f"{path}: expected a JSON list of objects (or {{'data': [...]}}); rewrite it as such")
        for number, row in enumerate(data, start=1):
            yield _checked_object(row, f"{path}, item {number}")
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            for number, row in enumerate(csv.DictReader(f), start=1):
                yield f"{path}, row {number}", dict(row)
    else:
        raise GeReError(f"{path}: unsupported file type {suffix!r}; use one of {list(ROW_SUFFIXES)}")


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl`` / ``.json`` / ``.csv`` file (see `iter_rows`)."""
    return [row for _, row in iter_rows(path)]


def _json_object(line: str, where: str) -> tuple[str, dict[str, Any]]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise GeReError(f"{where}: not valid JSON ({err.msg}); fix or remove that line") from None
    return _checked_object(value, where)


def _checked_object(value: Any, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(value, dict):
        raise GeReError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return where, value


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """``"hf:<name>[:<config>]"`` -> ``(name, config or None)``."""
    name, _, config = source[len(HF_PREFIX) :].partition(":")
    if not name:
        raise GeReError(f"source {source!r} names no dataset; write 'hf:<dataset>' or 'hf:<dataset>:<config>'")
    return name, (config or None)


def load_hub_dataset(source: str, split: str, data_files: str | list[str] | None = None):
    """``datasets.load_dataset`` for an ``hf:<name>[:<config>]`` source; failures name the fix."""
    import datasets

    name, config = parse_hf_source(source)
    extra = {"data_files": data_files} if data_files is not None else {}
    try:
        return datasets.load_dataset(name, config, split=split, **extra)
    except Exception as err:  # network, missing dataset, config or split: all user-fixable
        raise GeReError(
            f"could not load split {split!r} of the Hugging Face dataset {name!r} (config {config!r}): {err}; "
            "check the name, config and split, or download the data and pass local files instead"
        ) from None
