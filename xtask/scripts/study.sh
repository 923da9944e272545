#!/usr/bin/env bash
# One row of the learning study in docs/LEARNING.md per invocation:
#
#   xtask/scripts/study.sh ROW [SEEDLING_BINARY]
#
# Every row trains from scratch on tiny-shakespeare for a fixed forward-token
# budget (population x batch x seq_len x steps), then prints one table line:
# row, flags, steps, forward tokens, minutes, final validation loss, best
# validation loss, forward tokens when validation first passed bigram. Runs go
# to runs/study/ROW (deleted first, so a row always starts at step 0). Rows
# run under `nice -n 10`: the machine is shared.
set -euo pipefail
row=${1:?usage: study.sh ROW [seedling binary]; rows are listed in this file}
bin=${2:-target/release/seedling}
# Tokens per row unless the row says otherwise.
budget=${BUDGET:-20000000}
# Validation points per row (sweep 4 rows use 40, to place the bigram
# crossing finely).
points=${POINTS:-10}
# The add-one bigram baseline on tiny-shakespeare's validation split
# (`seedling baseline --ngram 2`): the last column is the first forward-token
# count whose validation loss is at or below it.
bigram=2.482

# Every row spells out the recipe flags it depends on, so a later change
# of the defaults does not change what a row measures. Sweep 3 starts from the best of sweeps 1-2: one 64-wide layer, 512
# members of one sequence each, lr 1e-2, and a 40M-token budget.
b3="--population 512 --batch 1"
# Sweep 2's members and batch (sweep 1's best row).
s2="--population 512 --batch 2"
h64="--hidden 64 --layers 1"
# Sweep 4's base: the 1x16 model, one sequence per member, sigma 0.02, rank 1.
h16="--hidden 16 --layers 1 --batch 1 --sigma 0.02 --rank 1"

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
  # Sweep 4 (20M tokens): tokens per member, on the 1x16 default model with
  # one sequence per member. The training sequence length goes below the
  # 64 of the validation windows. Rows are named s4-t<seq_len>-n<members>,
  # then optional changes: -lr<lr> (default 1e-2), -s<sigma> (0.02),
  # -b1<beta1> (0.9), -full (full-rank noise), -cos (cosine lr decay to
  # 0.1x over the row), e.g. s4-t16-n512-lr2e-2-cos.
  s4-t*)
    num='[0-9.]+(e-[0-9]+)?'
    re="^s4-t([0-9]+)-n([0-9]+)((-lr$num|-s$num|-b1$num|-full|-cos)*)\$"
    [[ $row =~ $re ]] || { echo "bad sweep-4 row $row" >&2; exit 2; }
    flags="$h16 --population ${BASH_REMATCH[2]} --seq-len ${BASH_REMATCH[1]}"
    rest=${BASH_REMATCH[3]}
    opt() { grep -oE -- "-$1$num" <<<"$rest" | sed "s/^-$1//" || true; }
    lr=$(opt lr); sigma=$(opt s); beta1=$(opt b1)
    flags="$flags --lr ${lr:-1e-2}"
    [[ -n $sigma ]] && flags="${flags/--sigma 0.02/--sigma $sigma}"
    [[ -n $beta1 ]] && flags="$flags --beta1 $beta1"
    [[ $rest == *-full* ]] && flags="${flags/--rank 1/--noise full}"
    [[ $rest == *-cos* ]] && flags="$flags --schedule cosine"
    points=${POINTS:-40} ;;
  # The exact readout (docs/LEARNING.md, "An exact readout"): the 1x16
  # default with its unigram start and the readout's exact gradient, rows
  # named s10-n<members>[-seed<S>]; measured with BUDGET=30000000 POINTS=90.
  # (They were measured while members still perturbed the readout; since
  # protocol 4 they do not, so these rows now come out a little better.)
  # s11-n<members>[-seed<S>] add the estimate kept to the input rows the
  # minibatch reads ("Only the input rows the minibatch reads").
  s1[01]-n*)
    re="^s1([01])-n([0-9]+)(-seed([0-9]+))?\$"
    [[ $row =~ $re ]] || { echo "bad row $row" >&2; exit 2; }
    flags="$h16 --population ${BASH_REMATCH[2]} --seq-len 64 --lr 1e-2 --seed ${BASH_REMATCH[4]:-0}"
    rows=all; [[ ${BASH_REMATCH[1]} == 1 ]] && rows=seen
    start_flags="--output-bias unigram --readout exact --input-rows $rows --head shared" ;;
  # A head per input character ("A head per input character"), rows named
  # s12-h<hidden>-n<members>[-seed<S>]; measured with BUDGET=30000000
  # POINTS=90. s12-h24-n256 is `seedling train`'s default.
  s12-h*)
    re="^s12-h([0-9]+)-n([0-9]+)(-seed([0-9]+))?\$"
    [[ $row =~ $re ]] || { echo "bad row $row" >&2; exit 2; }
    flags="--hidden ${BASH_REMATCH[1]} --layers 1 --batch 1 --sigma 0.02 --rank 1"
    flags="$flags --population ${BASH_REMATCH[2]} --seq-len 64 --lr 1e-2 --seed ${BASH_REMATCH[4]:-0}"
    start_flags="--output-bias unigram --readout exact --input-rows seen --head by-input" ;;
  *) echo "unknown row $row" >&2; exit 2 ;;
esac

# Step count from the budget: tokens per step = population * batch * seq_len.
flag() { grep -o -- "--$1 [0-9]*" <<<"$flags" | tail -1 | awk '{print $2}' || true; }
pop=$(flag population); pop=${pop:-256}
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
# The rows before s10 were measured from a zero output bias, with ES's
# readout, every input row estimated and a shared head, before the unigram
# start, the exact readout, the seen rows and the per-input head became the
# defaults; these flags keep measuring what they measured.
start_flags=${start_flags:---output-bias zero --readout es --input-rows all --head shared}
nice -n 10 "$bin" train --port 0 --run-dir "$dir" --sample 0 --eval-every "$every" \
  --checkpoint-every "$steps" --max-steps "$steps" $start_flags $flags >"$dir.log" 2>&1
end=$(date +%s)
val=$(grep -o 'validation loss [0-9.]*' "$dir.log" | tail -1 | awk '{print $3}')
tokens=$(( steps * pop * batch * seq ))
# The best validation point and the first one at or below bigram, from the
# checkpoint's history (safetensors: a little-endian u64 header length,
# then the JSON header whose metadata holds the history as JSON).
read -r best cross < <(python3 - "$dir" "$bigram" <<'EOF'
import glob, json, struct, sys
path = sorted(glob.glob(sys.argv[1] + "/ckpt-*.safetensors"))[-1]
with open(path, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    history = json.loads(json.loads(f.read(n))["__metadata__"]["history"])
vals = [(h["tokens"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
best = min(v for _, v in vals)
cross = next((f"{t / 1e6:.1f}M" for t, v in vals if v <= float(sys.argv[2])), "-")
print(f"{best:.3f} {cross}")
EOF
)
printf '| %s | `%s` | %d | %.1fM | %.1f | %s | %s | %s |\n' "$row" "$flags" "$steps" \
  "$(bc -l <<<"$tokens/1000000")" "$(bc -l <<<"($end-$start)/60")" "$val" "$best" "$cross" \
  | tee -a runs/study/results.md
