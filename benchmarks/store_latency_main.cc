// Prints the TcpStore latency table (see store_latency.h).
// Usage: store_latency_main [num_ops [value_bytes]]
#include <cstdlib>
#include <iostream>

#include "absl/strings/numbers.h"
#include "benchmarks/store_latency.h"

int main(int argc, char** argv) {
  tp::TcpStoreLatencyOptions options;
  if (argc > 1 && !absl::SimpleAtoi(argv[1], &options.num_ops)) {
    std::cerr << "bad num_ops '" << argv[1] << "'\n";
    return 2;
  }
  if (argc > 2 && !absl::SimpleAtoi(argv[2], &options.value_bytes)) {
    std::cerr << "bad value_bytes '" << argv[2] << "'\n";
    return 2;
  }
  const absl::Status status = tp::RunTcpStoreLatency(options, std::cout);
  if (!status.ok()) {
    std::cerr << status << "\n";
    return 1;
  }
  return 0;
}
