"""User-facing errors.

A `GeReError` carries a message that names the problem and the fix; the CLI prints it without a traceback
and exits with status 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class GeReError(Exception):
    """An error caused by input or configuration that the user can fix.

    ``setting``: the `GeReConfig` field the fix is about, named in the message as in Python and in the
    run config; the command line rewrites that name as its own flag (see `gere.cli`).
    """

    def __init__(self, message: str, *, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


def nearest(name: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the choice closest to a mistyped ``name``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_settings(checks: list[tuple[bool, str, str]], obj: Any) -> None:
    """Raise for the first failed check of ``(ok, setting name, what it must be)``, naming the setting, its
    value and what it must be (`gere.continual.run_config.from_dict` puts the section in front)."""
    for ok, name, need in checks:
        if not ok:
            raise GeReError(f"{name} = {getattr(obj, name)!r} is not valid: it must be {need}", setting=name)
