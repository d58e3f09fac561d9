// TransformerBlock against the float64 reference at TP = 1..4 (LayerNorm +
// GeLU multi-head, RMSNorm + SwiGLU grouped-query), with and without
// sequence parallelism; KV-cache generation; finite differences; low
// precision; failure injection over the fake communicator; errors.
#include "layers/transformer_block.h"

#include <memory>
#include <string>
#include <tuple>

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
using block_testing::PositionRows;
using block_testing::RandomParams;
using block_testing::RowSlice;
using block_testing::Vec;
using testing_layers::ExpectError;
using testing_layers::MakeTensor;
using testing_layers::RandomVec;
using testing_layers::RoundTo;
using testing_layers::RunFake;
using testing_layers::RunGloo;

// variant 0: LayerNorm, GeLU, 12 heads of 4. variant 1: RMSNorm, SwiGLU, 24
// query heads of 2 over 12 kv heads, no biases.
block_ref::Dims BlockDims(int variant) {
  block_ref::Dims d;
  d.batch = 2;
  d.seq = 6;
  d.hidden = 48;
  d.ffn = 96;
  if (variant == 0) {
    d.heads = 12;
    d.kv_heads = 12;
    d.head_dim = 4;
  } else {
    d.heads = 24;
    d.kv_heads = 12;
    d.head_dim = 2;
    d.swiglu = true;
    d.rms_norm = true;
    d.eps = 1e-6;
    d.bias = false;
  }
  return d;
}

TransformerBlock::Options BlockOptions(const block_ref::Dims& d, bool sp,
                                       DType dtype) {
  TransformerBlock::Options o;
  o.hidden = d.hidden;
  o.num_heads = d.heads;
  o.num_kv_heads = d.kv_heads;
  o.head_dim = d.head_dim;
  o.ffn = d.ffn;
  o.activation = d.swiglu ? MlpActivation::kSwiGLU : MlpActivation::kGeLU;
  o.norm = d.rms_norm ? NormKind::kRMSNorm : NormKind::kLayerNorm;
  o.norm_eps = d.eps;
  o.bias = d.bias;
  o.sequence_parallel = sp;
  o.dtype = dtype;
  o.name = "layers.0";
  return o;
}

absl::Status CheckBlock(const block_ref::Dims& d, int tp, bool sp, DType dtype) {
  const auto shapes = block_ref::BlockShapes(d, "");
  block_ref::Params params = RandomParams(shapes, 51);
  for (auto& [name, v] : params) v = RoundTo(v, dtype);
  const int64_t T = d.tokens(), H = d.hidden;
  const Vec x = RoundTo(RandomVec(T * H, 52), dtype);
  const Vec dy = RoundTo(RandomVec(T * H, 53), dtype);
  const Vec y_ref = block_ref::Block(params, "", d, x);
  block_ref::Params g_ref = block_ref::ZerosLike(params);
  const Vec dx_ref = block_ref::BlockBackward(params, "", d, x, dy, &g_ref);
  const double tol = testing_layers::Tolerance(dtype);
  return RunGloo(tp, [&](Communicator& comm) -> absl::Status {
    ASSIGN_OR_RETURN(auto blk,
                     TransformerBlock::Create(comm, BlockOptions(d, sp, dtype)));
    RETURN_IF_ERROR(LoadShards(blk->parameters(), params, shapes));
    const int64_t rows = sp ? T / tp : T;
    const int64_t r0 = sp ? comm.rank() * rows : 0;
    ASSIGN_OR_RETURN(Tensor y, blk->Forward(MakeTensor(RowSlice(x, H, r0, rows),
                                                       {rows, H}, dtype),
                                            {d.batch, d.seq}));
    RETURN_IF_ERROR(CheckClose(y, RowSlice(y_ref, H, r0, rows), tol, "y"));
    ASSIGN_OR_RETURN(Tensor dx, blk->Backward(MakeTensor(
                                    RowSlice(dy, H, r0, rows), {rows, H}, dtype)));
    RETURN_IF_ERROR(CheckClose(dx, RowSlice(dx_ref, H, r0, rows), tol, "dx"));
    return CheckShards(blk->grads(), g_ref, comm.rank(), tp, tol, "grads");
  });
}

