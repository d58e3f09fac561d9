// ParallelMLP against the float64 reference (tests/layers/block_reference.h)
// at TP = 1..4, GeLU and SwiGLU, with and without sequence parallelism;
// finite differences; errors.
#include "layers/mlp.h"

#include <memory>
#include <string>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "runtime/status_macros.h"
#include "tests/layers/block_reference.h"
#include "tests/layers/block_test_util.h"
#include "tests/layers/layer_test_util.h"

namespace tp {
namespace {

using block_testing::CheckClose;
using block_testing::CheckShards;
using block_testing::LoadShards;
using block_testing::RandomParams;
using block_testing::RowSlice;
using block_testing::Vec;
using testing_layers::ExpectError;
using testing_layers::MakeTensor;
using testing_layers::RandomVec;
using testing_layers::RunGloo;

block_ref::Dims MlpDims(bool swiglu) {
  block_ref::Dims d;
  d.batch = 2;
  d.seq = 6;
  d.hidden = 24;
  d.ffn = 48;
  d.swiglu = swiglu;
  return d;
}

ParallelMLP::Options MlpOptions(const block_ref::Dims& d, bool sp, DType dtype) {
  ParallelMLP::Options o;
  o.hidden = d.hidden;
  o.ffn = d.ffn;
  o.activation = d.swiglu ? MlpActivation::kSwiGLU : MlpActivation::kGeLU;
  o.bias = d.bias;
  o.sequence_parallel = sp;
  o.dtype = dtype;
  return o;
}

class ParallelMLPTest
    : public ::testing::TestWithParam<std::tuple<int, bool, bool>> {};

TEST_P(ParallelMLPTest, ForwardAndBackwardEqualFloat64Reference) {
  const auto [tp, swiglu, sp] = GetParam();
  const block_ref::Dims d = MlpDims(swiglu);
  const auto shapes = block_ref::MlpShapes(d, "");
  const block_ref::Params params = RandomParams(shapes, 7);
  const int64_t T = d.tokens(), H = d.hidden;
  const Vec x = RandomVec(T * H, 11);
  const Vec dy = RandomVec(T * H, 12);
  const Vec y_ref = block_ref::Mlp(params, "", d, x);
  block_ref::Params g_ref = block_ref::ZerosLike(params);
  const Vec dx_ref = block_ref::MlpBackward(params, "", d, x, dy, &g_ref);
  // A second backward pass must accumulate.
  block_ref::Params g2_ref = g_ref;
  for (auto& [name, v] : g2_ref) {
    for (double& e : v) e *= 2;
  }

  TP_EXPECT_OK(RunGloo(tp, [&](Communicator& comm) -> absl::Status {
    ASSIGN_OR_RETURN(auto mlp, ParallelMLP::Create(
                                   comm, MlpOptions(d, sp, DType::kFloat32)));
    RETURN_IF_ERROR(LoadShards(mlp->parameters(), params, shapes));
    const int64_t rows = sp ? T / tp : T;
    const int64_t r0 = sp ? comm.rank() * rows : 0;
    const Tensor xt = MakeTensor(RowSlice(x, H, r0, rows), {rows, H},
                                 DType::kFloat32);
    const Tensor dyt = MakeTensor(RowSlice(dy, H, r0, rows), {rows, H},
                                  DType::kFloat32);
    for (int pass = 1; pass <= 2; ++pass) {
      ASSIGN_OR_RETURN(Tensor y, mlp->Forward(xt));
      RETURN_IF_ERROR(CheckClose(y, RowSlice(y_ref, H, r0, rows), 1e-5, "y"));
      ASSIGN_OR_RETURN(Tensor dx, mlp->Backward(dyt));
      RETURN_IF_ERROR(
          CheckClose(dx, RowSlice(dx_ref, H, r0, rows), 1e-5, "dx"));
      RETURN_IF_ERROR(CheckShards(mlp->grads(), pass == 1 ? g_ref : g2_ref,
                                  comm.rank(), tp, 1e-5,
                                  absl::StrCat("pass ", pass)));
    }
    mlp->ZeroGrad();
    for (const ParameterShard& g : mlp->grads()) {
      for (double v : g.tensor.ToDoubles()) {
        if (v != 0.0) return absl::InternalError("ZeroGrad left a nonzero");
      }
    }
    return absl::OkStatus();
  }));
}

INSTANTIATE_TEST_SUITE_P(
    TpActivationSp, ParallelMLPTest,
    ::testing::Combine(::testing::Values(1, 2, 3, 4), ::testing::Bool(),
                       ::testing::Bool()),
    [](const ::testing::TestParamInfo<std::tuple<int, bool, bool>>& info) {
      return absl::StrCat("tp", std::get<0>(info.param),
                          std::get<1>(info.param) ? "_swiglu" : "_gelu",
                          std::get<2>(info.param) ? "_sp" : "");
    });

// Central differences of L = sum(y * r) in float64 on a tiny MLP at TP = 2.
TEST(ParallelMLPFiniteDifference, BackwardMatchesFiniteDifferences) {
  for (bool swiglu : {false, true}) {
    block_ref::Dims d;
    d.batch = 1;
    d.seq = 2;
    d.hidden = 4;
    d.ffn = 6;
    d.swiglu = swiglu;
    const auto shapes = block_ref::MlpShapes(d, "");
    const block_ref::Params params = RandomParams(shapes, 3);
    const int64_t T = d.tokens(), H = d.hidden;
    const Vec x = RandomVec(T * H, 4);
    const Vec r = RandomVec(T * H, 5);
    TP_EXPECT_OK(RunGloo(2, [&](Communicator& comm) -> absl::Status {
      ASSIGN_OR_RETURN(auto mlp, ParallelMLP::Create(
                                     comm, MlpOptions(d, false, DType::kFloat64)));
      RETURN_IF_ERROR(LoadShards(mlp->parameters(), params, shapes));
      Tensor xt = MakeTensor(x, {T, H}, DType::kFloat64);
      auto loss = [&]() -> absl::StatusOr<double> {
        ASSIGN_OR_RETURN(Tensor y, mlp->Forward(xt));
        const Vec yv = y.ToDoubles();
        double l = 0;
        for (size_t i = 0; i < yv.size(); ++i) l += yv[i] * r[i];
        return l;
      };
      RETURN_IF_ERROR(loss().status());
      ASSIGN_OR_RETURN(Tensor dx,
                       mlp->Backward(MakeTensor(r, {T, H}, DType::kFloat64)));
      RETURN_IF_ERROR(block_testing::CheckInputGradient(xt, dx.ToDoubles(),
                                                        loss, "dx"));
      // Every parameter element, one owning rank at a time (the collectives
      // inside Forward keep the ranks in step). A replicated parameter is
      // perturbed on every rank at once, so the difference is its full
      // gradient; a split one only on its owner.
      RETURN_IF_ERROR(block_testing::CheckParameterGradients(comm, mlp->parameters(),
                                              mlp->grads(), loss));
      return absl::OkStatus();
    }));
  }
}

// A [batch, seq, hidden] input gives the [tokens, hidden] results reshaped.
TEST(ParallelMLPShapes, RankThreeInputEqualsFlattenedInput) {
  for (bool swiglu : {false, true}) {
    const block_ref::Dims d = MlpDims(swiglu);
    const auto shapes = block_ref::MlpShapes(d, "");
    const block_ref::Params params = RandomParams(shapes, 8);
    const int64_t T = d.tokens(), H = d.hidden;
    const Vec x = RandomVec(T * H, 13);
    const Vec dy = RandomVec(T * H, 14);
    const Vec y_ref = block_ref::Mlp(params, "", d, x);
    block_ref::Params g_ref = block_ref::ZerosLike(params);
    const Vec dx_ref = block_ref::MlpBackward(params, "", d, x, dy, &g_ref);
    TP_EXPECT_OK(RunGloo(2, [&](Communicator& comm) -> absl::Status {
      ASSIGN_OR_RETURN(auto mlp, ParallelMLP::Create(
                                     comm, MlpOptions(d, false, DType::kFloat32)));
      RETURN_IF_ERROR(LoadShards(mlp->parameters(), params, shapes));
      const Shape s3 = {d.batch, d.seq, H};
      ASSIGN_OR_RETURN(Tensor y, mlp->Forward(MakeTensor(x, s3, DType::kFloat32)));
      if (y.shape() != s3) return absl::InternalError("output shape");
      RETURN_IF_ERROR(CheckClose(y, y_ref, 1e-5, "y"));
      ASSIGN_OR_RETURN(Tensor dx,
                       mlp->Backward(MakeTensor(dy, s3, DType::kFloat32)));
      if (dx.shape() != s3) return absl::InternalError("dx shape");
      RETURN_IF_ERROR(CheckClose(dx, dx_ref, 1e-5, "dx"));
      return CheckShards(mlp->grads(), g_ref, comm.rank(), 2, 1e-5, "grads");
    }));
  }
}

TEST(ParallelMLPErrors, InvalidOptionsAndInputs) {
  TP_EXPECT_OK(RunGloo(2, [&](Communicator& comm) -> absl::Status {
    ParallelMLP::Options o = MlpOptions(MlpDims(false), false, DType::kFloat32);
    o.ffn = 45;
    o.name = "blk.mlp";
    RETURN_IF_ERROR(ExpectError(ParallelMLP::Create(comm, o).status(),
                                absl::StatusCode::kInvalidArgument,
                                {"blk.mlp", "ffn 45", "2"}, "ffn % tp"));
    o.ffn = 0;
    RETURN_IF_ERROR(ExpectError(ParallelMLP::Create(comm, o).status(),
                                absl::StatusCode::kInvalidArgument,
                                {"blk.mlp", "ffn (0)"}, "ffn 0"));
    o.ffn = 48;
    o.dtype = DType::kInt32;
    RETURN_IF_ERROR(ExpectError(ParallelMLP::Create(comm, o).status(),
                                absl::StatusCode::kInvalidArgument,
                                {"blk.mlp", "int32"}, "dtype"));
    o.dtype = DType::kFloat32;
    ASSIGN_OR_RETURN(auto mlp, ParallelMLP::Create(comm, o));
    RETURN_IF_ERROR(ExpectError(mlp->Backward(Tensor::Zeros({4, 24}, DType::kFloat32))
                                    .status(),
                                absl::StatusCode::kFailedPrecondition,
                                {"blk.mlp"}, "backward first"));
    RETURN_IF_ERROR(ExpectError(
        mlp->Forward(Tensor::Zeros({4, 23}, DType::kFloat32)).status(),
        absl::StatusCode::kInvalidArgument, {"blk.mlp", "[4, 23]"},
        "bad hidden"));
    RETURN_IF_ERROR(ExpectError(
        mlp->Forward(Tensor::Zeros({4, 24}, DType::kFloat64)).status(),
        absl::StatusCode::kInvalidArgument, {"blk.mlp", "float64"},
        "bad dtype"));
    ASSIGN_OR_RETURN(Tensor y, mlp->Forward(Tensor::Zeros({4, 24}, DType::kFloat32)));
    RETURN_IF_ERROR(ExpectError(
        mlp->Backward(Tensor::Zeros({3, 24}, DType::kFloat32)).status(),
        absl::StatusCode::kInvalidArgument, {"blk.mlp", "[3, 24]"},
        "bad grad shape"));
    return absl::OkStatus();
  }));
}

}  // namespace
}  // namespace tp
