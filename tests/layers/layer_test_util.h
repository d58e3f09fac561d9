// Helpers shared by the tests of layers/linear.h, layers/mappings.h and
// layers/vocab_parallel.h: deterministic test data, tensor <-> vector
// conversion, and running a body on N ranks over real Gloo communicators or
// over the FakeCommunicator.
//
// Example:
//   TP_EXPECT_OK(RunGloo(4, [&](Communicator& comm) -> absl::Status {
//     ASSIGN_OR_RETURN(auto layer, ColumnParallelLinear::Create(comm, o));
//     ...
//     return absl::OkStatus();
//   }));
#ifndef TENSOR_PARALLEL_TESTS_LAYERS_LAYER_TEST_UTIL_H_
#define TENSOR_PARALLEL_TESTS_LAYERS_LAYER_TEST_UTIL_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "gtest/gtest.h"
#include "runtime/dtype.h"
#include "runtime/tensor.h"
#include "tests/testing/fake_communicator.h"

// EXPECT that an absl::Status expression is OK, printing it otherwise.
// Variadic so that a lambda argument may contain top-level commas.
#define TP_EXPECT_OK(...)                                         \
  do {                                                            \
    const ::absl::Status tp_expect_ok_status = (__VA_ARGS__);     \
    EXPECT_TRUE(tp_expect_ok_status.ok()) << tp_expect_ok_status; \
  } while (false)

namespace tp {
namespace testing_layers {

using Vec = std::vector<double>;
using Body = std::function<absl::Status(Communicator& comm)>;

// Runs body on `world_size` ranks (threads), each over its own "gloo"
// communicator; OK when every rank returns OK, else the first error.
absl::Status RunGloo(int world_size, const Body& body);

// Runs body on the ranks of FakeCommunicator::CreateGroup(world_size, 5 s,
// options); returns each rank's status.
std::vector<absl::Status> RunFake(int world_size,
                                  std::vector<FakeCommunicatorOptions> options,
                                  const Body& body);

// n deterministic values in [-scale, scale) from `seed` (a 64-bit LCG).
Vec RandomVec(int64_t n, uint64_t seed, double scale = 1.0);
// n ids in [0, vocab) from `seed`.
std::vector<int64_t> RandomIds(int64_t n, int64_t vocab, uint64_t seed);

// A tensor of `dtype` and `shape` holding `values` (rounded to the dtype).
// CHECK-fails on a count mismatch (a test bug).
Tensor MakeTensor(const Vec& values, const Shape& shape, DType dtype);
// `values` rounded to `dtype` and back, as the layer sees them.
Vec RoundTo(const Vec& values, DType dtype);

// Tolerance of the numerics contract: 1e-5 (float32), 1e-2 (fp16/bf16),
// 1e-12 (float64).
double Tolerance(DType dtype);

// Relative error of got against want as in ref::RelError, with a message
// naming `what` on failure; for EXPECT_TRUE.
::testing::AssertionResult Close(const Tensor& got, const Vec& want, double tol,
                                 const std::string& what);

// OK for a successful assertion, else kInternal with its message (to return
// a check's failure from a rank body).
absl::Status ToStatus(const ::testing::AssertionResult& r);

// kInternal "<what>: expected <code>, got <status>" unless `s` has `code`
// and its message contains every string of `needles`.
absl::Status ExpectError(const absl::Status& s, absl::StatusCode code,
                         const std::vector<std::string>& needles,
                         const std::string& what);

}  // namespace testing_layers
}  // namespace tp

#endif  // TENSOR_PARALLEL_TESTS_LAYERS_LAYER_TEST_UTIL_H_
