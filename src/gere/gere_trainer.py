"""Deprecated path: moved to `gere.trainer` (docs/architecture.md); this alias goes away in the next release."""

from gere._moved import forward

__getattr__ = forward(__name__, "gere.trainer")
