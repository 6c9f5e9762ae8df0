import json

import pytest

from gere.errors import GeReError
from gere.replay.replay_set import (
    load_replay_records,
    load_replay_set,
    select_replay_set,
    tokenize_replay_set,
)

from tiny import tiny_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_first_and_random_selection(tmp_path):
    src = write_jsonl(tmp_path / "g.jsonl", [{"id": f"d{i}", "text": f"the river {i}"} for i in range(20)])
    first = load_replay_set(src, 5)
    assert first.ids == ("d0", "d1", "d2", "d3", "d4")
    r1 = load_replay_set(src, 5, selection="random", seed=7)
    r2 = load_replay_set(src, 5, selection="random", seed=7)
    r3 = load_replay_set(src, 5, selection="random", seed=8)
    assert r1 == r2 and r1.content_hash() == r2.content_hash()
    assert r1.content_hash() != r3.content_hash() and r1.content_hash() != first.content_hash()
    assert list(r1.ids) == sorted(r1.ids, key=lambda s: int(s[1:]))  # kept in source order


def test_custom_text_field_and_missing_field(tmp_path):
    src = write_jsonl(tmp_path / "g.jsonl", [{"body": "a b c"}])
    assert load_replay_set(src, 1, text_field="body").texts == ("a b c",)
    with pytest.raises(GeReError, match=r"line 1: no field 'text'.*set replay_text_field"):
        load_replay_set(src, 1)


def test_plain_text_paragraphs_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nstill first\n\nsecond para\n\n\n")
    (tmp_path / "b.txt").write_text("third")
    assert [t for _, t in load_replay_records(tmp_path / "a.txt")] == [
        "first para\nstill first",
        "second para",
    ]
    assert len(load_replay_records(tmp_path)) == 3


def test_malformed_jsonl_names_line(tmp_path):
    src = tmp_path / "g.jsonl"
    src.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(GeReError, match="g.jsonl, line 2"):
        load_replay_records(src)


def test_non_utf8_and_empty_texts(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(GeReError, match="not valid UTF-8"):
        load_replay_records(src)
    empty = write_jsonl(tmp_path / "e.jsonl", [{"text": "fine"}, {"text": "   "}])
    with pytest.raises(GeReError, match="empty or whitespace"):
        load_replay_set(empty, 2)


def test_zero_samples_and_short_texts(tmp_path):
    src = write_jsonl(tmp_path / "g.jsonl", [{"text": "the"}, {"text": "the river"}])
    with pytest.raises(GeReError, match="num_replay_samples to 1 or more"):
        load_replay_set(src, 0)
    rs = load_replay_set(src, 2)
    with pytest.raises(GeReError, match="1 token"):
        tokenize_replay_set(rs, tiny_tokenizer(), 8)


def test_truncation_to_max_length(tmp_path):
    src = write_jsonl(tmp_path / "g.jsonl", [{"text": " ".join(["the"] * 50)}])
    ids = tokenize_replay_set(load_replay_set(src, 1), tiny_tokenizer(), 12)
    assert len(ids[0]) == 12


def test_hub_loader_on_local_files(tmp_path):
    src = write_jsonl(tmp_path / "g.jsonl", [{"text": f"the city {i}"} for i in range(4)])
    rs = load_replay_set("hf:json", 3, data_files=str(src))
    assert rs.texts == ("the city 0", "the city 1", "the city 2")
    with pytest.raises(GeReError, match="no column 'body'"):
        load_replay_set("hf:json", 3, data_files=str(src), text_field="body")


def test_duplicate_ids_refused():
    with pytest.raises(GeReError, match="more than once"):
        select_replay_set([("x", "a b"), ("x", "c d")], 2)


def test_default_replay_set_is_fetched_once_then_read_from_the_cache(tmp_path, monkeypatch):
    """The Hub-loading code, run on a local dataset in the same layout (a train split with 'text')."""
    import datasets

    from gere.replay.default_set import default_replay_file

    source = write_jsonl(tmp_path / "slim.jsonl", [{"text": f"the city {i}", "meta": {"set": "x"}} for i in range(7)])
    path = default_replay_file(tmp_path / "cache", dataset="json", count=5, data_files=str(source))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["text"] for r in rows] == [f"the city {i}" for i in range(5)] and rows[0]["id"] == "json:train:0"
    assert load_replay_set(path, 5).texts[4] == "the city 4"

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    again = default_replay_file(tmp_path / "cache", dataset="json", count=5, data_files=str(source))
    assert again == path  # verified by its checksum, not fetched
    path.write_text(path.read_text().replace("city 3", "town 3"))
    with pytest.raises(GeReError, match="could not be fetched: ConnectionError: no network.*replay_source"):
        default_replay_file(tmp_path / "cache", dataset="json", count=5, data_files=str(source))


def test_a_huge_one_line_text_is_cut_before_tokenising(tmp_path):
    from gere.replay.replay_set import CHARS_PER_TOKEN, bounded_text

    huge = "the river " * 1_000_000  # 10 MB on one line
    assert len(bounded_text(huge, 16)) == 16 * CHARS_PER_TOKEN and bounded_text("short", 16) == "short"
    assert bounded_text("abcdef" * 100, 1, keep="end") == ("abcdef" * 100)[-CHARS_PER_TOKEN:]
    src = write_jsonl(tmp_path / "g.jsonl", [{"text": huge}, {"text": "the city of the river"}])
    ids = tokenize_replay_set(load_replay_set(src, 2), tiny_tokenizer(), 16)
    river = tiny_tokenizer()("the river", add_special_tokens=False)["input_ids"]
    assert ids[0] == river * 8 and len(ids[1]) == 5  # the first 16 tokens, as if the whole line were read
