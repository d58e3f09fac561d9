#include "tests/layers/layer_test_util.h"

#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "glog/logging.h"
#include "runtime/status_macros.h"
#include "tests/layers/layer_reference.h"
#include "tests/testing/communicator_testing.h"
#include "tests/testing/run_ranks.h"

namespace tp {
namespace testing_layers {

absl::Status RunGloo(int world_size, const Body& body) {
  return AllRanksOk(RunRanks(
      world_size, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
        ASSIGN_OR_RETURN(
            std::unique_ptr<Communicator> comm,
            CreateTestCommunicator("gloo", rank, world_size, store));
        return body(*comm);
      }));
}

std::vector<absl::Status> RunFake(int world_size,
                                  std::vector<FakeCommunicatorOptions> options,
                                  const Body& body) {
  std::vector<std::unique_ptr<FakeCommunicator>> comms =
      FakeCommunicator::CreateGroup(world_size, absl::Seconds(5),
                                    std::move(options));
  return RunRanks(world_size,
                  [&](int rank, std::shared_ptr<Store>) -> absl::Status {
                    return body(*comms[rank]);
                  });
}

Vec RandomVec(int64_t n, uint64_t seed, double scale) {
  Vec v(n);
  uint64_t s = seed * 6364136223846793005ULL + 1442695040888963407ULL;
  for (int64_t i = 0; i < n; ++i) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    const double u = static_cast<double>(s >> 11) / 9007199254740992.0;  // 2^53
    v[i] = scale * (2.0 * u - 1.0);
  }
  return v;
}

std::vector<int64_t> RandomIds(int64_t n, int64_t vocab, uint64_t seed) {
  std::vector<int64_t> ids(n);
  uint64_t s = seed * 2862933555777941757ULL + 3037000493ULL;
  for (int64_t i = 0; i < n; ++i) {
    s = s * 2862933555777941757ULL + 3037000493ULL;
    ids[i] = static_cast<int64_t>((s >> 33) % static_cast<uint64_t>(vocab));
  }
  return ids;
}

Tensor MakeTensor(const Vec& values, const Shape& shape, DType dtype) {
  absl::StatusOr<Tensor> t = Tensor::FromDoubles(values, shape, dtype);
  CHECK(t.ok()) << t.status();
  return *std::move(t);
}

Vec RoundTo(const Vec& values, DType dtype) {
  return MakeTensor(values, Shape{static_cast<int64_t>(values.size())}, dtype)
      .ToDoubles();
}

double Tolerance(DType dtype) {
  switch (dtype) {
    case DType::kFloat64:
      return 1e-12;
    case DType::kFloat32:
      return 1e-5;
    default:
      return 1e-2;
  }
}

::testing::AssertionResult Close(const Tensor& got, const Vec& want, double tol,
                                 const std::string& what) {
  if (!got.defined()) {
    return ::testing::AssertionFailure() << what << ": tensor is undefined";
  }
  const Vec g = got.ToDoubles();
  if (g.size() != want.size()) {
    return ::testing::AssertionFailure()
           << what << ": " << g.size() << " elements, want " << want.size();
  }
  const double err = ref::RelError(g, want);
  if (err < tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << ": relative error " << err << " >= " << tol << " ("
         << DTypeName(got.dtype()) << ", got " << got.DebugString(8) << ")";
}

absl::Status ToStatus(const ::testing::AssertionResult& r) {
  if (r) return absl::OkStatus();
  return absl::InternalError(r.message());
}

absl::Status ExpectError(const absl::Status& s, absl::StatusCode code,
                         const std::vector<std::string>& needles,
                         const std::string& what) {
  bool ok = s.code() == code;
  for (const std::string& n : needles) {
    ok = ok && absl::StrContains(s.message(), n);
  }
  if (ok) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(
      what, ": expected ", absl::StatusCodeToString(code), " naming [",
      absl::StrJoin(needles, ", "), "], got ", s.ToString()));
}

}  // namespace testing_layers
}  // namespace tp
