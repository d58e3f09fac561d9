// Multi-process test harness: real processes (fork) for crashes, timeouts and
// real TCP rendezvous, where threads cannot model a dying peer.
//
// Example:
//   const int port = tp::testing::PickFreePort();
//   auto results = tp::testing::RunProcesses(4, [&](int rank) {
//     ... Init with rank/world/port, run collectives ...
//     return ok ? 0 : 1;            // the child's exit code
//   }, absl::Seconds(30));
//   for (const auto& r : *results) EXPECT_EQ(r.exit_code, 0);
#ifndef TENSOR_PARALLEL_TESTS_TESTING_MULTIPROCESS_H_
#define TENSOR_PARALLEL_TESTS_TESTING_MULTIPROCESS_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace tp {
namespace testing {

struct ProcessResult {
  int rank = 0;
  int exit_code = -1;     // valid when signal == 0
  int signal = 0;         // the signal that ended the child, else 0
  bool timed_out = false; // killed by the harness after the timeout
  absl::Duration elapsed; // from fork to exit, as seen by the parent
};

// Forks `world_size` children; child r runs fn(r) and exits with its return
// value (a crash or an exception shows as a signal or code 2). The parent
// waits at most `timeout`, then kills the stragglers with SIGKILL. Call it
// before the test process starts threads. kInternal when fork fails.
absl::StatusOr<std::vector<ProcessResult>> RunProcesses(
    int world_size, const std::function<int(int rank)>& fn,
    absl::Duration timeout);

// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it,
// close). Good enough for tests on one host.
int PickFreePort();

}  // namespace testing
}  // namespace tp

#endif  // TENSOR_PARALLEL_TESTS_TESTING_MULTIPROCESS_H_
