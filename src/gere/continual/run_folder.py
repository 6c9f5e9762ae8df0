"""A run's folder: what it holds, when a command may use it, and what a resumed run must find unchanged.

``config.yaml`` (the resolved config), ``run_state.json`` (finished stages; a run resumes from it),
``checkpoints/``, ``stages/`` (the current task's Trainer folder), ``results.json``, ``report.md`` and plots.
A run's identity is its config (`config_digest`) and the content of every file it reads (`input_digests`:
task data, replay texts, probe and held-out texts), so ``--resume`` refuses a run whose inputs changed and
says which file did. Nothing is deleted before the new run has been checked (`claim`, called last).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import yaml

from gere.continual.run_config import RunConfig
from gere.errors import GeReError
from gere.io_utils import HF_PREFIX, atomic_write_json, atomic_write_text, sha256_file

logger = logging.getLogger(__name__)

STATE_FILE = "run_state.json"
CONFIG_FILE = "config.yaml"
RUN_FILES = (STATE_FILE, CONFIG_FILE, "results.json", "report.md", "checkpoints", "stages")
OWN_STORE = "gere_store"  # where a run keeps its store unless gere.store_dir points elsewhere
#: (section, key) of settings added after runs were first written, left out of a run's identity when unset.
LATER_SETTINGS = (("evaluation", "lm_eval_batch_size"), ("benchmark", "tasks"))


def config_digest(cfg: RunConfig) -> str:
    """Identity of a run: everything but where it is written, how many checkpoints are kept and where it is
    tracked."""
    data = cfg.to_dict()
    for key in ("output_dir", "keep_checkpoints", "cache_dir", "report_to"):
        data.pop(key, None)
    # Settings added later count only when set, so a run started before they existed still resumes.
    for section, key in LATER_SETTINGS:
        if isinstance(data.get(section), dict) and data[section].get(key, 0) is None:
            del data[section][key]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


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
    state_path = out / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else None
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
    if state is None or state["config_digest"] != config_digest(cfg):
        raise GeReError(
            f"{out} holds a run with a different config; --resume needs the same config "
            "(use --overwrite to start over, or another --output-dir)"
        )
    _check_inputs(state, input_digests(cfg), out)
    return state


def _check_inputs(state: dict, now: dict[str, str], out: Path) -> None:
    before = state.get("inputs")
    if before is None:  # a state written before inputs were recorded
        return
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        raise GeReError(
            f"{out} holds a run whose input files changed since it started: {', '.join(changed[:5])}"
            f"{' ...' if len(changed) > 5 else ''}; resuming would mix old and new data in one result. Restore "
            "them, or start over with --overwrite"
        )


def claim(cfg: RunConfig, *, fresh: bool) -> Path:
    """Make the output folder the new run's: with ``fresh`` remove a previous run's files, then write the
    config."""
    out = Path(cfg.output_dir)
    if fresh:
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return out


def base_eval_key(cfg: RunConfig, base_model: str) -> str:
    data = {"model": base_model, "tasks": [s.to_dict() for s in cfg.task_specs()], "eval": cfg.to_dict()["evaluation"]}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def cached_base_eval(path, cfg: RunConfig, base_model: str) -> dict | None:
    """Runs of one comparison share the base model's evaluation (same model, tasks and eval settings)."""
    if path is None or not Path(path).exists():
        return None
    data = json.loads(Path(path).read_text())
    return data.get(base_eval_key(cfg, base_model))


def store_base_eval(path, cfg: RunConfig, base_model: str, evaluation: dict) -> None:
    if path is None:
        return
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[base_eval_key(cfg, base_model)] = evaluation
    atomic_write_json(path, data)
