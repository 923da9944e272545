#!/usr/bin/env bash
# Regenerates docs/learning-curve.svg: validation loss of the ES default and
# of the BPTT baseline on the same model, against forward tokens and wall
# time, beside the unigram and bigram baselines.
#
#   xtask/scripts/learning-curve.sh [SEEDLING_BINARY]
#
# Trains what is missing first: `seedling train --minutes 30` into
# runs/default (the target run of docs/LEARNING.md) and `seedling train
# --method bptt --minutes 5` into runs/bptt. Delete a run dir to retrain it.
# Training runs under `nice -n 10`: the machine may be shared.
set -euo pipefail
bin=${1:-target/release/seedling}
if [ ! -d runs/default ]; then
  nice -n 10 "$bin" train --minutes 30 --run-dir runs/default
fi
if [ ! -d runs/bptt ]; then
  nice -n 10 "$bin" train --method bptt --minutes 5 --run-dir runs/bptt
fi
"$bin" plot --checkpoint runs/default --label "ES (default)" \
  --checkpoint runs/bptt --label "BPTT (same model)" \
  --x both --out docs/learning-curve.svg
