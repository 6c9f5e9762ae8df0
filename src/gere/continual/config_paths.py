"""Relative paths in a run config file: one rule for the files a run reads.

A relative path that names something a run *reads* (task sources, ``gere.replay_source``,
``evaluation.general_mc`` / ``mc_dev`` / ``perplexity_sets`` / ``general_suite_dir`` /
``lm_eval_include_path``, ``benchmark.data_dir``, and ``model`` when it is a local folder or file there) is
read from the config file's folder, wherever the command runs from: a config and its data travel together
(``gere run w/full.yaml`` from anywhere reads ``w/base/mood`` for ``source: base/mood``). The config is
rewritten with the absolute paths, so the run's own ``config.yaml`` names them absolutely and resumes from
any folder.

What a run *writes* (``output_dir``, ``cache_dir``, ``gere.store_dir``) is relative to the working
directory, as the output of every command-line tool is (the Trainer's ``output_dir``, ``llamafactory-cli``,
lm-eval's ``--output_path``): one config run from two folders writes two runs where each was started.
Paths given on the command line (``--set``, ``--model``, ``--output-dir``) are taken as typed, from the
working directory.

Configs written before this rule read paths from the working directory. A relative path with nothing of
that name beside the config but something in the working directory is still read from there, with a
warning naming the path to write instead; ``hf:`` sources and hub model ids are left alone. The values as
written are kept (`as_written`) so that a run started under the old rule still resumes
(`gere.continual.run_folder`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from gere.io_utils import HF_PREFIX

logger = logging.getLogger(__name__)

#: (section, key) of single paths a run reads; ``"*"`` as the key: every value of that mapping.
INPUTS = (("gere", "replay_source"), ("evaluation", "general_mc"), ("evaluation", "mc_dev"),
          ("evaluation", "perplexity_sets", "*"), ("evaluation", "general_suite_dir"), ("benchmark", "data_dir"))  # fmt: skip


def resolve_config_paths(data: dict, config_file: str | Path) -> dict[tuple, str]:
    """Rewrite, in ``data`` (a run config file's mapping), every relative path the run reads as an absolute
    path beside ``config_file``; returns ``{key path: (value as written, value now)}`` for each one rewritten."""
    folder = Path(config_file).expanduser().parent
    written: dict[tuple, tuple[str, str]] = {}
    tasks = data.get("tasks")
    for index, task in enumerate(tasks if isinstance(tasks, list) else []):
        if isinstance(task, dict):
            _resolve(task, ("tasks", index, "source"), folder, written)
    for section_name, key, *each in INPUTS:
        section = data.get(section_name)
        if not isinstance(section, dict):
            continue
        if each:
            mapping = section.get(key)
            for name in list(mapping) if isinstance(mapping, dict) else []:
                _resolve(mapping, (section_name, key, name), folder, written)
        else:
            _resolve(section, (section_name, key), folder, written)
    _resolve(data, ("model",), folder, written, only_if_there=True)
    section = data.get("evaluation")  # lm-eval task folders: beside the config, as they always were
    include = section.get("lm_eval_include_path") if isinstance(section, dict) else None
    if isinstance(include, str) and include and not Path(include).expanduser().is_absolute():
        section["lm_eval_include_path"] = str((folder / include).resolve())
    return written


def _resolve(mapping: dict, where: tuple, folder: Path, written: dict, only_if_there: bool = False) -> None:
    key = where[-1]
    value = mapping.get(key)
    if not isinstance(value, str) or not value or value.startswith(HF_PREFIX):
        return
    path = Path(value).expanduser()
    if path.is_absolute():
        return
    beside = os.path.abspath(folder / path)
    if not os.path.lexists(beside):
        if only_if_there:  # a model that is not there is a hub id (or a folder of the working directory)
            return
        if os.path.lexists(path):
            logger.warning(
                "%s %r is read from the working directory (%s): nothing of that name is beside the config (%s). "
                "Relative paths in a run config are read from the config file's folder; write %r or an absolute "
                "path", dotted(where), value, os.path.abspath(path), beside, os.path.relpath(os.path.abspath(path), folder),
            )  # fmt: skip
            return
    mapping[key] = beside
    written[where] = (value, beside)


def dotted(where: tuple) -> str:
    """``("tasks", 0, "source")`` as ``tasks[0].source``."""
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in where).lstrip(".")


def as_written(data: dict, written: dict[tuple, tuple[str, str]]) -> dict:
    """``data`` (a config's plain mapping) with the paths `resolve_config_paths` rewrote put back as written
    (where an override has not changed them since)."""
    for where, (value, resolved) in written.items():
        at = data
        for key in where[:-1]:
            at = at[key] if isinstance(at, list) and key < len(at) else at.get(key) if isinstance(at, dict) else None
            if at is None:
                break
        else:
            if isinstance(at, dict) and at.get(where[-1]) == resolved:
                at[where[-1]] = value
    return data
