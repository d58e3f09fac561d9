// RunRanks: the threaded multi-rank harness. Runs one function per rank, each
// on its own thread, all sharing one in-process HashStore for rendezvous (the
// role of Gloo's spawn(size, fn) test fixture).
//
// A rank that hangs would hang the test; a watchdog instead aborts the
// process after RunRanksOptions::watchdog with a message naming the ranks
// still running, so a hang is reported as such and not as a Bazel timeout.
//
// Example:
//   std::vector<absl::Status> statuses = tp::RunRanks(
//       4, [](int rank, std::shared_ptr<tp::Store> store) -> absl::Status {
//         ASSIGN_OR_RETURN(auto comm, tp::CreateTestCommunicator(
//                                         "gloo", rank, 4, store));
//         return comm->Barrier();
//       });
//   EXPECT_TRUE(tp::AllRanksOk(statuses).ok());
#ifndef TENSOR_PARALLEL_TESTS_TESTING_RUN_RANKS_H_
#define TENSOR_PARALLEL_TESTS_TESTING_RUN_RANKS_H_

#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "runtime/store.h"

namespace tp {

struct RunRanksOptions {
  // Aborts the process (LOG(FATAL)) when some rank has not returned after
  // this long. Default 120 s, below Bazel's "medium" test timeout.
  absl::Duration watchdog = absl::Seconds(120);
};

// fn(rank, store): the body of one rank. `store` is shared by all ranks.
using RankFn =
    std::function<absl::Status(int rank, std::shared_ptr<Store> store)>;

// Runs fn for ranks 0..world_size-1 concurrently (one thread each, over a
// fresh HashStore) and returns their statuses in rank order. world_size must
// be >= 1 (CHECKed: a test bug).
std::vector<absl::Status> RunRanks(int world_size, const RankFn& fn,
                                   const RunRanksOptions& options = {});

// OK when every status is; else the first error, its message prefixed with
// "rank r: " and followed by how many ranks failed.
absl::Status AllRanksOk(const std::vector<absl::Status>& statuses);

}  // namespace tp

#endif  // TENSOR_PARALLEL_TESTS_TESTING_RUN_RANKS_H_
