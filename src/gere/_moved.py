"""Old module paths kept for one release: each forwards its attributes to the new module with a warning."""

from __future__ import annotations

import importlib
import warnings


def forward(old: str, new: str):
    """A module ``__getattr__`` for the shim at ``old`` that reads attributes from ``new``."""
    warnings.warn(
        f"{old} moved to {new}; import from {new} (the old path goes away in the next release)",
        DeprecationWarning,
        stacklevel=3,
    )

    def __getattr__(name: str):
        return getattr(importlib.import_module(new), name)

    return __getattr__
