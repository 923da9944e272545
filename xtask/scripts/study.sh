#!/usr/bin/env bash
# One row of the learning study in docs/LEARNING.md per invocation:
#
#   xtask/scripts/study.sh ROW [SEEDLING_BINARY]
#
# Every row trains from scratch on tiny-shakespeare for a fixed forward-token
# budget (population x batch x seq_len x steps), then prints one table line:
# row, flags, steps, forward tokens, minutes, final validation loss. Runs go
# to runs/study/ROW (deleted first, so a row always starts at step 0). Rows
# run under `nice -n 10`: the machine is shared.
set -euo pipefail
row=${1:?usage: study.sh ROW [seedling binary]; rows are listed in this file}
bin=${2:-target/release/seedling}
# Tokens per row unless the row says otherwise.
budget=${BUDGET:-20000000}
# Validation points per row.
points=10

# Every row spells out the recipe flags it depends on, so a later change
# of the defaults does not change what a row measures. Sweep 3 starts from the best of sweeps 1-2: one 64-wide layer, 512
# members of one sequence each, lr 1e-2, and a 40M-token budget.
b3="--population 512 --batch 1"
# Sweep 2's members and batch (sweep 1's best row).
s2="--population 512 --batch 2"
h64="--hidden 64 --layers 1"

# Flags of each row. Rows not listed here fail.
case "$row" in
  # Sweep 2 (20M tokens): the sweep-1 recipe (population 512, batch 2,
  # lr 3e-3, sigma 0.02) on smaller models, then lr, sigma and members.
  h64l1) flags="--hidden 64 --layers 1 $s2 --lr 3e-3 --sigma 0.02" ;;
  h32l1) flags="--hidden 32 --layers 1 $s2 --lr 3e-3 --sigma 0.02" ;;
  # Learning rate on the small model.
  h64-lr1e-2) flags="--hidden 64 --layers 1 $s2 --lr 1e-2 --sigma 0.02" ;;
  h64-lr3e-2) flags="--hidden 64 --layers 1 $s2 --lr 3e-2 --sigma 0.02" ;;
  # Sigma.
  h64-s05) flags="--hidden 64 --layers 1 $s2 --lr 3e-3 --sigma 0.05" ;;
  h64-s1) flags="--hidden 64 --layers 1 $s2 --lr 3e-3 --sigma 0.1" ;;
  # Population against steps at batch 1 (64 tokens per member), lr 1e-2.
  h64-n512b1) flags="--hidden 64 --layers 1 --lr 1e-2 --population 512 --batch 1" ;;
  h64-n128b1) flags="--hidden 64 --layers 1 --lr 1e-2 --population 128 --batch 1" ;;
  h64-n64b1) flags="--hidden 64 --layers 1 --lr 1e-2 --population 64 --batch 1" ;;
  # Sweep 3 (BUDGET=40000000).
  s3-base) flags="$h64 $b3 --lr 1e-2" ;;
  s3-cos) flags="$h64 $b3 --lr 1e-2 --schedule cosine" ;;
  s3-cos-lr2e-2) flags="$h64 $b3 --lr 2e-2 --schedule cosine" ;;
  s3-zscores) flags="$h64 $b3 --lr 1e-2 --shaping zscores" ;;
  s3-beta1-99) flags="$h64 $b3 --lr 1e-2 --beta1 0.99" ;;
  s3-s01) flags="$h64 $b3 --lr 1e-2 --sigma 0.01" ;;
  s3-s05) flags="$h64 $b3 --lr 1e-2 --sigma 0.05" ;;
  s3-rank4) flags="$h64 $b3 --lr 1e-2 --rank 4" ;;
  s3-init05) flags="$h64 $b3 --lr 1e-2 --init-scale 0.5" ;;
  s3-init2) flags="$h64 $b3 --lr 1e-2 --init-scale 2" ;;
  s3-wd01) flags="$h64 $b3 --lr 1e-2 --weight-decay 0.01" ;;
  s3-h32) flags="--hidden 32 --layers 1 $b3 --lr 1e-2" ;;
  s3-h16) flags="--hidden 16 --layers 1 $b3 --lr 1e-2" ;;
  s3-h48) flags="--hidden 48 --layers 1 $b3 --lr 1e-2" ;;
  s3-h32-cos) flags="--hidden 32 --layers 1 $b3 --lr 1e-2 --schedule cosine" ;;
  s3-h32-lr2e-2) flags="--hidden 32 --layers 1 $b3 --lr 2e-2" ;;
  # Members against tokens per member at a fixed 32,768 tokens per step,
  # on the chosen 1x16 model: 512 x 1 sequence against 32 x 16 sequences.
  s3-h16-n32b16) flags="--hidden 16 --layers 1 --population 32 --batch 16 --lr 1e-2" ;;
  s3-h64l2) flags="--hidden 64 --layers 2 $b3 --lr 1e-2" ;;
  *) echo "unknown row $row" >&2; exit 2 ;;
esac

# Step count from the budget: tokens per step = population * batch * seq_len.
flag() { grep -o -- "--$1 [0-9]*" <<<"$flags" | tail -1 | awk '{print $2}' || true; }
pop=$(flag population); pop=${pop:-512}
batch=$(flag batch); batch=${batch:-1}
seq=$(flag seq-len); seq=${seq:-64}
steps=$(( budget / (pop * batch * seq) ))
every=$(( steps / points )); every=$(( every > 0 ? every : 1 ))
steps=$(( every * points ))
dir=runs/study/$row
rm -rf "$dir"
mkdir -p runs/study
start=$(date +%s)
# shellcheck disable=SC2086
nice -n 10 "$bin" train --port 0 --run-dir "$dir" --sample 0 --eval-every "$every" \
  --checkpoint-every "$steps" --max-steps "$steps" $flags >"$dir.log" 2>&1
end=$(date +%s)
val=$(grep -o 'validation loss [0-9.]*' "$dir.log" | tail -1 | awk '{print $3}')
tokens=$(( steps * pop * batch * seq ))
printf '| %s | `%s` | %d | %.1fM | %.1f | %s |\n' "$row" "$flags" "$steps" \
  "$(bc -l <<<"$tokens/1000000")" "$(bc -l <<<"($end-$start)/60")" "$val" | tee -a runs/study/results.md
