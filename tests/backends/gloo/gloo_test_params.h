// Test parameters shared by the Gloo collective tests: world size x dtype x
// consistency check: first_use (the default) for every world size and dtype;
// always for world size 3; off (the raw Gloo paths of every collective, small
// messages included) for world size 2. The tests make each call twice, so
// that with first_use the second call skips the envelope.
#ifndef TENSOR_PARALLEL_TESTS_BACKENDS_GLOO_GLOO_TEST_PARAMS_H_
#define TENSOR_PARALLEL_TESTS_BACKENDS_GLOO_GLOO_TEST_PARAMS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "backends/gloo/gloo_communicator.h"
#include "gtest/gtest.h"
#include "runtime/dtype.h"
#include "tests/testing/communicator_testing.h"

namespace tp {

struct GlooParam {
  int world = 1;
  DType dtype = DType::kFloat32;
  ConsistencyCheck check = ConsistencyCheck::kFirstUse;
};

inline std::vector<GlooParam> AllGlooParams() {
  std::vector<GlooParam> params;
  for (int world : {1, 2, 3, 4}) {
    for (DType dtype : kAllDTypes) {
      params.push_back({world, dtype, ConsistencyCheck::kFirstUse});
    }
  }
  for (DType dtype : kAllDTypes) {
    params.push_back({3, dtype, ConsistencyCheck::kAlways});
    params.push_back({2, dtype, ConsistencyCheck::kOff});
  }
  return params;
}

inline std::string GlooParamName(const ::testing::TestParamInfo<GlooParam>& info) {
  return absl::StrCat("world", info.param.world, "_",
                      DTypeName(info.param.dtype),
                      info.param.check == ConsistencyCheck::kFirstUse
                          ? std::string()
                          : absl::StrCat("_", ConsistencyCheckName(info.param.check)));
}

inline TestCommunicatorOptions GlooTestOptions(const GlooParam& p) {
  TestCommunicatorOptions options;
  options.timeout = absl::Seconds(30);
  options.backend_options["gloo.check_consistency"] =
      std::string(ConsistencyCheckName(p.check));
  return options;
}

// 0, 1, a prime (its fp32 bytes fit in the inline payload; fp64 do not), and
// a large count (never inline; several of Gloo's 1 MiB segments in fp64).
// Sanitizer builds, 5-20x slower, use a smaller large count.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
inline constexpr int64_t kLargeCount = int64_t{1} << 16;
#else
inline constexpr int64_t kLargeCount = int64_t{1} << 18;
#endif
inline constexpr int64_t kCounts[] = {0, 1, 1021, kLargeCount};
// Every call is made this often: with first_use, the first exchanges the
// envelope and the second skips it (the data goes under a fingerprint tag).
inline constexpr int kPasses = 2;

}  // namespace tp

#endif  // TENSOR_PARALLEL_TESTS_BACKENDS_GLOO_GLOO_TEST_PARAMS_H_
