"""Continual-learning baselines beside GeRe: EWC (`gere.baselines.ewc`, a loss part the trainer adds) and
experience replay of earlier tasks (`gere.baselines.task_replay`, examples the runner adds)."""
