#!/bin/bash
# Smoke test of //benchmarks:checkpoint_memory on a small model: it must run
# ranks at TP = 1, 2, 4 from both sources and load every element right
# (#wrong 0, exit status 0). The memory goal is reported but not required
# (--require_goal=false): at a few MB per rank the load's fixed cost
# (~0.5 MB) is not 10 %, and sanitizer builds add their own; the real
# measurement is the 200 MB run in BENCHMARKS.md.
set -euo pipefail
bin="$1"
out="$TEST_TMPDIR/out.txt"
if ! "$bin" --mb=6 --hidden=128 --tp=1,2,4 --save_tp=4 --require_goal=false \
    --dir="$TEST_TMPDIR/ckpt" > "$out" 2>&1; then
  cat "$out"; echo "FAILED: checkpoint_memory exited non-zero"; exit 1
fi
cat "$out"
rows=$(grep -cE '^(sharded|hf) ' "$out")
if [ "$rows" -ne 14 ]; then   # (1 + 2 + 4) ranks x 2 sources
  echo "FAILED: expected 14 rank rows, got $rows"; exit 1
fi
if grep -E '^(sharded|hf) ' "$out" | awk '$12 != 0 { bad = 1 } END { exit !bad }'; then
  echo "FAILED: a rank loaded wrong elements"; exit 1
fi
echo "PASSED"
