"""Deprecated path: moved to `gere.config` (docs/architecture.md); this alias goes away in the next release."""

from gere._moved import forward

__getattr__ = forward(__name__, "gere.config")
