#!/usr/bin/env bash
# The README's demo at world sizes 1-4: every rank's TP result must equal the
# TP = 1 block (the program exits non-zero otherwise), and each rank reports.
set -euo pipefail
bin="$1"
for n in 1 2 3 4; do
  out=$("$bin" --nproc="$n" --hidden=48 --ffn=96 --tokens=12 --steps=2 2>&1) || {
    echo "$out"; echo "tp_mlp failed at --nproc=$n"; exit 1; }
  ok=$(grep -c -- '-> OK' <<<"$out" || true)
  if [ "$ok" -ne "$n" ]; then
    echo "$out"; echo "expected $n ranks reporting OK at --nproc=$n, got $ok"; exit 1
  fi
done
echo "tp_mlp OK at world sizes 1-4"
