#!/usr/bin/env bash
# Every test: this workspace's `bazel test //...`, then the downstream
# workspace (tests/downstream: a separate Bazel workspace that depends on
# @tensor_parallel, builds a program from the public headers and runs it at
# world size 2). Arguments go to `bazel test` (e.g. --config=asan).
#
#   ./tools/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bazel test //... "$@"
tests/downstream/run.sh
