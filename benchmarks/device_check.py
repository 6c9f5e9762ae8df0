"""The device check: what only a CUDA device can tell, in one short run.

On a CUDA device it runs the GPU-marked tests (``pytest -m gpu`` on the test files that hold them, as a
subprocess, printing pytest's summary line), then measures, under bf16 autocast (weights and optimizer in
fp32, as a run trains):

- a training step of `GeReTrainer` (fused AdamW step included) for ``none`` and ``ce+tm`` (a separate replay
  batch, ``dy`` margin weight, the store of the base model): seconds per step, task tokens per second and all
  tokens per second (task and replay rows), median of the timed steps after warm-up ones;
- the activation store's extraction (`gere.store.extract.extract_store`, identity hashing and the CPU pass
  over the states included): texts per second and tokens per second, median of the timed repeats;
- the peak memory of each (``torch.cuda.max_memory_allocated``),

and prints them with the command line and the device; ``--out`` gets the same as JSON. Without CUDA it runs the
same figures on the CPU (the CPU path: bf16 autocast where the CPU computes bf16 natively, else fp32, as
``training.bf16: auto`` chooses; peak memory is the process's peak RSS), says so, and skips the GPU tests with
a line saying why. Exit status 1 when a GPU test fails.

Models: ``--tiny`` (a small Llama built in code, a character tokenizer), ``--model FOLDER`` (a local model
folder; default ``data/demo/model``, the demo's converted SmolLM2-135M-Instruct that ``gere data demo --out
data/demo`` writes), and ``--model FOLDER --random-init`` (the folder's ``config.json`` and tokenizer only,
seeded random weights: the same shapes, so the same speed and memory, where the 517 MB of weights cannot go).

On a lent GPU machine (its ``python3`` holds torch, transformers, accelerate, peft and pytest; gere runs from
``src/`` without installing), first here, once, put the demo model's config and tokenizer (3.5 MB) in an
ignored folder that the call carries::

    echo /.device_model/ >> .git/info/exclude
    mkdir -p .device_model && cp data/demo/model/{config.json,tokenizer.json,tokenizer_config.json} .device_model/

then run, with ``carry: [".device_model"]`` and a timeout of 300 s (estimated, not yet measured on a GPU: about
a minute and a half once the machine is up, the GPU tests ~40 s and the figures ~30 s of it)::

    PYTHONUNBUFFERED=1 python3 benchmarks/device_check.py --model .device_model --random-init --out $OUT/device_check.json

or, with nothing carried, the tiny model (same timeout)::

    PYTHONUNBUFFERED=1 python3 benchmarks/device_check.py --tiny --out $OUT/device_check.json

The CPU path, here (12-55 s measured on 2 busy cores)::

    .venv/bin/python benchmarks/device_check.py --tiny --out /tmp/device_check.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
if importlib.util.find_spec("gere") is None:  # a bare machine: gere from this checkout, not installed
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from bench_common import GENSIM_WHEELS, command_line, environment, general_texts, load_model, median  # noqa: E402
from transformers import DataCollatorForSeq2Seq, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from gere.config import GeReConfig  # noqa: E402
from gere.errors import GeReError  # noqa: E402
from gere.io_utils import atomic_write_json  # noqa: E402
from gere.precision import resolve_bf16  # noqa: E402
from gere.replay.replay_set import ReplaySet  # noqa: E402
from gere.store.extract import extract_store  # noqa: E402
from gere.store.format import StoreSpec  # noqa: E402
from gere.trainer import GeReTrainer  # noqa: E402

DEFAULT_MODEL = ROOT / "data" / "demo" / "model"
OBJECTIVES = ("none", "ce+tm")
# (task batch, task length, replay batch, replay texts, replay length, extraction batch, warm-up steps,
#  timed steps, extraction repeats): a GPU is given work enough to be busy, the CPU path only seconds of it.
SIZES = {"cuda": (8, 256, 8, 256, 256, 16, 3, 10, 3), "cpu": (4, 64, 4, 32, 64, 8, 1, 3, 2)}
SIZE_FLAGS = ("batch", "length", "replay_batch", "replay_texts", "replay_length", "extract_batch", "warmup",
              "steps", "extract_repeats")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tiny", action="store_true", help="a small Llama built in code (hidden 256, 4 layers)")
    which.add_argument("--model", default=str(DEFAULT_MODEL), help="a local model folder (default: %(default)s)")
    p.add_argument("--random-init", action="store_true",
                   help="build --model from its config.json with seeded random weights (no weights file needed)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast where the device computes bf16 natively (a run's training.bf16: auto)")
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("--no-tests", action="store_true", help="skip the GPU tests (the figures only)")
    p.add_argument("--tests-timeout", type=int, default=240, help="seconds the GPU tests may take")
    for flag in SIZE_FLAGS:
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, help="default: by device (SIZES)")
    args = p.parse_args(argv)
    if not args.tiny and not (Path(args.model) / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json there; make the demo's model with `gere data demo --out "
                "data/demo`, pass another model folder, or use --tiny")  # fmt: skip
    for flag, default in zip(SIZE_FLAGS, SIZES[device_type()]):
        value = getattr(args, flag)
        if value is None:
            setattr(args, flag, default)
        elif value < (0 if flag == "warmup" else 1):
            p.error(f"--{flag.replace('_', '-')} {value}: give at least {0 if flag == 'warmup' else 1}")
    return args


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def describe_device() -> str:
    if device_type() == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"cuda: {props.name} ({props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs)"
    return f"cpu: {environment()['machine']} (the CPU path: no CUDA device)"


def sync() -> None:
    if device_type() == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if device_type() == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> int:
    """Bytes: CUDA's peak allocation since `reset_peak`; on the CPU the process's peak RSS so far."""
    if device_type() == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------- the tests


def gpu_test_files() -> list[str]:
    """The test files with a test decorated ``@pytest.mark.gpu``, relative to the repository's root."""
    marked = re.compile(r"^\s*@pytest\.mark\.gpu\b", re.MULTILINE)
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if marked.search(p.read_text()))


