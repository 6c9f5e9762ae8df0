"""Entry points that put GeRe into other training frameworks (LLaMA-Factory: `gere-lf`)."""
