"""gere: continual fine-tuning of LLMs with General Samples Replay (arXiv 2508.04676)."""

__version__ = "0.1.0"
