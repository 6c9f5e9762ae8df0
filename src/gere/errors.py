"""User-facing errors.

A `GeReError` carries a message that names the problem and the fix; the CLI prints it without a traceback
and exits with status 2.
"""

from __future__ import annotations


class GeReError(Exception):
    """An error caused by input or configuration that the user can fix."""
