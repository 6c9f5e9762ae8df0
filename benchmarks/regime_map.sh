#!/usr/bin/env bash
# The regime map of docs/study.md section 6, in its priority order. Every call resumes: finished runs are
# kept, so running this again continues where it stopped. Usage: benchmarks/regime_map.sh [OUT] [PYTHON]
# (OUT defaults to runs/map; PYTHON to .venv/bin/python; set PYTHONPATH to a pinned clone's src to pin).
# The order puts first what a verdict rests on: the balanced weight (the one the gradient share points to)
# and the controls, on 3 seeds, in the demo's regime.
set -euo pipefail
OUT=${1:-runs/map}
PY=${2:-.venv/bin/python}
demo() { "$PY" -m gere.cli demo --no-progress --resume --set gere.grad_share_every=4 "$@"; }
R1=(--set training.learning_rate=3e-5)  # the demo's rate when the map began (it is 1e-4 since)
R2=(--set training.learning_rate=1e-4)
R3=(--set training.max_steps=-1 --set training.num_train_epochs=3 --set training.lr_scheduler_type=cosine
    --set training.warmup_steps=0.1)
# R1 (the demo's regime when the map began): none and the balanced weight on every seed, ce+tm (dy) on seed 0 for its gradient
# share, ce on every seed; then R2; then the other new weights.
demo --methods none ce+tm-gb1 --seeds 0 --output-dir "$OUT/r1" "${R1[@]}"
demo --methods none --seeds 1,2 --output-dir "$OUT/r1" "${R1[@]}"
demo --methods ce+tm-gb1 --seeds 1,2 --output-dir "$OUT/r1" "${R1[@]}"
demo --methods ce+tm --seeds 0 --output-dir "$OUT/r1" "${R1[@]}"
# ce in R1 on every seed: the control GeRe's claim (c) is about (TM against CE replay alone), and the bf16
# rerun of study section 1's three methods.
demo --methods ce --seeds 0,1,2 --output-dir "$OUT/r1" "${R1[@]}"
# R2 (1e-4): the baselines the demo regime's rule reads, then the balanced weight, on every seed.
demo --methods none ce --seeds 0,1,2 --output-dir "$OUT/r2" "${R2[@]}"
demo --methods ce+tm-gb1 --seeds 0,1,2 --output-dir "$OUT/r2" "${R2[@]}"
# R2: the paper's fixed w = 1 on every seed (gb:1 chose weights of 1.1-2.0 in R1, and gb works in one process
# only, so a library default must be a weight like this one), and dy on seed 0 for its gradient share.
# Added when R2's baselines had chosen 1e-4 for the demo, before these ran.
demo --methods ce+tm-w1 --seeds 0,1,2 --output-dir "$OUT/r2" "${R2[@]}"
demo --methods ce+tm --seeds 0 --output-dir "$OUT/r2" "${R2[@]}"
# R1: the other new weights, seed 0 first.
demo --methods ce+tm-dy10 ce+tm-warm8 --seeds 0 --output-dir "$OUT/r1" "${R1[@]}"
# R1: the other weights' seeds 1 and 2.
demo --methods ce+tm ce+tm-dy10 ce+tm-warm8 --seeds 1,2 --output-dir "$OUT/r1" "${R1[@]}"
# R3 (3 epochs a task, cosine decay, 10% warm-up), seed 0 only: no verdict rests on it.
demo --methods none ce+tm ce+tm-gb1 --seeds 0 --output-dir "$OUT/r3" "${R3[@]}"
# The tables over what finished.
demo --methods none ce ce+tm ce+tm-gb1 ce+tm-dy10 ce+tm-warm8 --seeds 0,1,2 --output-dir "$OUT/r1" "${R1[@]}"
demo --methods none ce ce+tm ce+tm-gb1 ce+tm-w1 --seeds 0,1,2 --output-dir "$OUT/r2" "${R2[@]}"
