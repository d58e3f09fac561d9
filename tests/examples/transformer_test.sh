#!/usr/bin/env bash
# //examples:transformer end to end (real processes, TCP rendezvous): greedy
# generation with the KV cache gives IDENTICAL tokens at TP = 1, 2 and 4, with
# the explicit Llama plan, with 2 data-parallel replicas of TP 2, and without
# the KV cache (recomputing the whole sequence: an independent path); another
# seed gives other tokens; bad input exits non-zero with a clear message.
set -euo pipefail
bin="$1"
# A small config (every size divisible by 1, 2, 4) that runs in about a second.
cfg=(--hidden=128 --heads=8 --kv_heads=4 --layers=3 --ffn=256 --vocab=512
     --max_seq=64 --prompt=5,17,300,2 --max_new_tokens=20 --warmup=0)

# Runs the example, checks it succeeded and printed exactly one token line
# (rank 0 only) of max_new_tokens ids, and echoes the ids.
tokens() {
  local out
  out=$("$bin" "${cfg[@]}" "$@" 2>&1) || {
    echo "$out" >&2; echo "FAILED: transformer $*" >&2; return 1; }
  local lines
  lines=$(grep -E '(^|\] )generated: ' <<<"$out" || true)
  if [ "$(grep -c . <<<"$lines")" -ne 1 ]; then
    echo "$out" >&2; echo "expected one 'generated:' line from: $*" >&2; return 1
  fi
  for want in 'tokens/s' 'compute .* communication' 'module .*| type .*| style'; do
    grep -qE -- "$want" <<<"$out" || {
      echo "$out" >&2; echo "missing '$want' in the output of: $*" >&2; return 1; }
  done
  local ids=${lines##*generated: }
  if [ "$(tr ',' '\n' <<<"$ids" | grep -cE '^[0-9]+$')" -ne 20 ]; then
    echo "$out" >&2; echo "expected 20 token ids, got '$ids'" >&2; return 1
  fi
  echo "$ids"
}

ref=$(tokens --nproc=1)
echo "TP=1: $ref"
check() {
  local got
  got=$(tokens "$@")
  if [ "$got" != "$ref" ]; then
    echo "tokens differ from TP=1 with $*:"; echo "  TP=1: $ref"; echo "  got:  $got"
    exit 1
  fi
  echo "same tokens with $*"
}
check --nproc=2
check --nproc=4
check --nproc=2 --plan=llama
check --nproc=4 --tp=2
check --nproc=2 --kv_cache=false
check --nproc=2 --batch=3

other=$(tokens --nproc=2 --seed=2)
if [ "$other" == "$ref" ]; then
  echo "another seed gave the same tokens: $other"; exit 1
fi

# Errors: non-zero exit and a message naming the problem.
expect_error() {
  local want="$1"; shift
  local out rc=0
  out=$("$bin" "${cfg[@]}" "$@" 2>&1) || rc=$?
  if [ "$rc" -eq 0 ]; then echo "$out"; echo "expected failure: $*"; exit 1; fi
  grep -qF -- "$want" <<<"$out" || {
    echo "$out"; echo "expected '$want' in the error of: $*"; exit 1; }
  echo "error as expected ($want) for: $*"
}
expect_error '"x" is not a token id' --prompt=1,x
expect_error 'token id 512 is outside [0, 512)' --prompt=1,512
expect_error '--max_new_tokens must be >= 1' --max_new_tokens=0
expect_error '--batch must be >= 1' --batch=0
expect_error 'unknown plan "rowwise"' --plan=rowwise
expect_error 'no model config' --checkpoint="${TEST_TMPDIR:-/tmp}/no_such_checkpoint"
expect_error 'heads 6 and kv_heads 3 must both be divisible by the tensor-parallel size 4' \
  --nproc=4 --heads=6 --kv_heads=3 --hidden=96
expect_error 'exceeds max_seq' --max_seq=16
echo "transformer: identical tokens at TP 1, 2, 4; errors reported"
