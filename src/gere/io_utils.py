"""Files in and out: atomic writes, output folders checked before work, and one reader for JSON / JSONL /
CSV rows and ``hf:`` datasets.

Every artifact is written to a temporary file in the same folder and renamed into place, so a crash or a
full disk never leaves a half-written file under the final name. Every module that reads records (replay
texts, task rows, multiple-choice questions, held-out texts) reads them through `iter_rows`,
`read_rows` or `load_hub_dataset`, and every other file through `gere.reading`, so a malformed, special
(FIFO, device), oversized or non-UTF-8 file gets the same message naming the file and line.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gere.errors import GeReError, shown
from gere.faults import maybe_fail
from gere.reading import check_regular_file, csv_rows, jsonl_values, parse_json, read_text

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
    maybe_fail("write", str(path))  # crash tests (gere.faults): a kill between any two writes


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the disk (or the user's quota) is full: an OSError ENOSPC or EDQUOT, or
    safetensors' SafetensorError, which carries the OS error only as text ("... (os error 28)")."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err)
    return type(err).__name__ == "SafetensorError" and any(
        mark in text for mark in ("No space left", "os error 28", "Disk quota exceeded", "os error 122")
    )


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes free to this user on the file system of ``folder`` (or of its nearest existing parent)."""
    path = Path(os.path.abspath(folder))
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def byte_size(nbytes: int | None) -> str:
    """``94.2 kB``, ``8.1 GB``: a size for a message (decimal units, as disks are sold)."""
    if nbytes is None:
        return "unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(path, name))
    except (OSError, ValueError, AttributeError):
        return default


def check_output_dir(folder: str | os.PathLike, *, inside: int = 0, what: str = "output folder") -> Path:
    """The absolute path of ``folder`` if a run can write there, checked without writing anything: no NUL
    byte, no name longer than the file system's NAME_MAX, no path that with ``inside`` more bytes (the
    deepest file written under it) passes PATH_MAX, no file in the way, and a writable folder to create it
    in. Anything else is an error naming the problem and the fix, before any work."""
    text = os.fspath(folder)
    if "\0" in text:
        raise GeReError(f"{what} {shown(text, 80)} holds a NUL byte, which no file name may; remove it")
    path = Path(os.path.abspath(os.path.expanduser(text)))
    existing, reached = Path(path.parts[0]), True
    name_max = _pathconf(existing, "PC_NAME_MAX", 255)
    for part in path.parts[1:]:
        size = len(os.fsencode(part))
        if size > name_max:
            raise GeReError(f"{what} {shown(text, 80)} holds a name of {size} bytes ({shown(part, 40)}); the file "
                            f"system allows {name_max} (NAME_MAX): choose a shorter name")  # fmt: skip
        if reached:
            try:
                mode = os.stat(existing / part).st_mode
            except FileNotFoundError:
                reached = False
                continue
            if not stat.S_ISDIR(mode):
                raise GeReError(f"{existing / part} is a file, not a folder, so {what} {shown(text, 80)} cannot be "
                                "created; choose another path")  # fmt: skip
            existing = existing / part
            name_max = _pathconf(existing, "PC_NAME_MAX", 255)
    path_max = _pathconf(existing, "PC_PATH_MAX", 4096)
    total = len(os.fsencode(str(path))) + inside
    if total >= path_max:
        raise GeReError(
            f"{what} {shown(text, 80)} is {len(os.fsencode(str(path)))} bytes long as an absolute path, and files "
            f"up to {inside} bytes deeper are written under it: more than the {path_max} bytes the system allows "
            "(PATH_MAX); choose a shorter path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(existing).f_flag & getattr(os, "ST_RDONLY", 1))
        why = "is on a read-only file system" if read_only else "is not writable by this user"
        raise GeReError(f"{what} {shown(text, 80)} cannot be created: {existing} {why}; choose a writable folder")
    return path


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


def read_utf8(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of the regular file ``path`` (a byte-order mark dropped); any other encoding is an
    error naming the line and the fix (`gere.reading`)."""
    return read_text(path, what=what, kind="data")


def iter_rows(path: str | os.PathLike, what: str = "data file") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each row of a ``.jsonl`` (one object per line), ``.json`` (a list of objects,
    or ``{"data": [...]}``) or ``.csv`` file; ``where`` names the file and line / item / row for messages.
    The file is read through the guarded reader (`gere.reading`): regular files of bounded size, UTF-8."""
    path = check_regular_file(path, what)
    suffix = path.suffix.lower()
    if suffix not in ROW_SUFFIXES:
        raise GeReError(f"{path}: unsupported file type {shown(suffix)}; use one of {list(ROW_SUFFIXES)}")
    text = read_utf8(path, what)
    if suffix == ".jsonl":
        for where, value in jsonl_values(text, path, what):
            yield _checked_object(value, where)
    elif suffix == ".json":
        data = parse_json(text, str(path))
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise GeReError(f"{path}: expected a JSON list of objects (or {{'data': [...]}}); rewrite it as such")
        for number, row in enumerate(data, start=1):
            yield _checked_object(row, f"{path}, item {number}")
    else:
        yield from csv_rows(text, path)


def read_rows(path: str | os.PathLike, what: str = "data file") -> list[dict[str, Any]]:
    """The rows of a ``.jsonl`` / ``.json`` / ``.csv`` file (see `iter_rows`)."""
    return [row for _, row in iter_rows(path, what)]


def _checked_object(value: Any, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(value, dict):
        raise GeReError(f"{where}: expected a JSON object, got {type(value).__name__} ({shown(value, 60)})")
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
