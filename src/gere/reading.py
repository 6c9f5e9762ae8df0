"""The one guarded reader: every file gere reads (task data, replay texts, probes, held-out texts, run
configs, its own state and manifests) comes through `read_bytes` and its helpers.

What it guarantees, for any path a user can pass:

- **regular files only**: a FIFO, a device (``/dev/zero``), a socket or a folder is refused at once, with
  the path, before a byte is read (the file is opened non-blocking and checked again on the open handle);
- **a size ceiling** per kind of file (`LIMITS`; raise one with ``GERE_MAX_<KIND>_BYTES``, e.g.
  ``GERE_MAX_DATA_BYTES=8G``), so a runaway file is an error, not an exhausted memory;
- **UTF-8, with or without a byte-order mark** (the mark is dropped: a CSV header ``\\ufeffinput`` is
  ``input``); any other encoding (Windows-1252, UTF-16, a compressed file) is an error naming the file, the
  line and the fix;
- **JSON Lines split on "\\n" only**: U+2028 / U+2029 inside strings are valid JSON, not line breaks;
- every structural surprise (bad JSON, nesting too deep, a CSV row with more fields than its header, a lone
  surrogate) is a `GeReError` naming the file and the line or row, never a traceback.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gere.errors import GeReError, clip, shown

#: Bytes read at most from one file, by kind (override with GERE_MAX_<KIND>_BYTES: a number of bytes, or
#: with a K/M/G suffix). Data: tasks, replay, probe and held-out texts. Config: run configs and task.json.
#: State: what gere itself writes (run state, results, manifests), which grows with the run.
LIMITS = {"data": 1 << 30, "config": 8 << 20, "state": 1 << 30}

_SPECIAL = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
_COMPRESSED = ((b"\x1f\x8b", "gzip", "gunzip"), (b"PK\x03\x04", "zip", "unzip"), (b"BZh", "bzip2", "bunzip2"),
               (b"\xfd7zXZ\x00", "xz", "unxz"), (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"))  # fmt: skip
_LONE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _human(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def limit_for(kind: str) -> int:
    """The byte ceiling of ``kind`` (``data``, ``config`` or ``state``), from the environment if set there."""
    variable = f"GERE_MAX_{kind.upper()}_BYTES"
    raw = os.environ.get(variable)
    if not raw:
        return LIMITS[kind]
    text = raw.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    if not number.isdigit() or int(number) < 1:
        raise GeReError(f"{variable}={shown(raw)} is not a size; write a number of bytes, e.g. 2G, 500M or 1048576")
    return int(number) * scale


def file_kind(mode: int) -> str | None:
    """``None`` for a regular file, else what it is in words (``a FIFO (named pipe)``, ``a folder``, ...)."""
    for test, name in _SPECIAL:
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def _refuse_kind(path: Path, kind: str, what: str) -> GeReError:
    return GeReError(
        f"{what} {path} is {kind}, not a regular file; gere reads only regular files (a pipe or a device can "
        "block or never end): save the data to a file and pass that file"
    )


def check_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` if it is an existing regular file (or a link to one); otherwise an error naming it."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise GeReError(f"{what} {path} does not exist; check the path") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise GeReError(f"{what} {shown(str(path))} cannot be opened ({_reason(err)}); check the path") from None
    kind = file_kind(mode)
    if kind:
        raise _refuse_kind(path, kind, what)
    return path


def _reason(err: BaseException) -> str:
    return getattr(err, "strerror", None) or str(err)


def read_bytes(path: str | os.PathLike, *, what: str = "file", kind: str = "data") -> bytes:
    """The bytes of the regular file ``path``, at most `limit_for(kind)` of them (else an error)."""
    path = check_regular_file(path, what)
    limit = limit_for(kind)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise GeReError(f"{what} {path} cannot be read ({_reason(err)}); check its permissions") from None
    try:
        info = os.fstat(fd)
        found = file_kind(info.st_mode)
        if found:  # replaced between the check and the open
            raise _refuse_kind(path, found, what)
        if info.st_size > limit:
            raise _too_large(path, what, _human(info.st_size), limit, kind)
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 24, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:  # a file that grows while read, or reports no size (/proc)
            raise _too_large(path, what, f"more than {_human(limit)}", limit, kind)
    except OSError as err:
        raise GeReError(f"{what} {path} cannot be read ({_reason(err)})") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def _too_large(path: Path, what: str, size: str, limit: int, kind: str) -> GeReError:
    return GeReError(
        f"{what} {path} is {size}, above the {_human(limit)} gere reads from a {kind} file; pass a "
        f"smaller file, or raise the ceiling with GERE_MAX_{kind.upper()}_BYTES (e.g. GERE_MAX_{kind.upper()}_BYTES=8G)"
    )


def decode_utf8(data: bytes, path: str | os.PathLike, what: str = "file") -> str:
    """``data`` as UTF-8 text without its byte-order mark; any other encoding is an error naming the line."""
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                      (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):  # fmt: skip
        if data.startswith(bom):
            raise _other_encoding(path, what, name)
    head = data[:4096]
    if head.count(0) > 1 and head.count(0) >= len(head) // 4:
        raise _other_encoding(path, what, "UTF-16 or UTF-32 (it is full of NUL bytes)")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        for magic, name, tool in _COMPRESSED:
            if data.startswith(magic):
                raise GeReError(
                    f"{what} {path} is a {name}-compressed file, not text; decompress it ({tool}) and pass the result"
                ) from None
        line = data.count(b"\n", 0, err.start) + 1
        start = data.rfind(b"\n", 0, err.start) + 1
        end = data.find(b"\n", err.start)
        text = data[start : end if end >= 0 else len(data)].decode("cp1252", errors="replace")
        raise GeReError(
            f"{what} {path}, line {line}: byte 0x{data[err.start]:02X} is not valid UTF-8 (the line reads "
            f"{shown(text, 80)} as Windows-1252); re-encode the file as UTF-8, e.g. "
            f"`iconv -f WINDOWS-1252 -t UTF-8 {Path(path).name} > utf8-{Path(path).name}`"
        ) from None


def _other_encoding(path, what: str, name: str) -> GeReError:
    return GeReError(
        f"{what} {path} is {name} text; gere reads UTF-8: re-encode it, e.g. "
        f"`iconv -f UTF-16 -t UTF-8 {Path(path).name} > utf8-{Path(path).name}`"
    )


def read_text(path: str | os.PathLike, *, what: str = "file", kind: str = "data") -> str:
    """The UTF-8 text of ``path`` (see `read_bytes` and `decode_utf8`)."""
    return decode_utf8(read_bytes(path, what=what, kind=kind), path, what)


def parse_json(text: str, where: str, fix: str = "fix the file") -> Any:
    """``json.loads(text)``; bad JSON, nesting too deep, a number too long or a lone surrogate is an error
    naming ``where`` (with the line for a multi-line text)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        at = f", line {err.lineno}" if "\n" in text.strip() else ""
        raise GeReError(f"{where}{at}: not valid JSON ({err.msg}, column {err.colno}); {fix}") from None
    except RecursionError:
        raise GeReError(f"{where}: JSON nested too deeply to read; flatten it ({fix})") from None
    except ValueError as err:  # a number of thousands of digits
        raise GeReError(f"{where}: {clip(err, 160)}; {fix}") from None
    if _LONE_SURROGATE.search(text):
        _check_strings(value, where)
    return value


