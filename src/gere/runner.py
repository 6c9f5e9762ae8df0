"""Deprecated path: moved to `gere.continual.runner` (docs/architecture.md); this alias goes away in the next release."""

from gere._moved import forward

__getattr__ = forward(__name__, "gere.continual.runner")
