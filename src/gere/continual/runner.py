"""Continual runs: train on tasks in order with GeRe replay, evaluate after every task.

After the base model and after each task, every task of the sequence (seen and not yet seen) is evaluated,
plus general ability (multiple choice and held-out perplexity), filling a (T+1) x T accuracy matrix; with
``evaluation.schedule: needed`` only the cells the metrics need are (`gere.continual.schedule`), the others
are None. The one fixed replay set and its activation store are computed once, from the base model, before
task 1.

Files in the output folder:

- ``config.yaml``: the resolved run config;
- ``run_state.json``: finished stages with their evaluations and loss history (rewritten atomically after
  every stage; a run resumes from it);
- ``checkpoints/stage-<i>/``: weights (full fine-tuning) or adapter (LoRA) after task i, with the RNG
  state; written to a temporary folder and renamed, so a crash never leaves a half checkpoint;
- ``gere_store/``: the activation store (unless the config points elsewhere);
- ``results.json``, ``report.md`` and plots when the run ends (see `gere.continual.report`).

A run killed at any point and started again with ``resume=True`` redoes only the unfinished stage, and on
CPU with the same seed ends with the same metrics as an uninterrupted run.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import DataCollatorForSeq2Seq, set_seed

from gere.baselines.base import Baseline, Stage
from gere.baselines.registry import run_baselines
from gere.batching import IGNORE_INDEX
from gere.continual.checkpoint import (
    checkpoint_beside,
    checkpoint_dir,
    checkpoint_plan,
    load_checkpoint,
    prune_checkpoints,
    with_lora,
)
from gere.continual.console import TRAIN_LOG, quiet_trainer, stage_line
from gere.continual.evaluator import Evaluator
from gere.continual.preflight import check_label_words, check_run
from gere.continual.prompts import build_train_features
from gere.continual.report import build_results, learning_warnings, write_report
from gere.continual.run_config import RunConfig
from gere.continual.run_folder import (
    STATE_FILE,
    cached_base_eval,
    claim,
    config_digest,
    existing_state,
    input_digests,
    store_base_eval,
)
from gere.continual.schedule import general_at, tasks_at
from gere.continual.tasks import TaskData, load_task
from gere.continual.tracking import SequenceTracker, check_report_to, stage_metrics
from gere.continual.training_args import check_training_args, stage_training_args
from gere.errors import GeReError
from gere.faults import train_step_callback
from gere.io_utils import atomic_write_json, safe_join
from gere.locks import hold_lock
from gere.modeling import load_model_and_tokenizer
from gere.parts import GRAD_SHARE, LOGGED, TRAINER_LOGGED
from gere.precision import Precision, resolve_bf16
from gere.provenance import provenance
from gere.replay.replay_set import ReplaySet
from gere.store.extract import store_dir, store_for
from gere.store.format import ActivationStore, open_store
from gere.trainer import GeReTrainer

logger = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------ the run


@dataclass
class _Run:
    """What one continual run holds while it trains: settings, data, model, replay, and its state."""

    cfg: RunConfig
    out: Path
    state: dict[str, Any]
    tasks: list[TaskData]
    model: Any
    tokenizer: Any
    evaluator: Evaluator
    replay_set: ReplaySet | None
    store: ActivationStore | None
    progress: bool
    started: float
    tracker: SequenceTracker | None = None
    baselines: dict[str, Baseline] = field(default_factory=dict)  # by name (`gere.baselines.registry`)
    precision: Precision = Precision(False, "fp32")

    def save_state(self) -> None:
        self.state["elapsed_s"] = time.time() - self.started
        atomic_write_json(self.out / STATE_FILE, self.state)


def run_continual(
    cfg: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    base_eval_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Run the whole sequence and write the report; returns the results dict (see `gere.continual.report`).

    ``base_eval_cache``: a JSON file where runs of one comparison share the base model's evaluation.
    """
    check_run(cfg)  # model, tasks and output folder, before the lock creates the folder
    with hold_lock(cfg.output_dir, f"gere run {cfg.name!r}"):
        return _run_locked(cfg, resume, overwrite, progress, base_eval_cache)


