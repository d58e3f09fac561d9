// Norm (LayerNorm / RMSNorm) against the float64 reference, the
// sequence-parallel gradient all-reduce at TP = 2..4, low precision, failure
// atomicity over the fake communicator, and errors.
#include "layers/norm.h"

#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "runtime/status_macros.h"
#include "tests/layers/block_reference.h"
#include "tests/layers/block_test_util.h"
#include "tests/layers/layer_test_util.h"
#include "tests/testing/fake_communicator.h"

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
using testing_layers::RoundTo;
using testing_layers::RunFake;
using testing_layers::RunGloo;

constexpr int64_t kTokens = 12;
constexpr int64_t kHidden = 20;

struct Case {
  block_ref::Dims d;
  block_ref::Params params;
  block_testing::Shapes shapes;
  Vec x, dy, y, dx;
  block_ref::Params grads;
};

// Reference results for a [kTokens, kHidden] input; inputs and parameters
// rounded to `dtype` first, so that the layer and the reference see the same
// values.
Case MakeCase(bool rms, DType dtype) {
  Case c;
  c.d.batch = 1;
  c.d.seq = kTokens;
  c.d.hidden = kHidden;
  c.d.rms_norm = rms;
  c.d.eps = rms ? 1e-6 : 1e-5;
  c.shapes = block_ref::NormShapes(c.d, "");
  c.params = RandomParams(c.shapes, rms ? 5 : 6);
  for (auto& [name, v] : c.params) v = RoundTo(v, dtype);
  c.x = RoundTo(RandomVec(kTokens * kHidden, 7, 2.0), dtype);
  c.dy = RoundTo(RandomVec(kTokens * kHidden, 8), dtype);
  c.grads = block_ref::ZerosLike(c.params);
  if (rms) {
    c.y = block_ref::RmsNorm(c.x, kTokens, kHidden, c.params["weight"], c.d.eps);
    c.dx = block_ref::RmsNormBackward(c.dy, c.x, kTokens, kHidden,
                                      c.params["weight"], c.d.eps,
                                      &c.grads["weight"]);
  } else {
    c.y = block_ref::LayerNorm(c.x, kTokens, kHidden, c.params["weight"],
                               c.params["bias"], c.d.eps);
    c.dx = block_ref::LayerNormBackward(c.dy, c.x, kTokens, kHidden,
                                        c.params["weight"], c.d.eps,
                                        &c.grads["weight"], &c.grads["bias"]);
  }
  return c;
}

Norm::Options NormOptions(const Case& c, bool sp, DType dtype) {
  Norm::Options o;
  o.hidden = kHidden;
  o.kind = c.d.rms_norm ? NormKind::kRMSNorm : NormKind::kLayerNorm;
  o.eps = c.d.eps;
  o.sequence_parallel = sp;
  o.dtype = dtype;
  o.name = "final_norm";
  return o;
}

TEST(NormTest, InitialParametersAreOnesAndZeros) {
  FakeCommunicator comm;
  Norm::Options o;
  o.hidden = 3;
  auto n = Norm::Create(comm, o);
  ASSERT_TRUE(n.ok()) << n.status();
  const auto params = (*n)->parameters();
  ASSERT_EQ(params.size(), 2u);
  EXPECT_EQ(params[0].name, "weight");
  EXPECT_EQ(params[0].tensor.ToDoubles(), Vec({1, 1, 1}));
  EXPECT_TRUE(params[0].replicated());
  EXPECT_EQ(params[1].name, "bias");
  EXPECT_EQ(params[1].tensor.ToDoubles(), Vec({0, 0, 0}));
  o.kind = NormKind::kRMSNorm;
  n = Norm::Create(comm, o);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ((*n)->parameters().size(), 1u);
  EXPECT_FALSE((*n)->bias().defined());
}

TEST(NormTest, ForwardAndBackwardEqualFloat64Reference) {
  for (bool rms : {false, true}) {
    for (DType dtype : {DType::kFloat32, DType::kFloat64, DType::kFloat16,
                        DType::kBFloat16}) {
      SCOPED_TRACE(absl::StrCat(rms ? "rms " : "layer ", DTypeName(dtype)));
      const Case c = MakeCase(rms, dtype);
      const double tol = testing_layers::Tolerance(dtype);
      FakeCommunicator comm;
      auto n = Norm::Create(comm, NormOptions(c, false, dtype));
      ASSERT_TRUE(n.ok()) << n.status();
      TP_EXPECT_OK(LoadShards((*n)->parameters(), c.params, c.shapes));
      auto y = (*n)->Forward(MakeTensor(c.x, {kTokens, kHidden}, dtype));
      ASSERT_TRUE(y.ok()) << y.status();
      TP_EXPECT_OK(CheckClose(*y, c.y, tol, "y"));
      auto dx = (*n)->Backward(MakeTensor(c.dy, {kTokens, kHidden}, dtype));
      ASSERT_TRUE(dx.ok()) << dx.status();
      TP_EXPECT_OK(CheckClose(*dx, c.dx, tol, "dx"));
      TP_EXPECT_OK(CheckShards((*n)->grads(), c.grads, 0, 1, tol, "grads"));
      EXPECT_EQ(comm.calls(), 0) << "a norm without sequence parallelism "
                                    "must not communicate";
    }
  }
}

