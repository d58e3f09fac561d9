#!/bin/bash
# Fuzzes the safetensors reader with libFuzzer for a bounded time.
#
# Bazel's toolchain here is gcc, which has no libFuzzer, so this test builds
# tests/runtime/safetensors_fuzz.cc and the reader's sources from the
# runfiles with clang++ -fsanitize=fuzzer,address,undefined into
# $TEST_TMPDIR, then runs it on the seed corpus (tests/runtime/
# safetensors_corpus) with a dictionary for FUZZ_SECONDS (default 15).
# It passes when the fuzzer finds no crash, leak or sanitizer error and ran
# at least MIN_RUNS inputs. Without clang++ or its libFuzzer runtime
# (Debian: clang, libclang-rt-14-dev) it prints SKIPPED and passes.
#
# Longer runs by hand:
#   bazel test //tests/runtime:safetensors_fuzz_test \
#     --test_env=FUZZ_SECONDS=600 --test_timeout=900 --test_output=streamed
set -euo pipefail

FUZZ_SECONDS="${FUZZ_SECONDS:-15}"
MIN_RUNS="${MIN_RUNS:-10000}"
CXX="${FUZZ_CXX:-clang++}"
root="${TEST_SRCDIR}/${TEST_WORKSPACE}"
tmp="${TEST_TMPDIR}"

if ! command -v "$CXX" > /dev/null 2>&1; then
  echo "SKIPPED: $CXX not found (install clang and libclang-rt-14-dev)"
  exit 0
fi
printf '#include <cstddef>\n#include <cstdint>\nextern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }\n' \
  > "$tmp/probe.cc"
if ! "$CXX" -fsanitize=fuzzer,address "$tmp/probe.cc" -o "$tmp/probe" \
     > "$tmp/probe.log" 2>&1; then
  echo "SKIPPED: $CXX cannot link -fsanitize=fuzzer (install libclang-rt-14-dev):"
  cat "$tmp/probe.log"
  exit 0
fi
"$CXX" --version | head -1

flags=(-std=c++17 -O1 -g -fno-omit-frame-pointer
       -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined
       -I"$root" -Wall -Wno-unused-parameter)
srcs=(tests/runtime/safetensors_fuzz.cc runtime/safetensors.cc
      runtime/tensor.cc runtime/dtype.cc)
start=$(date +%s)
pids=()
for s in "${srcs[@]}"; do
  obj="$tmp/$(basename "$s" .cc).o"
  "$CXX" "${flags[@]}" -c "$root/$s" -o "$obj" 2> "$obj.log" &
  pids+=($!)
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=1; done
if [ "$failed" -ne 0 ]; then
  echo "FAILED: compiling the fuzzer"; cat "$tmp"/*.o.log; exit 1
fi
"$CXX" -fsanitize=fuzzer,address,undefined "$tmp"/*.o -o "$tmp/fuzz" \
  -labsl_status -labsl_statusor -labsl_strings -labsl_str_format_internal \
  -labsl_int128 -labsl_cord -labsl_raw_logging_internal -lglog
echo "built the fuzzer in $(( $(date +%s) - start )) s"

mkdir -p "$tmp/corpus"
cp "$root"/tests/runtime/safetensors_corpus/* "$tmp/corpus/"
set +e
"$tmp/fuzz" -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 \
  -max_len=4096 -print_final_stats=1 -artifact_prefix="$tmp/" \
  -dict="$root/tests/runtime/safetensors_fuzz.dict" "$tmp/corpus" \
  > "$tmp/fuzz.log" 2>&1
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
  echo "FAILED: the fuzzer exited with $rc"
  tail -60 "$tmp/fuzz.log"
  for crash in "$tmp"/crash-* "$tmp"/leak-* "$tmp"/timeout-* "$tmp"/oom-*; do
    [ -e "$crash" ] && { echo "input $crash:"; od -c "$crash" | head -20; }
  done
  exit 1
fi
grep -E '^#[0-9]+.*(INITED|DONE)|^Done |stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' \
  "$tmp/fuzz.log"
runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$tmp/fuzz.log")
if [ -z "$runs" ] || [ "$runs" -lt "$MIN_RUNS" ]; then
  echo "FAILED: only ${runs:-0} inputs executed (want >= $MIN_RUNS)"
  tail -30 "$tmp/fuzz.log"
  exit 1
fi
echo "PASSED: $runs inputs in ${FUZZ_SECONDS} s, no crash"
