"""Continual-learning baselines beside GeRe, as loss parts the trainer adds: EWC (`gere.baselines.ewc`)."""
