"""A benchmark conversion built beside its destination and put in place only when every file is written.

`gere data` writes ``<out>/<task>/{train,test}.json`` for many tasks from many source files. A source that
turns out to be truncated or malformed half-way must not leave some tasks new, some old and a
``manifest.json`` that vouches for files it no longer describes. So each task is written into a staging
folder inside ``<out>`` (same file system: a rename moves it); nothing under ``<out>``'s own names changes
until every task has been read and written. Then the old manifest is moved aside, each task folder is
swapped in by renames, and the new ``manifest.json`` is written last: a folder whose manifest is missing
holds an unfinished conversion, and one with a manifest holds exactly what it lists.

Tasks converted earlier and not converted again keep their folders and their manifest entries.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gere.io_utils import atomic_write_json, sha256_file

MANIFEST = "manifest.json"


class StagedConversion:
    """Use as a context manager: `write_task` for each task, then `commit`; an exception before `commit`
    finishes removes the staging folder and leaves ``out`` as it was."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.entries: dict[str, dict[str, Any]] = {}
        self.stage: Path | None = None

    def __enter__(self) -> StagedConversion:
        self.out.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.out))
        return self

    def __exit__(self, *exc) -> None:
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)

    def write_task(self, task: str, splits: dict[str, list[dict[str, str]]], documents: dict[str, Any] | None = None,
                   **info: Any) -> dict[str, Any]:  # fmt: skip
        """Write ``splits`` (``{"train": rows, "test": rows}``) of ``task`` into the staging folder, and each of
        ``documents`` (``{file name: JSON value}``, e.g. the task's recorded prompt) beside them; ``info`` (its
        source, ...) goes into the task's manifest entry with each file's sha256 (and a split's rows)."""
        assert self.stage is not None, "use StagedConversion as a context manager"
        files = {}
        for split, rows in splits.items():
            path = self.stage / task / f"{split}.json"
            atomic_write_json(path, rows)
            files[f"{task}/{split}.json"] = {"rows": len(rows), "sha256": sha256_file(path)}
        for name, value in (documents or {}).items():
            path = self.stage / task / name
            atomic_write_json(path, value)
            files[f"{task}/{name}"] = {"sha256": sha256_file(path)}
        self.entries[task] = {**info, "files": files}
        return self.entries[task]

    def commit(self, **top: Any) -> Path:
        """Swap the staged tasks into ``out`` and write ``manifest.json`` last (``top``: its other keys)."""
        assert self.stage is not None, "use StagedConversion as a context manager"
        manifest = {**top, "tasks": {**self._kept_entries(), **self.entries}}
        replaced = self.stage / ".replaced"
        replaced.mkdir()
        if (self.out / MANIFEST).exists():  # from here until the new one is written, no manifest vouches
            (self.out / MANIFEST).rename(replaced / MANIFEST)
        for task in self.entries:
            if (self.out / task).exists():
                (self.out / task).rename(replaced / task)
            (self.stage / task).rename(self.out / task)
        atomic_write_json(self.out / MANIFEST, manifest)
        return self.out

    def _kept_entries(self) -> dict[str, dict[str, Any]]:
        """The earlier manifest's entries of tasks not converted now whose files are still as it lists."""
        path = self.out / MANIFEST
        try:
            old = json.loads(path.read_text(encoding="utf-8"))["tasks"]
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        if not isinstance(old, dict):
            return {}
        kept = {}
        for task, entry in old.items():
            if task in self.entries or not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
                continue
            files = [(self.out / name, info) for name, info in entry["files"].items()]
            if all(p.is_file() and isinstance(i, dict) and i.get("sha256") == sha256_file(p) for p, i in files):
                kept[task] = entry
        return kept