def _run_locked(cfg: RunConfig, resume: bool, overwrite: bool, progress: bool, base_eval_cache) -> dict[str, Any]:
    started = time.time()
    out = Path(cfg.output_dir)
    # Everything is checked (flags, tasks, model, store) before a previous run's files are removed.
    state = existing_state(cfg, resume=resume, overwrite=overwrite)
    fresh = state is None
    precision = _precision(cfg, state)
    check_training_args(cfg, out, precision)
    set_seed(cfg.seed)
    tasks = _load_tasks(cfg, out)
    evaluator = Evaluator(cfg, tasks)  # reads the probe and held-out texts (and logs doubts about the inputs)
    replay_set = cfg.gere.load_replay_set() if cfg.gere.parts else None  # read before the model loads
    model, tokenizer = _load_model(cfg)
    check_label_words(cfg, [t.spec for t in tasks], tokenizer)  # trainable and told apart by the scorer
    evaluator.check(tokenizer)  # every held-out set has something to score, before the store is extracted
    replay_set, store = _prepare_replay(cfg, replay_set, model, tokenizer, out, state, progress)
    claim(cfg, fresh=fresh)
    if cfg.finetuning != "full":
        model = with_lora(cfg, model)
    run = _Run(cfg, out, state or _new_state(cfg, model, store, precision), tasks, model, tokenizer, evaluator,
               replay_set, store, progress, started, precision=precision)  # fmt: skip
    run.tracker = SequenceTracker(check_report_to(cfg.report_to, out), cfg.name, out, cfg.to_dict())
    run.baselines = run_baselines(cfg)
    # Before any training: which stages gere export --stage will find, what they cost, the setting that trades it.
    print(checkpoint_plan(cfg, model, len(tasks)), flush=True)
    if not fresh:
        _resume(run)
        _track_history(run)  # a resumed run's tracked run holds the whole sequence too
    if not run.state["accuracy_matrix"]:
        _evaluate_base(run, base_eval_cache)
    for index in range(run.state["stages_done"], len(tasks)):
        _run_stage(run, index)
    return _finish(run)


def _load_tasks(cfg: RunConfig, out: Path) -> list[TaskData]:
    tasks = [load_task(spec) for spec in cfg.task_specs()]
    for task in tasks:
        safe_join(out, task.spec.name)  # task names become folder names: keep them inside the run
    _check_classes(tasks)
    return tasks


def _load_model(cfg: RunConfig):
    model, tokenizer = load_model_and_tokenizer(
        cfg.model, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code
    )
    tokenizer.padding_side = "right"
    if tokenizer.eos_token_id is None:  # found now, not after the extraction pass
        raise GeReError(
            f"the tokenizer of {cfg.model} has no eos token, which ends every training answer; add one "
            "(tokenizer.add_special_tokens({'eos_token': ...}), then save_pretrained into the model folder) "
            "or use a model whose tokenizer defines eos"
        )
    return model, tokenizer


def _prepare_replay(cfg: RunConfig, replay_set, model, tokenizer, out: Path, state: dict | None, progress: bool):
    """The replay set, and the activation store from the base model (once, before any training)."""
    gere = cfg.gere
    if not gere.parts:
        return None, None
    if gere.reference != "store" or not gere.needs_reference:
        return replay_set, None
    if state is None:
        store = store_for(gere, model, tokenizer, replay_set, out, progress=progress, rebuild_own=True)
    else:
        folder = store_dir(gere, out)
        store = open_store(folder)
        if store.manifest["model"] != state["base_model"]:
            raise GeReError(f"{folder} no longer belongs to this run's base model; use --overwrite")
    return replay_set, store


_ANNOUNCED: set[str] = set()


def _precision(cfg: RunConfig, state: dict | None) -> Precision:
    """The run's training precision: resolved from ``training.bf16`` on this machine when the run starts, and
    kept from its state when it resumes (a run does not change precision half-way). Printed once a process."""
    if state is not None and state.get("precision") in ("bf16", "fp16", "fp32"):
        precision = Precision(state["precision"] == "bf16", "as the run started", fp16=state["precision"] == "fp16")
    else:
        precision = resolve_bf16(cfg.training.bf16, fp16=cfg.training.trainer_args.get("fp16") is True)
    line = precision.describe()
    if line not in _ANNOUNCED:
        _ANNOUNCED.add(line)
        print(line, flush=True)
    return precision


def _new_state(cfg: RunConfig, model, store: ActivationStore | None, precision: Precision) -> dict[str, Any]:
    from gere.store.fingerprint import model_fingerprint

    return {
        "config_digest": config_digest(cfg),
        "precision": precision.name,
        "inputs": input_digests(cfg),
        "base_model": store.manifest["model"] if store is not None else model_fingerprint(model),
        "stages_done": 0,
        "accuracy_matrix": [],
        "general": [],
        "loss_history": [],
        "per_task_s": [],
        "per_task_steps": [],
        "eval_s": 0.0,
        "elapsed_s": 0.0,
    }


def _resume(run: _Run) -> None:
    done = run.state["stages_done"]
    run.started -= run.state.get("elapsed_s", 0.0)
    if done > 0:
        for baseline in run.baselines.values():  # shapes the model for the checkpoint's weights (O-LoRA)
            baseline.resume(run.model, done)
        load_checkpoint(checkpoint_dir(run.out, done), run.model, run.cfg)
        for baseline in run.baselines.values():
            baseline.load(checkpoint_dir(run.out, done))
    logger.info("resuming %s after stage %d of %d", run.out, done, len(run.tasks))


