// Test parameters shared by the Gloo collective tests: world size x dtype x
// consistency check (on for every world size and dtype; off for world sizes
// 2 and 3, which exercise the raw Gloo paths of every collective).
#ifndef TENSOR_PARALLEL_TESTS_BACKENDS_GLOO_GLOO_TEST_PARAMS_H_
#define TENSOR_PARALLEL_TESTS_BACKENDS_GLOO_GLOO_TEST_PARAMS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "runtime/dtype.h"
#include "tests/testing/communicator_testing.h"

namespace tp {

struct GlooParam {
  int world = 1;
  DType dtype = DType::kFloat32;
  bool check = true;
};

inline std::vector<GlooParam> AllGlooParams() {
  std::vector<GlooParam> params;
  for (int world : {1, 2, 3, 4}) {
    for (DType dtype : kAllDTypes) params.push_back({world, dtype, true});
  }
  for (int world : {2, 3}) {
    for (DType dtype : kAllDTypes) params.push_back({world, dtype, false});
  }
  return params;
}

inline std::string GlooParamName(const ::testing::TestParamInfo<GlooParam>& info) {
  return absl::StrCat("world", info.param.world, "_",
                      DTypeName(info.param.dtype),
                      info.param.check ? "" : "_unchecked");
}

inline TestCommunicatorOptions GlooTestOptions(const GlooParam& p) {
  TestCommunicatorOptions options;
  options.timeout = absl::Seconds(30);
  options.backend_options["gloo.check_consistency"] = p.check ? "true" : "false";
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

}  // namespace tp

#endif  // TENSOR_PARALLEL_TESTS_BACKENDS_GLOO_GLOO_TEST_PARAMS_H_
