"""gere: continual fine-tuning of LLMs with General Samples Replay (arXiv 2508.04676)."""

from __future__ import annotations

__version__ = "0.1.0"

# Imported on first use, so that `gere --help` and `import gere` stay fast.
_EXPORTS = {
    "GeReConfig": "gere.gere_config",
    "GeReTrainer": "gere.gere_trainer",
    "GeReSeq2SeqTrainer": "gere.gere_trainer",
    "GeReError": "gere.errors",
    "margin_loss": "gere.losses",
    "load_replay_set": "gere.replay_set",
    "extract_store": "gere.store",
    "open_store": "gere.store",
    "RunConfig": "gere.run_config",
    "run_continual": "gere.runner",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gere' has no attribute {name!r}")