def _evaluate_base(run: _Run, cache) -> None:
    t0 = time.time()
    base = cached_base_eval(cache, run.cfg, run.state["base_model"])
    if base is None:
        base = run.evaluator(run.model, run.tokenizer, "base", run.progress)
        store_base_eval(cache, run.cfg, run.state["base_model"], base)
    run.state["accuracy_matrix"].append(base["accuracies"])
    run.state["general"].append(base["general"])
    run.state["eval_s"] += time.time() - t0
    run.save_state()
    names = [t.spec.name for t in run.tasks]
    run.tracker.log_stage(0, stage_metrics(names, base["accuracies"], base["general"]), 0)
    print(stage_line("base", names, base["accuracies"], base["general"]), flush=True)


def _run_stage(run: _Run, index: int) -> None:
    """Train task ``index``, log its loss parts, evaluate everything, checkpoint, then record the stage."""
    cfg, state, name = run.cfg, run.state, run.tasks[index].spec.name
    t0 = time.time()
    trainer, stage = _stage_trainer(run, index)
    _train(trainer, run.model)
    step_offset = _steps_before(state)
    rows = [{"step": step_offset + int(entry["step"]), "task": name, **{k: entry.get(k) for k in LOGGED},
             **{k: entry[k] for k in (*TRAINER_LOGGED, *GRAD_SHARE) if entry.get(k) is not None}}
            for entry in trainer.state.log_history if "loss" in entry]  # fmt: skip
    state["loss_history"].extend(rows)
    run.tracker.log_training(rows)
    for baseline_name, baseline in run.baselines.items():
        _report(run, index, baseline_name, baseline.after_task(stage))
    train_s = time.time() - t0
    t1 = time.time()
    # The checkpoint is written while the stage is evaluated (evaluation leaves the weights alone).
    schedule, count = cfg.evaluation.schedule, len(run.tasks)
    with checkpoint_beside(run.out, index + 1, run.model, cfg, extra=list(run.baselines.values())):
        evaluation = run.evaluator(run.model, run.tokenizer, f"after {name}", run.progress,
                                   only=tasks_at(schedule, index + 1, count),
                                   general_part=general_at(schedule, index + 1, count))  # fmt: skip
        state["eval_s"] += time.time() - t1
    state["accuracy_matrix"].append(evaluation["accuracies"])
    state["general"].append(evaluation["general"])
    state["per_task_s"].append(train_s)
    state.setdefault("per_task_steps", []).append(int(trainer.state.global_step))
    state["stages_done"] = index + 1
    run.save_state()
    names = [t.spec.name for t in run.tasks]
    metrics = stage_metrics(names, evaluation["accuracies"], evaluation["general"])
    run.tracker.log_stage(index + 1, metrics, _steps_before(state))
    print(stage_line(f"after {name}", names, evaluation["accuracies"], evaluation["general"]), flush=True)
    prune_checkpoints(run.out, cfg)
    shutil.rmtree(run.out / "stages" / f"{index + 1}-{name}", ignore_errors=True)


#: What the Trainer's accelerate sets on the model it prepares: under bf16 (or fp16) an autocast ``forward``
#: and the ``_original_forward`` it replaced, and a mark that makes every later Trainer leave the model as is.
_PREPARED_KEYS = ("forward", "_original_forward", "_is_accelerate_prepared")


def _train(trainer: GeReTrainer, model) -> None:
    """``trainer.train()``, then ``model`` as it was before the Trainer prepared it. Left prepared, a model
    that trained the previous task in this process would run the evaluation and the next task's LwF targets
    and online reference under autocast, where a run resumed from the checkpoint (a model never prepared) runs
    them in fp32, and it would train the next task under this Trainer's wrapper, not one of its own.
    accelerate's ``unwrap_model(keep_fp32_wrapper=False)`` unwinds past transformers' own decorators of
    ``forward`` (``return_dict=False`` then fails), so the entries are put back as they were."""
    own = {key: value for key, value in vars(model).items() if key in _PREPARED_KEYS}
    try:
        trainer.train()
    finally:
        for key in _PREPARED_KEYS:
            vars(model).pop(key, None)
        vars(model).update(own)


def _track_history(run: _Run) -> None:
    names = [t.spec.name for t in run.tasks]
    run.tracker.log_training(run.state["loss_history"])
    ends = [0, *itertools.accumulate(run.state.get("per_task_steps") or [])]  # the step where each stage ended
    for stage, (accuracies, general) in enumerate(zip(run.state["accuracy_matrix"], run.state["general"], strict=True)):
        run.tracker.log_stage(stage, stage_metrics(names, accuracies, general), ends[stage] if stage < len(ends) else None)


