"""Continual-learning baselines beside GeRe, each one module behind one interface (`gere.baselines.base`):

- `ewc`: elastic weight consolidation, a pull toward earlier tasks' weights;
- `task_replay`: experience replay of earlier tasks' training examples;
- `olora`: a LoRA adapter per task, kept orthogonal to the earlier ones (O-LoRA);
- `lwf`: learning without forgetting, distillation toward the previous stage on each task's rows.

`gere.baselines.registry.BASELINES` registers them by their run-config section; `settings` holds those
sections, torch-free. Nothing is imported here, so that reading settings stays torch-free.
"""