def gpu_tests(args) -> dict:
    """``pytest -m gpu`` on the test files holding GPU tests, in a subprocess; its summary and counts."""
    files = gpu_test_files()
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", *files]
    shown = " ".join(["python", *command[1:]])
    if device_type() != "cuda" or args.no_tests:
        why = "--no-tests" if args.no_tests else "no CUDA device, so the CPU path skips them"
        print(f"GPU tests: skipped ({why}); on a CUDA device this runs {shown}", flush=True)
        return {"ran": False, "reason": why, "command": shown}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.tests_timeout)
        output, returncode = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output, returncode = f"{err.stdout or ''}\nstopped after {args.tests_timeout} s (--tests-timeout)", -1
    lines = [line for line in output.splitlines() if line.strip()]
    summary = next((line.strip("= ") for line in reversed(lines) if re.search(r"\d+ (passed|failed|error|skipped)", line)),
                   lines[-1] if lines else "no output")  # fmt: skip
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    if returncode != 0:
        print("\n".join(lines[-40:]))
    print(f"GPU tests: {summary} ({shown})", flush=True)
    return {"ran": True, "command": shown, "summary": summary, "counts": counts, "returncode": returncode,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


# ---------------------------------------------------------------------------------------------- inputs


def build_model(args, texts: list[str]):
    """``(model, tokenizer, description)`` in fp32 on the CPU."""
    if args.tiny:
        return load_model(argparse.Namespace(model="tiny"), texts)
    folder = Path(args.model)
    if not args.random_init:
        from gere.modeling import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(folder)
        return model, tokenizer, f"{folder} (its weights)"
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    return model, tokenizer, f"{folder} (its config, seeded random weights)"


def joined_texts(texts: list[str], tokenizer, n: int, length: int) -> list[str]:
    """``n`` texts of at least ``length`` tokens each, consecutive paragraphs joined (so rows are full)."""
    out, parts, count, i = [], [], 0, 0
    while len(out) < n:
        text = texts[i % len(texts)]
        parts.append(text)
        count += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if count >= length:
            out.append(" ".join(parts))
            parts, count = [], 0
        i += 1
        if i > 50 * (n + len(texts)):
            raise GeReError(f"the texts are too short for rows of {length} tokens; lower --length / --replay-length")
    return out


def task_rows(tokenizer, texts: list[str], rows: int, length: int) -> list[dict]:
    """Causal-LM rows of exactly ``length`` tokens, every token counting in the loss."""
    rows_out = []
    for text in joined_texts(texts, tokenizer, rows, length):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
        rows_out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": list(ids)})
    return rows_out


# ---------------------------------------------------------------------------------------------- figures


def extraction_figure(model, tokenizer, replay_set: ReplaySet, config: GeReConfig, args, work: Path):
    """The store, extracted once to warm up (kept for ``ce+tm``'s steps), then ``extract_repeats`` timed times."""
    spec = StoreSpec.for_config(config)
    store = extract_store(model, tokenizer, replay_set, work / "store", spec, progress=False)
    times = []
    reset_peak()
    for repeat in range(args.extract_repeats):
        sync()
        start = time.perf_counter()
        extract_store(model, tokenizer, replay_set, work / f"store{repeat}", spec, progress=False)
        sync()
        times.append(time.perf_counter() - start)
    seconds, tokens = median(times), int(store.manifest["tokens"])
    figure = {"texts": len(replay_set), "tokens": tokens, "seconds": seconds, "all_seconds": times,
              "texts_per_s": len(replay_set) / seconds, "tokens_per_s": tokens / seconds,
              "peak_memory_bytes": peak_memory(), "batch": spec.batch_size, "max_length": spec.max_length}  # fmt: skip
    print(f"store extraction: {len(replay_set)} texts, {tokens:,} tokens in {seconds:.3f} s (median of "
          f"{len(times)}): {figure['texts_per_s']:,.1f} texts/s, {figure['tokens_per_s']:,.0f} tokens/s; "
          f"peak memory {figure['peak_memory_bytes'] / 2**30:.2f} GiB", flush=True)  # fmt: skip
    return store, figure


class StepClock(TrainerCallback):
    """Wall time of each optimisation step, optimizer included, the device synchronised at both ends."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        self.times.append(time.perf_counter() - self._start)


def step_figure(objective: str, base, tokenizer, rows, store, config: GeReConfig, bf16: bool, args, work: Path):
    """``objective``'s training step on a fresh copy of ``base``: seconds, tokens per second, peak memory."""
    model = copy.deepcopy(base)
    training = TrainingArguments(
        output_dir=str(work / f"train-{objective}"), per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps, learning_rate=1e-5, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="no", report_to=[], bf16=bf16, use_cpu=device_type() != "cuda", optim="adamw_torch_fused",
        seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    cfg = config if objective == "ce+tm" else GeReConfig(objective="none")
    clock = StepClock()
    trainer = GeReTrainer(model=model, args=training, train_dataset=rows, processing_class=tokenizer,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), gere_config=cfg,
                          activation_store=store if cfg.parts else None, callbacks=[clock])  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # each step's logged dict: log_history keeps them
    reset_peak()
    trainer.train()
    memory = peak_memory()
    timed = clock.times[args.warmup :]
    seconds = median(timed)
    replay_tokens = args.replay_batch * store.manifest["tokens"] / len(store) if cfg.parts else 0.0
    task_tokens = args.batch * args.length
    logged = [h for h in trainer.state.log_history if "loss" in h][-1]
    parts = {k: logged[k] for k in ("loss", "task_ce", "replay_ce", "replay_margin", "margin_weight") if k in logged}
    del trainer, model
    gc.collect()
    if device_type() == "cuda":
        torch.cuda.empty_cache()
    return {"seconds": seconds, "all_seconds": timed, "task_tokens_per_s": task_tokens / seconds,
            "tokens_per_s": (task_tokens + replay_tokens) / seconds, "task_tokens": task_tokens,
            "replay_tokens": replay_tokens, "peak_memory_bytes": memory, "last_logged": parts}  # fmt: skip


def print_steps(steps: dict, precision: str, args) -> None:
    print(f"training step, {precision}; task batch {args.batch} x {args.length} tokens, for ce+tm a replay batch of "
          f"{args.replay_batch} x <= {args.replay_length}; median of {args.steps} steps after {args.warmup}:")  # fmt: skip
    for objective, s in steps.items():
        parts = ", ".join(f"{k} {v:.4g}" for k, v in s["last_logged"].items())
        print(f"  {objective:6} {s['seconds']:.4f} s/step, {s['task_tokens_per_s']:,.0f} task tokens/s, "
              f"{s['tokens_per_s']:,.0f} tokens/s, peak memory {s['peak_memory_bytes'] / 2**30:.2f} GiB ({parts})")
    print(f"  ce+tm / none step time: {steps['ce+tm']['seconds'] / steps['none']['seconds']:.2f}", flush=True)


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    command = command_line(__file__, argv)
    device = describe_device()
    env = environment()
    print(f"device check: {command}\ndevice: {device}; torch {env['torch']}, transformers {env['transformers']}",
          flush=True)  # fmt: skip
    tests = gpu_tests(args)
    replay_pool, task_pool, source = general_texts(GENSIM_WHEELS)
    model, tokenizer, described = build_model(args, replay_pool + task_pool)
    tokenizer.padding_side = "right"
    model.to(device_type())
    precision = resolve_bf16({"auto": "auto", "bf16": True, "fp32": False}[args.precision], device_type())
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {described}, {params / 1e6:.1f}M parameters; {precision.describe()}; texts: {source}", flush=True)
    texts = joined_texts(replay_pool, tokenizer, args.replay_texts, args.replay_length)
    replay_set = ReplaySet(tuple(f"g{i}" for i in range(len(texts))), tuple(texts))
    config = GeReConfig(objective="ce+tm", margin_weight="dy", replay_batch_size=args.replay_batch,
                        replay_max_length=args.replay_length, extract_batch_size=args.extract_batch)  # fmt: skip
    rows = task_rows(tokenizer, task_pool, args.batch * (args.warmup + args.steps), args.length)
    with tempfile.TemporaryDirectory(prefix="gere-device-check-") as tmp:
        work = Path(tmp)
        store, extraction = extraction_figure(model, tokenizer, replay_set, config, args, work)
        model.cpu()  # each step figure's peak memory is its own copy's: the trainer moves that to the device
        if device_type() == "cuda":
            torch.cuda.empty_cache()
        steps = {obj: step_figure(obj, model, tokenizer, rows, store, config, precision.bf16, args, work)
                 for obj in OBJECTIVES}  # fmt: skip
    print_steps(steps, precision.describe(), args)
    result = {
        "command": command, "device": device, "path": "gpu" if device_type() == "cuda" else "cpu",
        "precision": precision.name, "precision_reason": precision.reason, "model": described, "parameters": params,
        "texts": source, "environment": env, "gpu_tests": tests, "extraction": extraction, "step": steps,
        "peak_memory_bytes": max([extraction["peak_memory_bytes"], *(s["peak_memory_bytes"] for s in steps.values())]),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device_type() == "cuda" else "peak RSS (ru_maxrss)",
        "sizes": {flag: getattr(args, flag) for flag in SIZE_FLAGS}, "seconds": time.perf_counter() - started,
    }  # fmt: skip
    bad = [k for k, v in figures(result).items() if not (math.isfinite(v) and v > 0)]
    if args.out:
        atomic_write_json(args.out, result)
    print(f"{'wrote ' + args.out + ' ' if args.out else ''}({result['seconds']:.1f} s in all)"
          + (f"; figures not finite and positive: {bad}" if bad else ""), flush=True)  # fmt: skip
    return 1 if bad or (tests["ran"] and tests["returncode"] != 0) else 0


def figures(result: dict) -> dict[str, float]:
    """Every measured figure of a result, by a dotted name (what must be finite and positive)."""
    out = {f"extraction.{k}": float(result["extraction"][k]) for k in ("texts_per_s", "tokens_per_s", "peak_memory_bytes")}
    for objective, s in result["step"].items():
        out.update({f"step.{objective}.{k}": float(s[k]) for k in ("seconds", "task_tokens_per_s", "tokens_per_s",
                                                                   "peak_memory_bytes")})  # fmt: skip
    return out


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GeReError as err:
        sys.exit(f"error: {err}")
