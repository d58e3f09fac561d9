// TcpStore round-trip latency: the cost of one rendezvous operation when the
// server runs in this process and the client is a separate TcpStore (as a
// non-zero rank would be), over loopback.
//
// Prints one row per operation (set, get, add, check, wait) with the median
// and 99th-percentile latency of `num_ops` timed calls (after `warmup_ops`
// untimed ones), and, as the reference measured in the same run, the round
// trip of a plain TCP echo of the same number of bytes. Every result is
// checked (get returns what set wrote, add counts up by one, check/wait
// succeed); #wrong counts mismatches.
//
// Example:
//   absl::Status s = tp::RunTcpStoreLatency({.num_ops = 10000}, std::cout);
//   // op     count  bytes  median_us  p99_us  #wrong
//   // set    10000     64       31.2    55.0       0
#ifndef TENSOR_PARALLEL_BENCHMARKS_STORE_LATENCY_H_
#define TENSOR_PARALLEL_BENCHMARKS_STORE_LATENCY_H_

#include <cstddef>
#include <cstdint>
#include <ostream>

#include "absl/status/status.h"

namespace tp {

struct TcpStoreLatencyOptions {
  // Timed calls per operation. Default 10000 (about a second in total).
  int64_t num_ops = 10000;
  // Untimed calls per operation before timing. Default 200.
  int64_t warmup_ops = 200;
  // Bytes per value for set/get and the echo reference. Default 64.
  size_t value_bytes = 64;
};

// Runs the measurement and prints the table to `out`. kInvalidArgument for
// num_ops < 1, warmup_ops < 0 or value_bytes over TcpStore::kMaxValueBytes;
// the store's error if a call fails; kInternal when any result is wrong
// (after printing the table).
absl::Status RunTcpStoreLatency(const TcpStoreLatencyOptions& options,
                                std::ostream& out);

}  // namespace tp

#endif  // TENSOR_PARALLEL_BENCHMARKS_STORE_LATENCY_H_
