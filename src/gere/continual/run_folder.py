"""A run's folder: what it holds, when a command may use it, and what a resumed run must find unchanged.

``config.yaml`` (the resolved config), ``run_state.json`` (finished stages; a run resumes from it),
``checkpoints/``, ``stages/`` (the current task's Trainer folder), ``results.json``, ``report.md`` and plots.
A run's identity is its config (`config_digest`) and the content of every file it reads (`input_digests`:
task data, replay texts, probe and held-out texts), so ``--resume`` refuses a run whose inputs changed and
says which file did. Nothing is deleted before the new run has been checked (`claim`, called last).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import yaml

from gere.config_reading import read_yaml_mapping
from gere.continual.console import TRAIN_LOG
from gere.continual.general_benchmarks import suite_folders
from gere.continual.report import REPORT_FILES
from gere.continual.run_config import RunConfig
from gere.errors import GeReError, shown
from gere.io_utils import HF_PREFIX, atomic_write_json, atomic_write_text, sha256_file
from gere.reading import read_json

logger = logging.getLogger(__name__)

STATE_FILE = "run_state.json"
CONFIG_FILE = "config.yaml"
#: A run's own files and folders: a fresh run (``--overwrite``, or a first task never finished) removes them.
RUN_FILES = (STATE_FILE, CONFIG_FILE, "results.json", "report.md", "checkpoints", "stages", TRAIN_LOG)
#: (section, key) of settings added after runs were first written, left out of a run's identity when unset.
#: Settings added after runs were recorded, with the value that means "not set": at that value they leave
#: a run's identity as it was.
LATER_SETTINGS = (("evaluation", "lm_eval_batch_size", None), ("benchmark", "tasks", None), ("gere", "grad_share_every", 0),
                  ("evaluation", "schedule", "full"), ("benchmark", "prompts", "gere"),
                  ("evaluation", "general_suite", None), ("evaluation", "general_suite_dir", None),
                  ("evaluation", "general_suite_limit", None), ("evaluation", "general_suite_limits", {}),
                  ("evaluation", "general_suite_seed", 0), ("evaluation", "general_suite_max_length", 2048))  # fmt: skip


#: Settings that say where and how a run is kept, not what it computes: not part of its identity.
NOT_IDENTITY = ("output_dir", "keep_checkpoints", "cache_dir", "report_to")


def _identity(cfg: RunConfig) -> dict:
    data = cfg.to_dict()
    for key in NOT_IDENTITY:
        data.pop(key, None)
    return data


def _canonical(value):
    """Numbers by value: a float that is a whole number is written as the int (``warmup_steps: 0`` read
    back from config.yaml as ``0.0`` is the same setting)."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def config_digest(cfg: RunConfig, data: dict | None = None) -> str:
    """Identity of a run: everything but where it is written, how many checkpoints are kept and where it is
    tracked, with numbers compared by value (so a run resumes from its own config.yaml). ``data``: ``cfg``'s
    identity mapping, when changed (`_as_written_digest`)."""
    data = _canonical(_without_later_settings(_identity(cfg) if data is None else data))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _as_written_digest(cfg: RunConfig) -> str | None:
    """The digest of ``cfg`` with its relative paths as its file wrote them: what a run started before they
    were read from the config file's folder recorded (`gere.continual.config_paths`)."""
    written = getattr(cfg, "paths_as_written", None)
    if not written:
        return None
    from gere.continual.config_paths import as_written

    return config_digest(cfg, as_written(_identity(cfg), written))


def _without_later_settings(data: dict) -> dict:
    """Settings added later count only when set, so a run started before they existed still resumes."""
    for section, key, unset in LATER_SETTINGS:
        if isinstance(data.get(section), dict) and data[section].get(key, unset) == unset:
            data[section].pop(key, None)
    return data


def _legacy_digest(cfg: RunConfig) -> str:
    """The digest run states held before numbers were compared by value (0 and 0.0 differed)."""
    data = _without_later_settings(_identity(cfg))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def same_config(state: dict, cfg: RunConfig) -> bool:
    """Whether the run recorded in ``state`` was started with ``cfg``."""
    return state.get("config_digest") in (config_digest(cfg), _legacy_digest(cfg), _as_written_digest(cfg))


