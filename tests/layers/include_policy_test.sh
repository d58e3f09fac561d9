#!/bin/bash
# Fails when a source file of layers/ includes a header that layers must not
# see: a backend (backends/..., the backend registry), Gloo, NCCL, MPI, CUDA,
# cuBLAS or cblas/OpenBLAS. Layers get a tp::Communicator& and runtime ops.
#
# Usage: include_policy_test.sh FILE...   (Bazel passes //layers:sources)
# Self-test first, so the check cannot pass vacuously.
set -u

FORBIDDEN='^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"](backends/|comm/backend_registry\.h|gloo/|nccl|cuda|cublas|cblas|openblas|mpi\.h)'

check() {  # prints offending lines; returns 0 when clean
  ! grep -HnE "$FORBIDDEN" "$@"
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
printf '#include "layers/linear.h"\n#include "runtime/ops.h"\n' > "$tmp/clean.cc"
for bad in '#include "gloo/allreduce.h"' '#include <cblas.h>' \
           '#include "backends/gloo/gloo_communicator.h"' '#include <nccl.h>' \
           '  #  include <cuda_runtime.h>' '#include "comm/backend_registry.h"' \
           '#include <mpi.h>'; do
  printf '%s\n' "$bad" > "$tmp/bad.cc"
  if check "$tmp/bad.cc" > /dev/null; then
    echo "SELF-TEST FAILED: the pattern misses: $bad"; exit 1
  fi
done
if ! check "$tmp/clean.cc"; then
  echo "SELF-TEST FAILED: a clean file was rejected"; exit 1
fi

if [ "$#" -eq 0 ]; then echo "no files given"; exit 1; fi
seen_linear=0
for f in "$@"; do
  case "$f" in */layers/linear.h|layers/linear.h) seen_linear=1 ;; esac
done
if [ "$seen_linear" -ne 1 ]; then
  echo "layers/linear.h is not among the files checked: $*"; exit 1
fi
if ! check "$@"; then
  echo "FAILED: layers/ must not include backend, Gloo, NCCL, MPI, CUDA or BLAS headers (see layers/BUILD.bazel)"
  exit 1
fi
echo "checked $# files: OK"