class TransformerBlockTest
    : public ::testing::TestWithParam<std::tuple<int, int, bool>> {};

TEST_P(TransformerBlockTest, ForwardAndBackwardEqualFloat64Reference) {
  const auto [tp, variant, sp] = GetParam();
  TP_EXPECT_OK(CheckBlock(BlockDims(variant), tp, sp, DType::kFloat32));
}

INSTANTIATE_TEST_SUITE_P(
    TpVariantSp, TransformerBlockTest,
    ::testing::Combine(::testing::Values(1, 2, 3, 4), ::testing::Values(0, 1),
                       ::testing::Bool()),
    [](const ::testing::TestParamInfo<std::tuple<int, int, bool>>& info) {
      return absl::StrCat("tp", std::get<0>(info.param),
                          std::get<1>(info.param) == 0 ? "_layernorm_gelu_mha"
                                                       : "_rmsnorm_swiglu_gqa",
                          std::get<2>(info.param) ? "_sp" : "");
    });

TEST(TransformerBlockLowPrecision, Float16AndBFloat16WithinOnePercent) {
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    for (bool sp : {false, true}) {
      SCOPED_TRACE(absl::StrCat(DTypeName(dtype), sp ? " sp" : ""));
      TP_EXPECT_OK(CheckBlock(BlockDims(0), 2, sp, dtype));
      TP_EXPECT_OK(CheckBlock(BlockDims(1), 2, sp, dtype));
    }
  }
}

TEST(TransformerBlockKVCache, GenerationEqualsFullSequenceForward) {
  for (bool sp : {false, true}) {
    SCOPED_TRACE(sp);
    const block_ref::Dims d = BlockDims(1);
    const auto shapes = block_ref::BlockShapes(d, "");
    const block_ref::Params params = RandomParams(shapes, 61);
    const int64_t B = d.batch, S = d.seq, H = d.hidden;
    const Vec x = RandomVec(B * S * H, 62);
    const Vec y_ref = block_ref::Block(params, "", d, x);
    auto positions = [&](const Vec& m, int64_t p0, int64_t n) {
      return PositionRows(m, B, S, H, p0, n);
    };
    TP_EXPECT_OK(RunGloo(2, [&](Communicator& comm) -> absl::Status {
      ASSIGN_OR_RETURN(auto blk, TransformerBlock::Create(
                                     comm, BlockOptions(d, sp, DType::kFloat32)));
      RETURN_IF_ERROR(LoadShards(blk->parameters(), params, shapes));
      KVCache cache;
      int64_t p0 = 0;
      for (int64_t n : {3, 1, 1, 1}) {
        const int64_t rows = sp ? B * n / 2 : B * n;
        const int64_t r0 = sp ? comm.rank() * rows : 0;
        ASSIGN_OR_RETURN(
            Tensor y,
            blk->Forward(MakeTensor(RowSlice(positions(x, p0, n), H, r0, rows),
                                    {rows, H}, DType::kFloat32),
                         {B, n}, &cache));
        RETURN_IF_ERROR(CheckClose(y,
                                   RowSlice(positions(y_ref, p0, n), H, r0, rows),
                                   1e-5, absl::StrCat("position ", p0)));
        p0 += n;
      }
      if (cache.length() != S) return absl::InternalError("cache length");
      return ExpectError(
          blk->Backward(Tensor::Zeros({sp ? B / 2 : B, H}, DType::kFloat32))
              .status(),
          absl::StatusCode::kFailedPrecondition, {"layers.0"}, "cached");
    }));
  }
}

