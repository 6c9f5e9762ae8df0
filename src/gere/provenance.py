"""What produced a result: package versions, the code's git commit, the machine. Recorded in results.json
so that every published figure can name the code and the machine that made it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from functools import cache
from pathlib import Path


@cache
def provenance() -> dict[str, object]:
    """``{"gere", "commit", "dirty", "python", "torch", "transformers", "machine", "threads"}``; the commit is
    None when gere does not run from a git checkout, ``dirty`` whether its source had uncommitted changes.
    Both are read when this module is first imported (with the rest of the code that runs), not later, so a
    checkout changing under a long sweep does not relabel its results."""
    import torch
    import transformers

    from gere import __version__

    commit, dirty = _LOADED
    return {
        "gere": __version__,
        "commit": commit,
        "dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""),
        "threads": torch.get_num_threads(),
        "argv": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
    }


def _git_state(folder: Path) -> tuple[str | None, bool | None]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = git("status", "--porcelain", "--", ".")
    return commit, bool(status)


_LOADED = _git_state(Path(__file__).resolve().parent)
