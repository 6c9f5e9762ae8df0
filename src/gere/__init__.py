"""gere: continual fine-tuning of LLMs with General Samples Replay (arXiv 2508.04676)."""

from __future__ import annotations

__version__ = "0.2.0"

# Imported on first use, so that `gere --help` and `import gere` stay fast.
_EXPORTS = {
    "GeReConfig": "gere.config",
    "GeReTrainer": "gere.trainer",
    "GeReSeq2SeqTrainer": "gere.trainer",
    "GeReSFTTrainer": "gere.trl_trainer",
    "GeReError": "gere.errors",
    "margin_loss": "gere.losses",
    "load_replay_set": "gere.replay.replay_set",
    "extract_store": "gere.store.extract",
    "open_store": "gere.store.format",
    "RunConfig": "gere.continual.run_config",
    "run_continual": "gere.continual.runner",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gere' has no attribute {name!r}")