def _check_strings(value: Any, where: str) -> None:
    """Lone surrogates (``\\ud800`` without its pair) decode in JSON but are no character: refuse them."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise GeReError(
                    f"{where}: a text holds a lone surrogate escape (\\ud800-\\udfff without its pair), which is "
                    "no character; fix or remove that text"
                ) from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def read_json(path: str | os.PathLike, *, what: str = "file", kind: str = "state", fix: str = "fix the file") -> Any:
    """The parsed JSON of the regular file ``path`` (see `read_text` and `parse_json`)."""
    return parse_json(read_text(path, what=what, kind=kind), f"{what} {path}", fix)


def jsonl_values(text: str, path: str | os.PathLike, what: str = "file") -> Iterator[tuple[str, Any]]:
    """``(where, value)`` for every non-blank line of JSON Lines ``text``. Lines end at "\\n" alone: U+2028,
    U+2029 and the other characters `str.splitlines` would also split at are valid inside JSON strings."""
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip(" \t\r"):
            where = f"{path}, line {number}"
            yield where, parse_json(line, where, "fix or remove that line")


def csv_rows(text: str, path: str | os.PathLike) -> Iterator[tuple[str, dict[str, str]]]:
    """``(where, row)`` for every row of CSV ``text`` under its header line; a row whose number of fields
    differs from the header's, a header naming a column twice or a malformed line is an error."""
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))  # one field may be the whole text
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:
            raise GeReError(f"{path}, line 1: the header names the column(s) {shown(repeated)} more than once; "
                            "give every column its own name")  # fmt: skip
        number = 0
        for row in reader:
            if not row:
                continue  # a blank line
            number += 1
            where = f"{path}, row {number}"
            if len(row) != len(header):
                raise GeReError(
                    f"{where} (line {reader.line_num}) has {len(row)} field(s), the header has {len(header)}; "
                    "quote fields that hold commas (\"a, b\") and give every row one value per column"
                )
            yield where, dict(zip(header, row, strict=True))
    except csv.Error as err:
        raise GeReError(f"{path}, line {reader.line_num}: not valid CSV ({err}); fix that line") from None
