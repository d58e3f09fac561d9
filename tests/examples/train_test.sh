#!/usr/bin/env bash
# //examples:train end to end, then //examples:transformer on its checkpoint:
#   1. training the reversal task at TP = 2 lowers the loss by > 90 % and the
#      model reverses held-out sequences (the program's own evaluation);
#   2. the sharded checkpoint (2 rank files + index + config.json) loads at
#      TP = 1 and TP = 2 (resharding) and both generate the same tokens, the
#      reversal of a prompt it never saw;
#   3. data parallelism (2 replicas of TP 1) trains too;
#   4. a loss that does not fall enough, and a batch the replicas cannot
#      share, exit non-zero.
set -euo pipefail
train="$1"
transformer="$2"
ckpt="${TEST_TMPDIR:-$(mktemp -d)}/ckpt"
task=(--seq_len=6 --symbols=16 --vocab=64 --batch=32 --log_every=50)

out=$("$train" --nproc=2 "${task[@]}" --steps=200 --min_loss_drop=0.9 \
      --save="$ckpt" 2>&1) || { echo "$out"; echo "training failed"; exit 1; }
echo "$out" | grep -E 'step |loss:|eval:|throughput:|saved:'
grep -qE '\] step  200/200  loss [0-9.]+ .* [0-9]+ tokens/s' <<<"$out" || {
  echo "$out"; echo "no progress line for step 200"; exit 1; }
exact=$(sed -nE 's/.*eval: .*exact ([0-9.]+)%.*/\1/p' <<<"$out")
awk -v e="$exact" 'BEGIN { exit !(e >= 90) }' || {
  echo "exact-match accuracy $exact% < 90% after training"; exit 1; }
for f in model-rank-0-of-2.safetensors model-rank-1-of-2.safetensors \
         model.safetensors.index.json config.json; do
  [ -s "$ckpt/$f" ] || { ls -l "$ckpt"; echo "missing $f in the checkpoint"; exit 1; }
done

# Symbols 3 7 12 5 9 4, separator 1 -> 4 9 5 12 7 3.
want="4,9,5,12,7,3"
for n in 1 2; do
  gen=$("$transformer" --nproc="$n" --checkpoint="$ckpt" --prompt=3,7,12,5,9,4,1 \
        --max_new_tokens=6 --warmup=0 2>&1) || {
    echo "$gen"; echo "transformer failed on the checkpoint at --nproc=$n"; exit 1; }
  got=$(sed -nE 's/(^|.*\] )generated: //p' <<<"$gen")
  echo "TP=$n from the TP=2 checkpoint: $got"
  if [ "$got" != "$want" ]; then
    echo "$gen"; echo "expected $want at --nproc=$n, got '$got'"; exit 1
  fi
done

# Data parallel: 2 replicas of TP 1 (gradients averaged by the optimizer).
out=$("$train" --nproc=2 --tp=1 "${task[@]}" --steps=60 --log_every=30 \
      --min_loss_drop=0.3 2>&1) || { echo "$out"; echo "DP training failed"; exit 1; }
grep -q '2 data-parallel x 1 tensor-parallel' <<<"$out" || {
  echo "$out"; echo "not data parallel"; exit 1; }
echo "$out" | grep -E 'loss:'

# Failures exit non-zero with the reason.
rc=0; out=$("$train" "${task[@]}" --steps=3 --min_loss_drop=0.9 2>&1) || rc=$?
[ "$rc" -ne 0 ] && grep -q 'less than --min_loss_drop 90%' <<<"$out" || {
  echo "$out"; echo "expected a failure for a loss that barely fell (rc $rc)"; exit 1; }
rc=0; out=$("$train" --nproc=2 --tp=1 --batch=3 2>&1) || rc=$?
[ "$rc" -ne 0 ] && grep -q 'a positive multiple of the 2 data-parallel replicas' <<<"$out" || {
  echo "$out"; echo "expected a failure for --batch=3 over 2 replicas (rc $rc)"; exit 1; }
rc=0; out=$("$train" --task=shuffle 2>&1) || rc=$?
[ "$rc" -ne 0 ] && grep -q 'unknown task "shuffle"' <<<"$out" || {
  echo "$out"; echo "expected a failure for --task=shuffle (rc $rc)"; exit 1; }
echo "train: loss fell, checkpoint reloads at TP 1 and 2 with the same tokens"