def _flat(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    out: dict[str, object] = {}
    for key, v in items:  # an empty section adds no key: it equals a section left out
        name = f"{prefix}{key}" if str(key).startswith("[") or not prefix else f"{prefix}.{key}"
        out.update(_flat(v, name) if isinstance(v, dict | list) else {name: v})
    return out


def config_differences(old: dict, cfg: RunConfig) -> list[str]:
    """``key: old -> new`` for every setting of ``cfg`` that differs from the mapping ``old`` (a run's
    config.yaml), values shown short; where and how the run is kept is left out."""
    before = _flat({k: v for k, v in old.items() if k not in NOT_IDENTITY})
    now = _flat(_identity(cfg))
    missing = object()

    def text(value) -> str:
        return "(not set)" if value is missing else shown(value, 40)

    keys = sorted(set(before) | set(now), key=str)
    return [f"{k}: {text(before.get(k, missing))} -> {text(now.get(k, missing))}" for k in keys
            if _canonical(before.get(k, missing)) != _canonical(now.get(k, missing))]  # fmt: skip


def read_state(out: Path) -> dict | None:
    """A run folder's ``run_state.json``, or None when there is none; a damaged one is an error."""
    path = Path(out) / STATE_FILE
    if not path.exists():
        return None
    state = read_json(path, what="run state", fix="the run cannot be resumed from it; use another --output-dir")
    if not isinstance(state, dict) or "stages_done" not in state:
        raise GeReError(f"run state {path} is not a state written by gere; use another --output-dir")
    return state


def differences_from(out: Path, cfg: RunConfig) -> str:
    """The settings of ``cfg`` that differ from the run in ``out`` (its config.yaml), in words."""
    try:
        differences = config_differences(read_yaml_mapping(out / CONFIG_FILE), cfg)
    except GeReError:
        return f"its {CONFIG_FILE} cannot be read, so the settings that differ cannot be named"
    if not differences:
        return "its config was written by another version of gere"
    more = f"; and {len(differences) - 6} more" if len(differences) > 6 else ""
    return "these settings differ: " + "; ".join(differences[:6]) + more


def resume_refusal(out: Path, cfg: RunConfig) -> str:
    """Why ``cfg`` cannot resume the run in ``out``, and what to do instead (never a flag that would throw
    the finished stages away)."""
    return (
        f"{out} holds a run of another config ({differences_from(out, cfg)}); --resume continues a run only with "
        f"the config it started with. Resume it with its own config (gere run {out / CONFIG_FILE} --resume), "
        "or give this config another --output-dir"
    )


def _files(source: str | None) -> list[Path]:
    if not source or str(source).startswith(HF_PREFIX):
        return []
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []


def input_digests(cfg: RunConfig) -> dict[str, str]:
    """sha256 of every local file the run reads (``hf:`` sources by their name: the hub keeps versions)."""
    ev = cfg.evaluation
    sources = [s.source for s in cfg.task_specs()] + [cfg.gere.replay_source, ev.general_mc, ev.mc_dev]
    sources += list(ev.perplexity_sets.values())
    sources += [str(Path(ev.suite_dir()) / folder) for folder in suite_folders(ev.general_suite_names)]
    digests = {}
    for source in sources:
        if source and str(source).startswith(HF_PREFIX):
            digests[str(source)] = str(source)
        for file in _files(source):
            digests[str(file)] = sha256_file(file)
    return digests


def existing_state(cfg: RunConfig, *, resume: bool, overwrite: bool) -> dict | None:
    """The state to resume from, or None to start afresh; refuses what the flags do not allow. Deletes
    nothing: `claim` does, once everything else has been checked."""
    out = Path(cfg.output_dir)
    state = read_state(out)
    if not (state is not None or (out / "results.json").exists()) or overwrite:
        return None
    if state is not None and state.get("stages_done") == 0 and not (out / "results.json").exists():
        logger.warning("%s holds a run that did not finish its first task; starting it over", out)
        return None
    if not resume:
        raise GeReError(
            f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it "
            "(or choose another --output-dir)"
        )
    if state is None:
        raise GeReError(f"{out} holds results.json but no {STATE_FILE}, so there is no run to resume; use another "
                        "--output-dir, or --overwrite to replace those results")  # fmt: skip
    if not same_config(state, cfg):
        raise GeReError(resume_refusal(out, cfg))
    _check_inputs(state, input_digests(cfg), out)
    return state


def _check_inputs(state: dict, now: dict[str, str], out: Path) -> None:
    before = state.get("inputs")
    if before is None:  # a state written before inputs were recorded
        return
    # Files by their absolute path: a run started when relative paths were read from the working directory
    # recorded them relative to it (`gere.continual.config_paths`).
    before, now = _absolute_keys(before), _absolute_keys(now)
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        raise GeReError(
            f"{out} holds a run whose input files changed since it started: {', '.join(changed[:5])}"
            f"{' ...' if len(changed) > 5 else ''}; resuming would mix old and new data in one result. Restore "
            "them to resume it, or run with the new files in another --output-dir"
        )


def _absolute_keys(digests: dict[str, str]) -> dict[str, str]:
    return {k if k.startswith(HF_PREFIX) else os.path.abspath(os.path.expanduser(k)): v for k, v in digests.items()}


def claim(cfg: RunConfig, *, fresh: bool) -> Path:
    """Make the output folder the new run's: with ``fresh`` remove a previous run's files, then write the
    config."""
    out = Path(cfg.output_dir)
    if fresh:
        for name in (*RUN_FILES, *REPORT_FILES):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    # A process killed inside an atomic write (SIGKILL, power loss) leaves its temporary file beside the
    # target (`gere.io_utils.atomic_path`: ``.<name>.<random>.tmp``); the run holds its folder's lock, so
    # no writer of its own is using one now.
    for name in dict.fromkeys((*RUN_FILES, *REPORT_FILES)):  # RUN_FILES holds config.yaml
        for leftover in out.glob(f".{glob.escape(name)}.*.tmp"):
            if leftover.is_file():
                leftover.unlink()
    atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return out


def base_eval_key(cfg: RunConfig, base_model: str) -> str:
    """Every schedule evaluates the base model whole (`gere.continual.schedule`), so runs of either share it."""
    evaluation = {k: v for k, v in cfg.to_dict()["evaluation"].items() if k != "schedule"}
    data = {"model": base_model, "tasks": [s.to_dict() for s in cfg.task_specs()], "eval": evaluation}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def cached_base_eval(path, cfg: RunConfig, base_model: str) -> dict | None:
    """Runs of one comparison share the base model's evaluation (same model, tasks and eval settings)."""
    if path is None or not Path(path).exists():
        return None
    data = read_json(path, what="base evaluation cache", fix="delete it to evaluate the base model again")
    return data.get(base_eval_key(cfg, base_model)) if isinstance(data, dict) else None


def store_base_eval(path, cfg: RunConfig, base_model: str, evaluation: dict) -> None:
    if path is None:
        return
    path = Path(path)
    data = read_json(path, what="base evaluation cache") if path.exists() else {}
    data = data if isinstance(data, dict) else {}
    data[base_eval_key(cfg, base_model)] = evaluation
    atomic_write_json(path, data)
