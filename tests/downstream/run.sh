#!/usr/bin/env bash
# Builds tests/downstream -- a separate Bazel workspace that depends on
# @tensor_parallel the way the README tells other projects to -- and runs its
# program at world size 2. Exits non-zero when the build fails, the README's
# WORKSPACE lines differ from the ones used here, the program fails, or not
# every rank reports OK.
#
#   tests/downstream/run.sh
#
# The downstream workspace has its own Bazel server and output base (Bazel
# derives it from the workspace path); TP_DOWNSTREAM_OUTPUT_BASE picks another.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$here"

startup=()
if [ -n "${TP_DOWNSTREAM_OUTPUT_BASE:-}" ]; then
  startup=(--output_base="$TP_DOWNSTREAM_OUTPUT_BASE")
fi
bz() { bazel ${startup[@]+"${startup[@]}"} "$@"; }

# The README's three WORKSPACE lines are the ones this workspace uses (only
# the path differs).
for line in \
    'local_repository(name = "tensor_parallel", path = ' \
    'load("@tensor_parallel//third_party:repositories.bzl", "tensor_parallel_deps")' \
    'tensor_parallel_deps()'; do
  for file in "$root/README.md" "$here/WORKSPACE"; do
    if ! grep -qF -- "$line" "$file"; then
      echo "downstream: '$line' missing from $file"
      exit 1
    fi
  done
done

# The target by name, not //...: a bazel-* symlink left by another output base
# would be walked into as if it were a package.
bz build //:parallel_linear_pair
bin="$(bz info bazel-bin 2>/dev/null)/parallel_linear_pair"

nproc=2
if ! out=$("$bin" --nproc="$nproc" 2>&1); then
  echo "$out"
  echo "downstream: parallel_linear_pair --nproc=$nproc failed"
  exit 1
fi
echo "$out"
ok=$(grep -c -- '-> OK$' <<<"$out" || true)
if [ "$ok" -ne "$nproc" ]; then
  echo "downstream: expected $nproc ranks reporting OK, got $ok"
  exit 1
fi
echo "downstream: @tensor_parallel built from a separate workspace; OK at world size $nproc"
