// Tests of layers/mappings.h over real Gloo communicators at 1..4 ranks,
// against closed forms: rank r contributes f(r, i) = (r + 1) * 100 + i, so
// every sum, slice and concatenation has an exact expected value.
#include "layers/mappings.h"

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "runtime/status_macros.h"
#include "tests/layers/layer_test_util.h"

namespace tp {
namespace {

using testing_layers::MakeTensor;
using testing_layers::RunGloo;
using testing_layers::Vec;

// Rank r's tensor of `shape`: element i = (r + 1) * 100 + i, rounded to
// `dtype` (bf16 rounds values above 256; expectations are computed from the
// rounded tensors).
Tensor RankTensor(int r, const Shape& shape, DType dtype) {
  const int64_t n = NumElements(shape);
  Vec v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = (r + 1) * 100 + i;
  return MakeTensor(v, shape, dtype);
}

// Fails the rank's status with a message when got != want exactly.
absl::Status ExpectEqual(const Tensor& got, const Shape& shape, const Vec& want,
                         const std::string& what) {
  if (got.shape() != shape) {
    return absl::InternalError(absl::StrCat(what, ": shape ",
                                            ShapeToString(got.shape()),
                                            ", want ", ShapeToString(shape)));
  }
  const Vec g = got.ToDoubles();
  for (size_t i = 0; i < g.size(); ++i) {
    if (g[i] != want[i]) {
      return absl::InternalError(absl::StrCat(what, ": element ", i, " is ",
                                              g[i], ", want ", want[i]));
    }
  }
  return absl::OkStatus();
}

class MappingsTest : public ::testing::TestWithParam<int> {};

TEST_P(MappingsTest, CopyToTensorParallelIsIdentityThenAllReduce) {
  const int tp = GetParam();
  const Shape shape = {3, 4};
  TP_EXPECT_OK(RunGloo(tp, [&](Communicator& comm) -> absl::Status {
    Tensor x = RankTensor(comm.rank(), shape, DType::kFloat32);
    ASSIGN_OR_RETURN(Tensor y, CopyToTensorParallel::Forward(comm, x));
    if (!y.SharesStorageWith(x)) {
      return absl::InternalError("forward is not the identity handle");
    }
    ASSIGN_OR_RETURN(Tensor g, CopyToTensorParallel::Backward(comm, x));
    Vec want(12);
    for (int i = 0; i < 12; ++i) {
      for (int r = 0; r < tp; ++r) want[i] += (r + 1) * 100 + i;
    }
    RETURN_IF_ERROR(ExpectEqual(g, shape, want, "backward"));
    // The input is not modified by the reduction.
    return ExpectEqual(
        x, shape, RankTensor(comm.rank(), shape, DType::kFloat32).ToDoubles(),
        "input after backward");
  }));
}

TEST_P(MappingsTest, ReduceFromTensorParallelIsAllReduceThenIdentity) {
  const int tp = GetParam();
  const Shape shape = {2, 3, 2};
  TP_EXPECT_OK(RunGloo(tp, [&](Communicator& comm) -> absl::Status {
    Tensor x = RankTensor(comm.rank(), shape, DType::kFloat64);
    ASSIGN_OR_RETURN(Tensor y, ReduceFromTensorParallel::Forward(comm, x));
    Vec want(12);
    for (int i = 0; i < 12; ++i) {
      for (int r = 0; r < tp; ++r) want[i] += (r + 1) * 100 + i;
    }
    RETURN_IF_ERROR(ExpectEqual(y, shape, want, "forward"));
    ASSIGN_OR_RETURN(Tensor g, ReduceFromTensorParallel::Backward(comm, x));
    if (!g.SharesStorageWith(x)) {
      return absl::InternalError("backward is not the identity handle");
    }
    return absl::OkStatus();
  }));
}

// Full [2, 3, 4 * tp] replicated; rank r owns last-dim columns
// [4r, 4r + 4).
TEST_P(MappingsTest, ScatterAndGatherAlongLastDimAreInverse) {
  const int tp = GetParam();
  const int64_t m = 4;
  const Shape full_shape = {2, 3, m * tp};
  const Shape part_shape = {2, 3, m};
  for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kInt64}) {
    SCOPED_TRACE(DTypeName(dtype));
    TP_EXPECT_OK(RunGloo(tp, [&](Communicator& comm) -> absl::Status {
      const int r = comm.rank();
      // Scatter forward: own columns of a replicated tensor.
      Tensor full = RankTensor(0, full_shape, dtype);
      const Vec fv = full.ToDoubles();
      ASSIGN_OR_RETURN(Tensor part,
                       ScatterToTensorParallel::Forward(comm, full));
      Vec want_part;
      for (int64_t row = 0; row < 6; ++row) {
        for (int64_t c = 0; c < m; ++c) {
          want_part.push_back(fv[row * m * tp + r * m + c]);
        }
      }
      RETURN_IF_ERROR(ExpectEqual(part, part_shape, want_part, "scatter fwd"));
      // Gather forward (= scatter backward): rank q's piece lands in
      // columns [q m, q m + m).
      Tensor mine = RankTensor(r, part_shape, dtype);
      Vec want_full(NumElements(full_shape));
      for (int q = 0; q < tp; ++q) {
        const Vec pq = RankTensor(q, part_shape, dtype).ToDoubles();
        for (int64_t row = 0; row < 6; ++row) {
          for (int64_t c = 0; c < m; ++c) {
            want_full[row * m * tp + q * m + c] = pq[row * m + c];
          }
        }
      }
      ASSIGN_OR_RETURN(Tensor g1,
                       GatherFromTensorParallel::Forward(comm, mine));
      RETURN_IF_ERROR(ExpectEqual(g1, full_shape, want_full, "gather fwd"));
      ASSIGN_OR_RETURN(Tensor g2,
                       ScatterToTensorParallel::Backward(comm, mine));
      RETURN_IF_ERROR(ExpectEqual(g2, full_shape, want_full, "scatter bwd"));
      // Gather backward: own slice of the replicated gradient.
      ASSIGN_OR_RETURN(Tensor back,
                       GatherFromTensorParallel::Backward(comm, full));
      return ExpectEqual(back, part_shape, want_part, "gather bwd");
    }));
  }
}

