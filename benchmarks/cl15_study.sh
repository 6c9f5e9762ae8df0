#!/usr/bin/env bash
# The runs of docs/cl15_study.md, in the order written there before any of them ran. Every call resumes:
# a cell with results.json is kept, a cell cut off is resumed at its next stage, so running this again
# continues where it stopped. Usage:
#   benchmarks/cl15_study.sh data                  the replay set (every clean paragraph of the demo's corpus)
#   benchmarks/cl15_study.sh regime [OUT] [PY]     none at 3e-5, 1e-4, 3e-4, then ce where none forgets (seed 0)
#   benchmarks/cl15_study.sh core LR [OUT] [PY]    none, ce, ce+tm-w1, ce+tm (dy) on seeds 0, 1, 2 at LR
#   benchmarks/cl15_study.sh more LR [OUT] [PY]    the cells after the core ones, in their order
# OUT defaults to runs/cl15, PY to .venv/bin/python; to pin the code, run it from a clone at one commit with
# PYTHONPATH=<clone>/src (the log's first lines name the commit). The data: configs/cl15_study.yaml.
set -euo pipefail
PHASE=${1:?data, regime, core LR or more LR}
shift
if [ "$PHASE" = core ] || [ "$PHASE" = more ]; then LR=${1:?the learning rate the regime rule chose}; shift; fi
OUT=${1:-runs/cl15}
PY=${2:-.venv/bin/python}
CONFIG=configs/cl15_study.yaml
echo "cl15 study $PHASE at $(git rev-parse HEAD 2>/dev/null || echo '?') ($(date -u +%FT%TZ)); gere from $("$PY" -c 'import gere; print(gere.__file__)')"

declare -A METHOD=(
  [none]="gere.objective=none"
  [ce]="gere.objective=ce"
  [ce+tm-w1]="gere.objective=ce+tm gere.margin_weight=1"
  [ce+tm]="gere.objective=ce+tm gere.margin_weight=dy"
  [ce+tm-gb1]="gere.objective=ce+tm gere.margin_weight=gb:1"
  [task-replay]="gere.objective=none task_replay.per_task=8"
  [ewc]="gere.objective=none ewc.strength=1000"
  [lwf]="gere.objective=none lwf.weight=1"
  [none-lora]="gere.objective=none finetuning=lora training.learning_rate=1e-3"
  [ce+tm-lora]="gere.objective=ce+tm gere.margin_weight=1 finetuning=lora gere.reference=online training.learning_rate=1e-3"
  [olora]="gere.objective=none finetuning=olora training.learning_rate=1e-3"
)

# cell METHOD LR SEED [ORDER]: one run, skipped when finished, resumed when cut off.
cell() {
  local method=$1 lr=$2 seed=$3 order=${4:-4}
  local dir="$OUT/order-$order/lr-$lr/$method/seed-$seed"
  if [ -f "$dir/results.json" ]; then echo "kept: $dir"; return 0; fi
  local sets=(--set "training.learning_rate=$lr" --set "seed=$seed" --set "benchmark.order=$order")
  for kv in ${METHOD[$method]}; do sets+=(--set "$kv"); done  # a method's own rate comes after, and wins
  # The gradient share of the loss parts (a diagnostic) on seed 0 of the methods with a margin.
  if [ "$seed" = 0 ] && [[ $method == ce+tm* ]]; then sets+=(--set gere.grad_share_every=4); fi
  local resume=()
  if [ -f "$dir/run_state.json" ]; then resume=(--resume); fi
  echo "run: $dir ($(date -u +%T))"
  "$PY" -m gere.cli run "$CONFIG" --output-dir "$dir" "${sets[@]}" "${resume[@]}" --no-progress \
    --base-eval-cache "$OUT/base_eval.json" > "$dir.log" 2>&1 || { echo "FAILED: $dir (see $dir.log)"; return 0; }
  echo "done: $dir ($(date -u +%T))"
}

case "$PHASE" in
  data)
    "$PY" -c "from gere.demo.assets import DemoSizes, write_demo_data
write_demo_data('data/study_general', build_model=False, sizes=DemoSizes(replay=1000, heldout_wiki=32))"
    ;;
  regime)
    mkdir -p "$OUT"
    for lr in 3e-5 1e-4 3e-4; do mkdir -p "$OUT/order-4/lr-$lr/none"; cell none "$lr" 0; done
    # ce only where none forgets clearly: at any other rate the rule passes the rate whatever ce does.
    for lr in $("$PY" benchmarks/cl15_regime_rule.py "$OUT" --ce-rates); do
      mkdir -p "$OUT/order-4/lr-$lr/ce"; cell ce "$lr" 0
    done
    "$PY" benchmarks/cl15_regime_rule.py "$OUT" || true
    ;;
  core)
    for seed in 0 1 2; do
      for m in none ce ce+tm-w1 ce+tm; do mkdir -p "$OUT/order-4/lr-$LR/$m"; cell "$m" "$LR" "$seed"; done
    done
    ;;
  more)
    for m in ce+tm-gb1 task-replay ewc lwf; do
      for seed in 0 1 2; do mkdir -p "$OUT/order-4/lr-$LR/$m"; cell "$m" "$LR" "$seed"; done
    done
    for m in none-lora ce+tm-lora olora; do mkdir -p "$OUT/order-4/lr-$LR/$m"; cell "$m" "$LR" 0; done
    for order in 5 6; do
      for m in none ce+tm-w1; do mkdir -p "$OUT/order-$order/lr-$LR/$m"; cell "$m" "$LR" 0 "$order"; done
    done
    ;;
  *) echo "unknown phase $PHASE: data, regime, core LR or more LR" >&2; exit 2 ;;
esac