TEST(TransformerBlockFiniteDifference, SequenceParallelBackwardMatches) {
  for (int variant : {0, 1}) {
    SCOPED_TRACE(variant);
    block_ref::Dims d;
    d.batch = 2;
    d.seq = 2;
    d.hidden = 4;
    d.heads = 4;
    d.kv_heads = variant == 0 ? 4 : 2;
    d.head_dim = 1;
    d.ffn = 4;
    d.swiglu = variant == 1;
    d.rms_norm = variant == 1;
    d.bias = variant == 0;
    const auto shapes = block_ref::BlockShapes(d, "");
    const block_ref::Params params = RandomParams(shapes, 71);
    const int64_t T = d.tokens(), H = d.hidden;
    const Vec x = RandomVec(T * H, 72);
    const Vec r = RandomVec(T * H, 73);
    TP_EXPECT_OK(RunGloo(2, [&](Communicator& comm) -> absl::Status {
      ASSIGN_OR_RETURN(auto blk, TransformerBlock::Create(
                                     comm, BlockOptions(d, true, DType::kFloat64)));
      RETURN_IF_ERROR(LoadShards(blk->parameters(), params, shapes));
      const int64_t rows = T / 2, r0 = comm.rank() * rows;
      Tensor xt = MakeTensor(RowSlice(x, H, r0, rows), {rows, H}, DType::kFloat64);
      const Vec rl = RowSlice(r, H, r0, rows);
      // L = sum over all rows of y * r: each rank sums its rows, then the
      // ranks' partial sums are added (a collective, so every rank has L).
      auto loss = [&]() -> absl::StatusOr<double> {
        ASSIGN_OR_RETURN(Tensor y, blk->Forward(xt, {d.batch, d.seq}));
        const Vec yv = y.ToDoubles();
        double l = 0;
        for (size_t i = 0; i < yv.size(); ++i) l += yv[i] * rl[i];
        Tensor t = Tensor::Full({1}, l, DType::kFloat64);
        RETURN_IF_ERROR(comm.AllReduce(t));
        return t.ToDoubles()[0];
      };
      RETURN_IF_ERROR(loss().status());
      ASSIGN_OR_RETURN(Tensor dx, blk->Backward(MakeTensor(rl, {rows, H},
                                                           DType::kFloat64)));
      // Only this rank's rows: perturb them one owner at a time.
      const Vec dxv = dx.ToDoubles();
      for (int owner = 0; owner < 2; ++owner) {
        double* xp = xt.data<double>();
        for (int64_t i = 0; i < rows * H; ++i) {
          const double x0 = xp[i], h = 1e-6;
          if (comm.rank() == owner) xp[i] = x0 + h;
          ASSIGN_OR_RETURN(double lp, loss());
          if (comm.rank() == owner) xp[i] = x0 - h;
          ASSIGN_OR_RETURN(double lm, loss());
          xp[i] = x0;
          const double fd = (lp - lm) / (2 * h);
          if (comm.rank() == owner &&
              std::fabs(fd - dxv[i]) > 1e-7 * std::max(1.0, std::fabs(fd))) {
            return absl::InternalError(absl::StrCat("dx[", i, "] = ", dxv[i],
                                                    ", finite difference ", fd));
          }
        }
      }
      return block_testing::CheckParameterGradients(comm, blk->parameters(),
                                                    blk->grads(), loss);
    }));
  }
}

