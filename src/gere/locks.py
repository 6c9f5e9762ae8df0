"""One writer per folder: a lock file held for the lifetime of a run or of a store's extraction.

`hold_lock(folder, what)` creates ``<folder>/.gere.lock`` exclusively (``O_CREAT | O_EXCL``) with the
holder's pid, host and start time, and removes it when the block ends. A second writer is refused with a
message naming the holder. A lock left by a process that no longer exists on this host (killed, crashed) is
stale: it is replaced, and the takeover is logged. A lock from another host cannot be checked from here and
is refused; the message says how to remove it once that run is known to be gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from gere.errors import GeReError
from gere.reading import read_json

logger = logging.getLogger(__name__)

LOCK_NAME = ".gere.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(path: Path) -> dict | None:
    try:
        holder = read_json(path, what="lock file")
    except GeReError:
        return None  # vanished, half written or not a file: treated as stale below
    return holder if isinstance(holder, dict) else None


def _take(path: Path, what: str) -> bool:
    """Create the lock file; False when it already exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "what": what}, f)  # fmt: skip
    return True


@contextlib.contextmanager
def hold_lock(folder: str | Path, what: str) -> Iterator[None]:
    """Hold ``folder``'s lock while the block runs (``what`` says what the holder does, for messages)."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # removed again if left empty
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GeReError(f"cannot create {folder} for {what}: {err.strerror}; choose a writable folder") from None
    path = folder / LOCK_NAME
    for _ in range(3):
        try:
            taken = _take(path, what)
        except OSError as err:
            raise GeReError(f"cannot write in {folder} ({err.strerror}) for {what}; choose a writable folder") from None
        if taken:
            break
        holder = _holder(path)
        if holder and holder.get("host") == socket.gethostname() and _alive(int(holder.get("pid", -1))):
            raise GeReError(
                f"{folder} is in use by process {holder['pid']} on {holder['host']} since {holder.get('started')} "
                f"({holder.get('what', 'another gere command')}); wait for it to finish or use another folder"
            )
        if holder and holder.get("host") != socket.gethostname():
            raise GeReError(
                f"{folder} is locked by process {holder.get('pid')} on host {holder.get('host')} since "
                f"{holder.get('started')}; if that run is gone, delete {path} and start again"
            )
        logger.warning("taking over the stale lock %s (%s)", path, holder or "unreadable")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        raise GeReError(f"could not take the lock {path}; another process keeps taking it")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        for made in created:  # a command refused before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                made.rmdir()
