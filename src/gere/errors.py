"""User-facing errors.

A `GeReError` carries a message that names the problem and the fix; the CLI prints it without a traceback
and exits with status 2.
"""

from __future__ import annotations


class GeReError(Exception):
    """An error caused by input or configuration that the user can fix.

    ``setting``: the `GeReConfig` field the fix is about, named in the message as in Python and in the
    run config; the command line rewrites that name as its own flag (see `gere.cli`).
    """

    def __init__(self, message: str, *, setting: str | None = None):
        super().__init__(message)
        self.setting = setting