// Sequence pair along dim 0: rank r owns rows [r n, r n + n) of [n tp, 3].
TEST_P(MappingsTest, SequenceParallelGatherAndReduceScatter) {
  const int tp = GetParam();
  const int64_t n = 2, h = 3;
  const Shape chunk_shape = {n, h};
  const Shape full_shape = {n * tp, h};
  TP_EXPECT_OK(RunGloo(tp, [&](Communicator& comm) -> absl::Status {
    const int r = comm.rank();
    // All-gather along dim 0 (GatherFromSequenceParallel forward,
    // ReduceScatterToSequenceParallel / ScatterToSequenceParallel backward).
    Tensor chunk = RankTensor(r, chunk_shape, DType::kFloat32);
    Vec want_full;
    for (int q = 0; q < tp; ++q) {
      for (int64_t i = 0; i < n * h; ++i)
        want_full.push_back((q + 1) * 100 + i);
    }
    ASSIGN_OR_RETURN(Tensor a,
                     GatherFromSequenceParallel::Forward(comm, chunk));
    RETURN_IF_ERROR(ExpectEqual(a, full_shape, want_full, "gather fwd"));
    ASSIGN_OR_RETURN(Tensor b,
                     ReduceScatterToSequenceParallel::Backward(comm, chunk));
    RETURN_IF_ERROR(ExpectEqual(b, full_shape, want_full, "rs bwd"));
    ASSIGN_OR_RETURN(Tensor c,
                     ScatterToSequenceParallel::Backward(comm, chunk));
    RETURN_IF_ERROR(ExpectEqual(c, full_shape, want_full, "scatter bwd"));
    // Reduce-scatter along dim 0: sum over ranks of [n tp, h], own rows.
    Tensor full = RankTensor(r, full_shape, DType::kFloat32);
    Vec want_chunk(n * h);
    for (int64_t i = 0; i < n * h; ++i) {
      for (int q = 0; q < tp; ++q)
        want_chunk[i] += (q + 1) * 100 + r * n * h + i;
    }
    ASSIGN_OR_RETURN(Tensor d,
                     ReduceScatterToSequenceParallel::Forward(comm, full));
    RETURN_IF_ERROR(ExpectEqual(d, chunk_shape, want_chunk, "rs fwd"));
    ASSIGN_OR_RETURN(Tensor e,
                     GatherFromSequenceParallel::Backward(comm, full));
    RETURN_IF_ERROR(ExpectEqual(e, chunk_shape, want_chunk, "gather bwd"));
    // Scatter forward: own rows, no reduction.
    ASSIGN_OR_RETURN(Tensor f, ScatterToSequenceParallel::Forward(comm, full));
    Vec want_own(n * h);
    for (int64_t i = 0; i < n * h; ++i)
      want_own[i] = (r + 1) * 100 + r * n * h + i;
    return ExpectEqual(f, chunk_shape, want_own, "scatter fwd");
  }));
}

TEST_P(MappingsTest, IndivisibleDimensionsAreInvalidArgument) {
  const int tp = GetParam();
  if (tp == 1) GTEST_SKIP() << "everything divides by 1";
  TP_EXPECT_OK(RunGloo(tp, [&](Communicator& comm) -> absl::Status {
    Tensor odd = RankTensor(0, {tp + 1, tp + 1}, DType::kFloat32);
    for (auto fn : {&ScatterToTensorParallel::Forward,
                    &GatherFromTensorParallel::Backward,
                    &ScatterToSequenceParallel::Forward,
                    &GatherFromSequenceParallel::Backward,
                    &ReduceScatterToSequenceParallel::Forward}) {
      absl::StatusOr<Tensor> r = fn(comm, odd);
      if (r.status().code() != absl::StatusCode::kInvalidArgument ||
          !absl::StrContains(r.status().message(), "not divisible") ||
          !absl::StrContains(r.status().message(), absl::StrCat(tp + 1))) {
        return absl::InternalError(
            absl::StrCat("expected kInvalidArgument naming ", tp + 1, ", got ",
                         r.status().ToString()));
      }
    }
    Tensor scalar = RankTensor(0, {}, DType::kFloat32);
    for (auto fn : {&GatherFromTensorParallel::Forward,
                    &GatherFromSequenceParallel::Forward,
                    &ScatterToTensorParallel::Forward}) {
      if (fn(comm, scalar).status().code() !=
          absl::StatusCode::kInvalidArgument) {
        return absl::InternalError("a scalar was accepted");
      }
    }
    // Every rank failed locally before communicating: the group still works.
    return comm.Barrier();
  }));
}

INSTANTIATE_TEST_SUITE_P(TensorParallelSizes, MappingsTest,
                         ::testing::Values(1, 2, 3, 4),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return absl::StrCat("tp", info.param);
                         });

}  // namespace
}  // namespace tp
