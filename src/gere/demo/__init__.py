"""The demo: a small continual fine-tuning run on real data and a real (135M) model, offline after set-up."""
