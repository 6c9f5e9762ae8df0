"""The guarded reader (`gere.reading`) through every reader of the project: file kinds, encodings, sizes,
JSON Lines separators, CSV shapes and JSON structure, each family generated over many cases.

Every case is a real file (real FIFOs, sockets and /dev/zero, real encodings); a reader that would block
is stopped by an alarm, so a regression fails instead of hanging.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import signal
import socket
from pathlib import Path

import pytest

from gere.continual.multiple_choice import load_multiple_choice
from gere.continual.run_config import load_run_config
from gere.continual.tasks import TaskSpec, load_task
from gere.errors import GeReError
from gere.io_utils import read_rows
from gere.reading import LIMITS, limit_for, read_json, read_text
from gere.replay.replay_set import load_replay_records


@pytest.fixture(autouse=True)
def alarm():
    """A reader that blocks (a FIFO opened for reading waits for a writer) fails the test after 20 s."""

    def fail(*_):
        raise TimeoutError("a reader blocked")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------- every reader


def _task_folder(root: Path, train_name: str = "train.jsonl") -> Path:
    folder = root / "task"
    folder.mkdir(exist_ok=True)
    rows = [{"input": f"text {i}", "label": "a" if i % 2 else "b"} for i in range(6)]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _readers(root: Path):
    """(name, function of a path that reads it) for every reader a user's file goes through."""
    spec = {"name": "t", "instruction": "pick", "labels": ["a", "b"]}

    def task_file(path):
        return load_task(TaskSpec(source=str(path), **spec))

    def task_split(path):
        folder = _task_folder(root)
        target = folder / "train.jsonl"
        if os.path.lexists(target):
            target.unlink()
        target.symlink_to(path)
        return load_task(TaskSpec(source=str(folder), **spec))

    def task_json(path):
        folder = _task_folder(root)
        if os.path.lexists(folder / "train.jsonl"):
            (folder / "train.jsonl").unlink()
        (folder / "train.jsonl").write_text((folder / "test.jsonl").read_text())
        meta = folder / "task.json"
        if os.path.lexists(meta):
            meta.unlink()
        meta.symlink_to(path)
        return load_task(TaskSpec(source=str(folder)))

    return [  # (reader, read, the path its message names: a link inside a task folder is named as such)
        ("task file", task_file, None),
        ("task split", task_split, root / "task" / "train.jsonl"),
        ("task.json", task_json, root / "task" / "task.json"),
        ("replay source", lambda p: load_replay_records(p), None),
        ("perplexity set", lambda p: load_replay_records(p, what="perplexity set 'x'"), None),
        ("probe", lambda p: load_multiple_choice(p), None),
        ("run config", lambda p: load_run_config(p), None),
        ("rows", lambda p: read_rows(p), None),
        ("state", lambda p: read_json(p), None),
    ]


def _special_files(root: Path):
    """(what it is in the message, path) for every kind of file that is not a regular file."""
    fifo = root / "pipe.jsonl"
    os.mkfifo(fifo)
    sock = root / "sock.jsonl"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    link = root / "link-to-pipe.jsonl"
    link.symlink_to(fifo)
    folder = root / "folder.jsonl"
    folder.mkdir()
    return server, [
        ("a FIFO (named pipe)", fifo),
        ("a socket", sock),
        ("a FIFO (named pipe)", link),
        ("a character device", Path("/dev/zero")),
        ("a character device", Path("/dev/null")),
        ("a character device", Path("/dev/urandom")),
        ("a folder", folder),
    ]


def test_every_reader_refuses_every_special_file_at_once(tmp_path):
    server, specials = _special_files(tmp_path)
    try:
        for name, read, named in _readers(tmp_path):
            for kind, path in specials:
                if name in ("replay source", "perplexity set", "task file") and kind == "a folder":
                    continue  # a folder is a valid replay source (of .txt files) and task source
                with pytest.raises(GeReError) as err:
                    read(path)
                message = str(err.value)
                assert str(named or path) in message and kind in message and "regular file" in message, (name, message)
    finally:
        server.close()


def test_a_folder_replay_source_refuses_a_pipe_among_its_texts(tmp_path):
    (tmp_path / "a.txt").write_text("one paragraph of text\n")
    os.mkfifo(tmp_path / "b.txt")
    with pytest.raises(GeReError, match=r"b\.txt is a FIFO \(named pipe\), not a regular file"):
        load_replay_records(tmp_path)


def test_a_regular_file_behind_a_link_is_read(tmp_path):
    target = tmp_path / "real.jsonl"
    target.write_text('{"text": "hello there"}\n')
    (tmp_path / "link.jsonl").symlink_to(target)
    assert load_replay_records(tmp_path / "link.jsonl") == [("link:0", "hello there")]
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(GeReError, match="does not exist"):
        load_replay_records(tmp_path / "dangling.jsonl")


