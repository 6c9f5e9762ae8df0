"""Continual runs: a task sequence trained in order with replay, evaluated after every task, reported.

- `run_config`: the YAML run config as dataclasses; `runner`: the loop; `checkpoint`: per-stage weights;
- `tasks` (specs, loading), `prompts` (how a task is put to the model);
- `evaluation` (task accuracy, perplexity), `multiple_choice` (general ability);
- `metrics` (AP, BWT, FWT, forgetting, F1 Avg), `report` / `plots` (one run), `compare` (several runs).
"""