def _steps_before(state: dict[str, Any]) -> int:
    """Optimisation steps of the finished stages: where this stage's steps start in the loss history."""
    steps = state.get("per_task_steps")
    if steps is not None and len(steps) == state["stages_done"]:
        return sum(steps)
    return max((h["step"] for h in state["loss_history"]), default=0)  # a state written before 0.2


def _stage_trainer(run: _Run, index: int) -> tuple[GeReTrainer, Stage]:
    """The trainer of task ``index``, with the run's baselines' rows, sampler and loss parts (in registry order)."""
    task, tokenizer = run.tasks[index], run.tokenizer
    name = task.spec.name
    training = run.cfg.training_for(name)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    stage = Stage(index, len(run.tasks), run.cfg, run.model, tokenizer, [t.train for t in run.tasks], collator,
                  lambda t, examples: build_train_features(run.tasks[t].spec, examples, tokenizer, training.max_length),
                  training, build_train_features(task.spec, task.train, tokenizer, training.max_length))  # fmt: skip
    for baseline in run.baselines.values():
        stage.rows = baseline.train_rows(stage)
    for baseline_name, baseline in run.baselines.items():
        _report(run, index, baseline_name, baseline.before_task(stage))
    samplers = [s for s in (b.train_sampler(stage) for b in run.baselines.values()) if s is not None]
    if len(samplers) > 1:
        raise GeReError(f"{len(samplers)} baselines each give a train sampler; at most one may decide the batches")
    trainer = GeReTrainer(
        model=run.model,
        args=stage_training_args(run.cfg, name, run.out / "stages" / f"{index + 1}-{name}", run.progress,
                                 run.precision.bf16),
        train_dataset=stage.rows,
        data_collator=collator,
        processing_class=tokenizer,
        gere_config=run.cfg.gere,
        activation_store=run.store,
        check_store_model=False,  # the store is the base model's (checked in _prepare_replay); the model trains on
        replay_set=run.replay_set,
        callbacks=[train_step_callback()],  # crash tests (gere.faults); a no-op unless GERE_FAULT is set
        penalties=[part for b in run.baselines.values() for part in b.loss_parts(stage)],
        train_sampler=samplers[0] if samplers else None,
    )
    label = f"task {index + 1}/{len(run.tasks)} {name}"
    return quiet_trainer(trainer, label, run.out / TRAIN_LOG, run.progress), stage


def _report(run: _Run, index: int, name: str, rows: list[dict]) -> None:
    """A baseline's report rows of task ``index``, kept in the run's state (and results) under ``baselines``."""
    if rows:
        run.state.setdefault("baselines", []).extend({"stage": index + 1, "baseline": name, **r} for r in rows)


def _finish(run: _Run) -> dict[str, Any]:
    cfg, state, tasks = run.cfg, run.state, run.tasks
    results = build_results(
        cfg.name,
        cfg.method_name(),
        cfg.to_dict(),
        [t.spec.name for t in tasks],
        [min(len(t.test), cfg.evaluation.test_limit or len(t.test)) for t in tasks],
        state["accuracy_matrix"],
        general=state["general"],
        loss_history=state["loss_history"],
        timing={"total_s": time.time() - run.started, "per_task_s": state["per_task_s"], "eval_s": state["eval_s"],
                "train_steps": _steps_before(state)},  # fmt: skip
    )
    results["provenance"] = {**provenance(), "precision": run.precision.name, "precision_reason": run.precision.reason}
    results["input_warnings"] = run.evaluator.doubts
    results["evaluations"] = evaluations_made(cfg.evaluation.schedule, state)
    if state.get("baselines"):
        results["baselines"] = state["baselines"]
    if run.replay_set is not None:
        results["replay_set"] = {"requested": cfg.gere.num_replay_samples, "used": len(run.replay_set)}
    paths = write_report(run.out, results)
    run.tracker.finish(results, paths)
    for line in learning_warnings(results):
        logger.warning("%s: %s", cfg.name, line)
    return results


def evaluations_made(schedule: str, state: dict[str, Any]) -> dict[str, Any]:
    """The run's schedule and the task and general evaluations it made (cells and stages not None)."""
    matrix, general = state["accuracy_matrix"], state["general"]
    return {"schedule": schedule, "task_evaluations": sum(v is not None for row in matrix for v in row),
            "task_cells": sum(len(row) for row in matrix),
            "general_evaluations": sum(e.get("evaluated", True) for e in general), "stages": len(general)}  # fmt: skip


def _check_classes(tasks: list[TaskData]) -> None:
    """Training on one class only teaches "always answer X": almost surely a data or field-mapping mistake."""
    for task in tasks:
        classes = sorted({ex.label for ex in task.train})
        if len(classes) < 2:
            raise GeReError(
                f"task {task.spec.name!r}: the training data holds only the class {classes} of the label words "
                f"{task.spec.labels}; give examples of at least two classes "
                "(check `label_field` and `label_map`)"
            )
