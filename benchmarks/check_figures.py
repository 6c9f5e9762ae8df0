"""List the measured figures in the docs whose code changed since the commit that produced them.

Every table the demo, the study and `gere sweep` write ends with "Made by gere ..., commit <sha>". This
script finds those commits in docs/*.md and benchmarks/RESULTS.md and asks git whether ``src/`` changed
between each and HEAD; a figure whose code changed must be regenerated (run the command it names).

A doc may instead say that a later commit reproduced the figures exactly ("commit <old>, reproduced
exactly at commit <new>", after rerunning part of the command and comparing every metric); then only the
later commit is checked.

    python benchmarks/check_figures.py          # exit 1 when a figure is stale
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]
COMMIT = re.compile(r"commit ([0-9a-f]{7,40})")
REPRODUCED = re.compile(r"commit ([0-9a-f]{7,40}),?\s+reproduced\s+exactly\s+at\s+commit\s+([0-9a-f]{7,40})")


def changed_since(commit: str) -> list[str] | None:
    """Files under src/ changed between ``commit`` and HEAD (None when git does not know the commit)."""
    done = subprocess.run(["git", "-C", str(ROOT), "diff", "--name-only", commit, "HEAD", "--", "src"],
                          capture_output=True, text=True)  # fmt: skip
    return done.stdout.split() if done.returncode == 0 else None


def main() -> int:
    stale = 0
    for doc in DOCS:
        if not doc.exists():
            continue
        text = doc.read_text()
        superseded = {old for old, _ in REPRODUCED.findall(text)}
        for commit in sorted(set(COMMIT.findall(text)) - superseded):
            files = changed_since(commit)
            if files is None:
                print(f"{doc.relative_to(ROOT)}: commit {commit} is unknown to this checkout")
                stale += 1
            elif files:
                print(f"{doc.relative_to(ROOT)}: figures from {commit[:12]} are stale; changed since: {', '.join(files)}")
                stale += 1
            else:
                print(f"{doc.relative_to(ROOT)}: figures from {commit[:12]} match the code")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