// Each rank normalises its own rows; the gradients are all-reduced so every
// rank holds the full-batch gradient.
TEST(NormTest, SequenceParallelGradientsAreAllReduced) {
  for (int tp : {2, 3, 4}) {
    for (bool rms : {false, true}) {
      SCOPED_TRACE(absl::StrCat("tp ", tp, rms ? " rms" : " layer"));
      const Case c = MakeCase(rms, DType::kFloat32);
      TP_EXPECT_OK(RunGloo(tp, [&](Communicator& comm) -> absl::Status {
        ASSIGN_OR_RETURN(auto n, Norm::Create(comm, NormOptions(c, true,
                                                                DType::kFloat32)));
        RETURN_IF_ERROR(LoadShards(n->parameters(), c.params, c.shapes));
        const int64_t rows = kTokens / tp, r0 = comm.rank() * rows;
        ASSIGN_OR_RETURN(Tensor y, n->Forward(MakeTensor(
                                       RowSlice(c.x, kHidden, r0, rows),
                                       {rows, kHidden}, DType::kFloat32)));
        RETURN_IF_ERROR(CheckClose(y, RowSlice(c.y, kHidden, r0, rows), 1e-5, "y"));
        ASSIGN_OR_RETURN(Tensor dx, n->Backward(MakeTensor(
                                        RowSlice(c.dy, kHidden, r0, rows),
                                        {rows, kHidden}, DType::kFloat32)));
        RETURN_IF_ERROR(
            CheckClose(dx, RowSlice(c.dx, kHidden, r0, rows), 1e-5, "dx"));
        return CheckShards(n->grads(), c.grads, comm.rank(), tp, 1e-5, "grads");
      }));
    }
  }
}

TEST(NormTest, FailedAllReduceLeavesGradientsUnchanged) {
  const Case c = MakeCase(false, DType::kFloat32);
  std::vector<FakeCommunicatorOptions> options(2);
  options[1].fail_on_call = 0;
  std::vector<absl::Status> statuses =
      RunFake(2, options, [&](Communicator& comm) -> absl::Status {
        auto n = Norm::Create(comm, NormOptions(c, true, DType::kFloat32));
        if (!n.ok()) return absl::InternalError(n.status().ToString());
        if (!(*n)->Forward(MakeTensor(RowSlice(c.x, kHidden, 0, 6), {6, kHidden},
                                      DType::kFloat32))
                 .ok()) {
          return absl::InternalError("forward failed");
        }
        absl::Status s = (*n)->Backward(MakeTensor(RowSlice(c.dy, kHidden, 0, 6),
                                                   {6, kHidden}, DType::kFloat32))
                             .status();
        for (const ParameterShard& g : (*n)->grads()) {
          for (double v : g.tensor.ToDoubles()) {
            if (v != 0.0) return absl::InternalError("gradient written");
          }
        }
        return s;
      });
  ASSERT_EQ(statuses.size(), 2u);
  EXPECT_EQ(statuses[1].code(), absl::StatusCode::kUnavailable) << statuses[1];
  EXPECT_EQ(statuses[0].code(), absl::StatusCode::kUnavailable) << statuses[0];
  EXPECT_NE(statuses[0].message().find("final_norm"), std::string::npos)
      << statuses[0];
}

TEST(NormTest, Errors) {
  FakeCommunicator comm;
  Norm::Options o;
  o.name = "ln_f";
  o.hidden = 0;
  TP_EXPECT_OK(ExpectError(Norm::Create(comm, o).status(),
                           absl::StatusCode::kInvalidArgument,
                           {"ln_f", "hidden (0)"}, "hidden"));
  o.hidden = 4;
  o.eps = -1;
  TP_EXPECT_OK(ExpectError(Norm::Create(comm, o).status(),
                           absl::StatusCode::kInvalidArgument, {"ln_f", "eps"},
                           "eps"));
  o.eps = 1e-5;
  o.dtype = DType::kInt64;
  TP_EXPECT_OK(ExpectError(Norm::Create(comm, o).status(),
                           absl::StatusCode::kInvalidArgument, {"ln_f", "int64"},
                           "dtype"));
  o.dtype = DType::kFloat32;
  auto n = Norm::Create(comm, o);
  ASSERT_TRUE(n.ok());
  TP_EXPECT_OK(ExpectError(
      (*n)->Forward(Tensor::Zeros({2, 5}, DType::kFloat32)).status(),
      absl::StatusCode::kInvalidArgument, {"ln_f", "[2, 5]", "hidden = 4"},
      "width"));
  TP_EXPECT_OK(ExpectError(
      (*n)->Forward(Tensor::Zeros({2, 4}, DType::kFloat16)).status(),
      absl::StatusCode::kInvalidArgument, {"ln_f", "float16"}, "dtype"));
  TP_EXPECT_OK(ExpectError(
      (*n)->Backward(Tensor::Zeros({2, 4}, DType::kFloat32)).status(),
      absl::StatusCode::kFailedPrecondition, {"ln_f"}, "no forward"));
  ASSERT_TRUE((*n)->Forward(Tensor::Zeros({2, 4}, DType::kFloat32)).ok());
  TP_EXPECT_OK(ExpectError(
      (*n)->Backward(Tensor::Zeros({3, 4}, DType::kFloat32)).status(),
      absl::StatusCode::kInvalidArgument, {"ln_f", "[3, 4]", "[2, 4]"},
      "grad shape"));
}

}  // namespace
}  // namespace tp