# ------------------------------------------------------------------------------------------ encodings

TEXTS = ["plain words", "café au lait", "naïve façade", "emoji 😀 here", "日本語のテキスト", "Ελληνικά"]
ENCODINGS = ["utf-8", "utf-8-sig", "cp1252", "latin-1", "utf-16", "utf-16-le", "utf-16-be", "utf-32"]


def _encodable(text: str, encoding: str) -> bool:
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return False
    return True


def _write(path: Path, kind: str, texts: list[str], encoding: str) -> int:
    """Write ``texts`` as a file of ``kind``; returns the line holding the first non-ASCII character."""
    if kind == ".jsonl":
        lines = [json.dumps({"text": t, "input": t, "label": "a"}, ensure_ascii=False) for t in texts]
    elif kind == ".csv":
        lines = ["input,label,text", *[f"{t},a,{t}" for t in texts]]
    elif kind == ".txt":
        lines = [x for t in texts for x in (t, "")]
    else:  # .yaml: a run config whose name is the text
        lines = ["model: x", *[f"name: {t}" for t in texts[:1]]]
    path.write_bytes("\n".join(lines).encode(encoding) + b"\n")
    return next((i for i, line in enumerate(lines, start=1) if not line.isascii()), 0)


@pytest.mark.parametrize("kind", [".jsonl", ".csv", ".txt", ".yaml"])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_utf8_with_or_without_bom_is_read_and_every_other_encoding_names_file_line_and_fix(tmp_path, kind, encoding):
    for number, text in enumerate(TEXTS):
        if not _encodable(text, encoding):
            continue
        path = tmp_path / f"f{number}{kind}"
        line = _write(path, kind, [f"first {text}", "second row"], encoding)

        def read(path=path):
            return load_run_config(path).name if kind == ".yaml" else [t for _, t in load_replay_records(path)]

        if encoding in ("utf-8", "utf-8-sig") or (encoding in ("cp1252", "latin-1") and not line):
            got = read()
            assert got == (f"first {text}" if kind == ".yaml" else [f"first {text}", "second row"])
        else:
            with pytest.raises(GeReError) as err:
                read()
            message = str(err.value)
            assert str(path) in message and "UTF-8" in message and "iconv" in message, message
            if encoding.startswith("utf-"):
                assert encoding[:6].upper() in message
            else:
                assert f"line {line}:" in message and "Windows-1252" in message


def test_a_csv_header_with_a_bom_is_the_plain_name(tmp_path):
    path = tmp_path / "task.csv"
    rows = "".join(f"review {i},{'good' if i % 2 else 'bad'}\n" for i in range(10))
    path.write_bytes(codecs.BOM_UTF8 + ("input,label\n" + rows).encode())
    task = load_task(TaskSpec(name="t", instruction="i", labels=["good", "bad"], source=str(path), test_size=2))
    assert len(task.train) == 8 and task.train[0].input.startswith("review")


def test_windows_1252_csv_task_names_file_line_and_fix(tmp_path):
    path = tmp_path / "task.csv"
    path.write_bytes("input,label\nnice,good\ncafé,bad\n".encode("cp1252"))
    with pytest.raises(GeReError, match=r"task\.csv, line 3: byte 0xE9 is not valid UTF-8 .*'café,bad'.*iconv"):
        load_task(TaskSpec(name="t", instruction="i", labels=["good", "bad"], source=str(path)))


@pytest.mark.parametrize("compress, name", [(gzip.compress, "gzip")])
def test_a_compressed_file_is_named_as_such(tmp_path, compress, name):
    path = tmp_path / "replay.jsonl"
    path.write_bytes(compress(b'{"text": "hello"}\n' * 50))
    with pytest.raises(GeReError, match=f"is a {name}-compressed file, not text; decompress it"):
        load_replay_records(path)


# --------------------------------------------------------------------------------------- JSON Lines

#: Characters `str.splitlines` splits at besides "\n": valid inside JSON strings.
SEPARATORS = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r"]


@pytest.mark.parametrize("separator", SEPARATORS, ids=lambda c: f"U+{ord(c):04X}")
def test_json_lines_split_on_newline_only(tmp_path, separator):
    texts = [f"before{separator}after", f"{separator}lead", f"trail{separator}", "plain"]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    assert [t for _, t in load_replay_records(path)] == texts


