"""The replay set and how its samples reach training.

- `gere.replay.replay_set`: read general texts from files, folders or ``hf:`` datasets and select the
  fixed replay set (torch-free);
- `gere.replay.sampler`: the one seeded order in which replay samples are drawn, and batch interpolation;
- `gere.replay.batches`: datasets, collators and padded replay batches for the Trainer.

Nothing is imported here, so that ``gere.replay.replay_set`` stays torch-free. `PLACEMENTS` is defined here,
not in `gere.replay.sampler`, so that `gere.config` checks ``interpolation_placement`` against the sampler's
own list without importing torch.
"""

#: Where batch interpolation puts the replay samples in each global batch (`gere.replay.sampler`).
PLACEMENTS = ("even", "random")
