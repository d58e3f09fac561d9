// Helpers that build communicators for tests through the backend registry,
// exactly as programs do (link the backend's target, e.g.
// //backends/gloo:gloo_communicator, into the test).
//
// Example (inside a RunRanks body):
//   ASSIGN_OR_RETURN(std::unique_ptr<tp::Communicator> comm,
//                    tp::CreateTestCommunicator("gloo", rank, 4, store));
#ifndef TENSOR_PARALLEL_TESTS_TESTING_COMMUNICATOR_TESTING_H_
#define TENSOR_PARALLEL_TESTS_TESTING_COMMUNICATOR_TESTING_H_

#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "comm/communicator.h"
#include "runtime/store.h"

namespace tp {

struct TestCommunicatorOptions {
  // Bounds the rendezvous and every call. Default 30 s; error tests use ~1 s.
  absl::Duration timeout = absl::Seconds(30);
  // BackendContext::options ("gloo.check_consistency" -> "false", ...).
  std::map<std::string, std::string> backend_options;
};

// The world communicator of `rank` (of `world_size`) built by
// CreateCommunicator(backend, ...) over `store` (127.0.0.1, CPU). Errors are
// the registry's and the backend's.
absl::StatusOr<std::unique_ptr<Communicator>> CreateTestCommunicator(
    absl::string_view backend, int rank, int world_size,
    std::shared_ptr<Store> store, const TestCommunicatorOptions& options = {});

}  // namespace tp

#endif  // TENSOR_PARALLEL_TESTS_TESTING_COMMUNICATOR_TESTING_H_