def test_crlf_lines_and_blank_lines(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_bytes(b'{"text": "one"}\r\n\r\n   \n{"text": "two"}\r\n')
    assert [t for _, t in load_replay_records(path)] == ["one", "two"]


# ----------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("size", [1, 999, 1000, 1001, 4096, 1 << 16])
def test_the_size_ceiling_is_checked_and_named(tmp_path, monkeypatch, size):
    monkeypatch.setenv("GERE_MAX_DATA_BYTES", "1000")
    assert limit_for("data") == 1000
    path = tmp_path / "texts.txt"
    path.write_bytes(b"x" * size)
    if size <= 1000:
        assert load_replay_records(path) == [("texts:0", "x" * size)]
    else:
        with pytest.raises(GeReError, match=r"above the 1000 bytes gere reads from a data file.*GERE_MAX_DATA_BYTES"):
            load_replay_records(path)


@pytest.mark.parametrize("value, limit", [("2K", 2048), ("3M", 3 << 20), ("1g", 1 << 30), ("512", 512)])
def test_the_ceiling_takes_sizes_with_units(monkeypatch, value, limit):
    monkeypatch.setenv("GERE_MAX_CONFIG_BYTES", value)
    assert limit_for("config") == limit
    assert limit_for("data") == LIMITS["data"]


@pytest.mark.parametrize("value", ["", "lots", "-5", "0", "1.5G", "G"])
def test_a_bad_ceiling_is_named(monkeypatch, value):
    monkeypatch.setenv("GERE_MAX_STATE_BYTES", value)
    if not value:
        assert limit_for("state") == LIMITS["state"]
        return
    with pytest.raises(GeReError, match="GERE_MAX_STATE_BYTES=.* is not a size"):
        limit_for("state")


def test_a_run_config_is_held_to_the_config_ceiling(tmp_path, monkeypatch):
    monkeypatch.setenv("GERE_MAX_CONFIG_BYTES", "64")
    path = tmp_path / "run.yaml"
    path.write_text("model: x\n" + "# a comment line\n" * 10)
    with pytest.raises(GeReError, match=rf"run config .*run\.yaml is {path.stat().st_size} bytes, above the 64 bytes"):
        load_run_config(path)


# ------------------------------------------------------------------------------------------------- CSV


@pytest.mark.parametrize(
    "text, message",
    [
        ("input,label\na,b,c\n", r"row 1 \(line 2\) has 3 field\(s\), the header has 2"),
        ("input,label\nonly\n", r"row 1 \(line 2\) has 1 field\(s\), the header has 2"),
        ("input,label\na,good\nb,bad,extra\n", r"row 2 \(line 3\) has 3 field"),
        ("input,input\na,b\n", r"line 1: the header names the column\(s\) \['input'\] more than once"),
        ('input,label\n"open,good\n', r"not valid CSV|has 1 field"),
    ],
)
def test_csv_shapes_are_refused_with_file_and_row(tmp_path, text, message):
    path = tmp_path / "data.csv"
    path.write_text(text)
    with pytest.raises(GeReError, match=message):
        read_rows(path)


def test_csv_quoted_newlines_and_long_fields_are_read(tmp_path):
    long = "word " * 60_000  # 300 KB in one field: above the csv module's default field limit
    path = tmp_path / "data.csv"
    path.write_text(f'input,label\n"two\nlines",good\n"{long}",bad\n\n"a, b",good\n')
    rows = read_rows(path)
    assert [r["input"] for r in rows] == ["two\nlines", long, "a, b"]


# ------------------------------------------------------------------------------------------------ JSON


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 50_000 + "]" * 50_000, "nested too deeply"),
        ('{"text": ' + "9" * 5000 + "}", "digits"),
        ('{"text": "\\ud800 alone"}', "lone surrogate"),
        ('{"text": "a"} trailing', "not valid JSON"),
        ('"just text"', "expected a JSON object, got str"),
        ("[1, 2]", "expected a JSON object, got list"),
    ],
)
def test_json_lines_structure_is_named_with_the_line(tmp_path, text, message):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "fine"}\n' + text + "\n")
    with pytest.raises(GeReError, match=message) as err:
        load_replay_records(path)
    assert f"{path}, line 2" in str(err.value)
    assert len(str(err.value)) < 400


def test_a_surrogate_pair_is_one_character(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "smile \\ud83d\\ude00"}\n')
    assert load_replay_records(path) == [("texts:0", "smile 😀")]


@pytest.mark.parametrize("value", ["42", '"text"', '{"rows": []}', "[1]", "[[]]", "null"])
def test_a_json_task_file_that_is_not_a_list_of_objects_is_named(tmp_path, value):
    path = tmp_path / "train.json"
    path.write_text(value)
    with pytest.raises(GeReError, match="expected a (JSON list of objects|JSON object)"):
        read_rows(path)


def test_read_text_drops_only_a_leading_bom(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(codecs.BOM_UTF8 + "a\ufeffb".encode())
    assert read_text(path) == "a\ufeffb"
