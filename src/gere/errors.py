"""User-facing errors.

A `GeReError` carries a message that names the problem and the fix; the CLI prints it without a traceback
and exits with status 2.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable
from typing import Any

#: No message is longer than this: a value that slipped through unbounded is cut in the middle.
MAX_MESSAGE = 1200


class GeReError(Exception):
    """An error caused by input or configuration that the user can fix.

    ``setting``: the `GeReConfig` field the fix is about, named in the message as in Python and in the
    run config; the command line rewrites that name as its own flag (see `gere.cli`).
    """

    def __init__(self, message: str, *, setting: str | None = None):
        message = str(message)
        if len(message) > MAX_MESSAGE:
            left = len(message) - 1100
            message = f"{message[:800]} [... {left} characters left out ...] {message[-300:]}"
        super().__init__(message)
        self.setting = setting


def nearest(name: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the choice closest to a mistyped ``name``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_task_names(tasks: list[str] | None, known: list[str], benchmark: str = "cl15", flag: str = "--tasks") -> list[str]:
    """``tasks`` chosen from a benchmark's ``known`` task names (or every known task when none is chosen),
    refusing unknown and repeated names with the nearest known one (``flag``: the option or setting named)."""
    if not tasks:
        return list(known)
    for task in tasks:
        if task not in known:
            raise GeReError(f"{flag}: {benchmark} has no task {task!r}{nearest(task, known)}; choose from "
                            f"{', '.join(known)}")  # fmt: skip
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:
        raise GeReError(f"{flag} names {', '.join(repeated)} more than once; name each task once")
    return list(tasks)


def check_settings(checks: list[tuple[bool, str, str]], obj: Any) -> None:
    """Raise for the first failed check of ``(ok, setting name, what it must be)``, naming the setting, its
    value and what it must be (`gere.continual.run_config.from_dict` puts the section in front)."""
    for ok, name, need in checks:
        if not ok:
            raise GeReError(f"{name} = {shown(getattr(obj, name))} is not valid: it must be {need}", setting=name)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6


def shown(value: Any, limit: int = 120) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters, whatever the value: a YAML alias
    bomb, a 10 MB string or an integer of 5,000 digits is looked at only as far as it is shown."""
    if isinstance(value, str | bytes):  # sliced first: reprlib would repr a bytes value whole
        text = repr(value[:limit])
        return text if len(value) <= limit and len(text) <= limit else text[: limit - 3] + "..."
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):  # an int too long to turn into text, or a self-referencing value
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = 300) -> str:
    """``text`` (another library's message, a line of a file) cut to ``limit`` characters for a message."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 5] + " ..."