// A collective that fails at any point of a forward/backward pass comes back
// as a Status on every rank (the peers see kUnavailable), and the weights are
// unchanged.
TEST(TransformerBlockFailure, InjectedCollectiveFailureIsReportedAndWeightsUnchanged) {
  const block_ref::Dims d = BlockDims(0);
  const int64_t T = d.tokens(), H = d.hidden;
  const Vec x = RandomVec(T * H, 81);
  for (bool sp : {false, true}) {
    // A pass makes 4 collectives without sequence parallelism (2 forward, 2
    // backward) and 10 with it (4 gathers/scatters each way, 2 norm
    // gradient reductions).
    for (int64_t call = 0; call < (sp ? 10 : 4); ++call) {
      SCOPED_TRACE(absl::StrCat(sp ? "sp " : "", "failing call ", call));
      std::vector<FakeCommunicatorOptions> options(2);
      options[1].fail_on_call = call;
      options[1].failure = absl::InternalError("injected gloo failure");
      std::vector<absl::Status> statuses =
          RunFake(2, options, [&](Communicator& comm) -> absl::Status {
            ASSIGN_OR_RETURN(auto blk, TransformerBlock::Create(
                                           comm, BlockOptions(d, sp, DType::kFloat32)));
            std::vector<Vec> before;
            for (const ParameterShard& p : blk->parameters()) {
              before.push_back(p.tensor.ToDoubles());
            }
            const int64_t rows = sp ? T / 2 : T;
            const Tensor xt = MakeTensor(RowSlice(x, H, 0, rows), {rows, H},
                                         DType::kFloat32);
            absl::Status s = [&]() -> absl::Status {
              ASSIGN_OR_RETURN(Tensor y, blk->Forward(xt, {d.batch, d.seq}));
              return blk->Backward(y).status();
            }();
            const auto after = blk->parameters();
            for (size_t i = 0; i < after.size(); ++i) {
              if (after[i].tensor.ToDoubles() != before[i]) {
                return absl::InternalError(
                    absl::StrCat(after[i].name, " changed"));
              }
            }
            return s;
          });
      EXPECT_EQ(statuses[1].code(), absl::StatusCode::kInternal) << statuses[1];
      EXPECT_NE(statuses[1].message().find("injected gloo failure"),
                std::string::npos)
          << statuses[1];
      EXPECT_EQ(statuses[0].code(), absl::StatusCode::kUnavailable)
          << statuses[0];
    }
  }
}

TEST(TransformerBlockErrors, IndivisibleSizesAndBadShapes) {
  TP_EXPECT_OK(RunGloo(3, [&](Communicator& comm) -> absl::Status {
    TransformerBlock::Options o = BlockOptions(BlockDims(0), false,
                                               DType::kFloat32);
    o.num_heads = 8;
    o.num_kv_heads = 8;
    o.head_dim = 6;
    RETURN_IF_ERROR(ExpectError(
        TransformerBlock::Create(comm, o).status(),
        absl::StatusCode::kInvalidArgument,
        {"layers.0.attention", "num_kv_heads 8", "tensor-parallel size 3"},
        "heads % tp"));
    o = BlockOptions(BlockDims(0), false, DType::kFloat32);
    o.ffn = 100;
    RETURN_IF_ERROR(ExpectError(TransformerBlock::Create(comm, o).status(),
                                absl::StatusCode::kInvalidArgument,
                                {"layers.0.mlp", "ffn 100"}, "ffn % tp"));
    o = BlockOptions(BlockDims(0), false, DType::kFloat32);
    o.norm_eps = -1;
    RETURN_IF_ERROR(ExpectError(TransformerBlock::Create(comm, o).status(),
                                absl::StatusCode::kInvalidArgument,
                                {"layers.0.input_norm", "eps"}, "eps"));
    o = BlockOptions(BlockDims(0), true, DType::kFloat32);
    ASSIGN_OR_RETURN(auto blk, TransformerBlock::Create(comm, o));
    // 12 rows per rank under sequence parallelism = 36 tokens, not 2 x 6.
    RETURN_IF_ERROR(ExpectError(
        blk->Forward(Tensor::Zeros({12, 48}, DType::kFloat32), {2, 6}).status(),
        absl::StatusCode::kInvalidArgument,
        {"layers.0.attention", "batch 2", "seq 6", "36 rows"}, "sp layout"));
    RETURN_IF_ERROR(ExpectError(
        blk->Forward(Tensor::Zeros({4, 47}, DType::kFloat32), {2, 6}).status(),
        absl::StatusCode::kInvalidArgument, {"layers.0.input_norm", "[4, 47]"},
        "width"));
    return ExpectError(blk->Backward(Tensor::Zeros({4, 48}, DType::kFloat32))
                           .status(),
                       absl::StatusCode::kFailedPrecondition, {"layers.0"},
                       "no forward");
  }));
}

}  // namespace
}  // namespace tp
