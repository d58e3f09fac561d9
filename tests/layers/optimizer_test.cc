// SGD and AdamW against hand-computed updates; global-norm clipping over a
// TP group (replicated parameters counted once); data-parallel averaging on a
// 2 x 2 grid; failure atomicity; errors.
#include "layers/optimizer.h"

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "runtime/status_macros.h"
#include "tests/layers/block_test_util.h"
#include "tests/layers/layer_test_util.h"
#include "tests/testing/fake_communicator.h"

namespace tp {
namespace {

using block_testing::GridRank;
using block_testing::RunGrid;
using block_testing::Vec;
using testing_layers::ExpectError;
using testing_layers::MakeTensor;
using testing_layers::RunFake;

ParameterShard Shard(const std::string& name, const Vec& v, DType dtype,
                     Shape full_shape, int split_dim, int64_t offset) {
  return {name, MakeTensor(v, {static_cast<int64_t>(v.size())}, dtype),
          std::move(full_shape), split_dim, offset};
}

ParameterShard Replicated(const std::string& name, const Vec& v,
                          DType dtype = DType::kFloat64) {
  return Shard(name, v, dtype, {static_cast<int64_t>(v.size())}, -1, 0);
}

ParameterShard GradOf(const ParameterShard& p, const Vec& g) {
  ParameterShard s = p;
  s.tensor = MakeTensor(g, p.tensor.shape(), p.tensor.dtype());
  return s;
}

void SetGrad(const ParameterShard& g, const Vec& v) {
  Tensor t = g.tensor;
  ASSERT_TRUE(t.CopyFrom(MakeTensor(v, t.shape(), t.dtype())).ok());
}

void ExpectNear(const Vec& got, const Vec& want, double tol) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], tol * std::max(1.0, std::fabs(want[i])))
        << "element " << i;
  }
}

const std::vector<Vec> kGrads = {{0.5, -1.0, 2.0}, {0.25, 0.5, -1.5},
                                 {-0.75, 1.0, 0.125}};

TEST(SGDTest, MomentumAndWeightDecayMatchHandComputation) {
  ParameterShard p = Replicated("w", {1.0, -2.0, 3.0});
  ParameterShard g = GradOf(p, {0, 0, 0});
  SGDOptions o;
  o.lr = 0.1;
  o.momentum = 0.9;
  o.weight_decay = 0.01;
  auto sgd = SGD::Create({p}, {g}, o);
  ASSERT_TRUE(sgd.ok()) << sgd.status();
  Vec w = {1.0, -2.0, 3.0}, buf(3, 0.0);
  for (size_t step = 0; step < kGrads.size(); ++step) {
    SetGrad(g, kGrads[step]);
    TP_EXPECT_OK((*sgd)->Step());
    for (int i = 0; i < 3; ++i) {
      const double d = kGrads[step][i] + 0.01 * w[i];
      buf[i] = step == 0 ? d : 0.9 * buf[i] + d;
      w[i] -= 0.1 * buf[i];
    }
    ExpectNear(p.tensor.ToDoubles(), w, 1e-14);
  }
  EXPECT_EQ((*sgd)->step_count(), 3);
  const auto state = (*sgd)->state();
  ASSERT_EQ(state.size(), 1u);
  EXPECT_EQ(state[0].name, "w.momentum_buffer");
  ExpectNear(state[0].tensor.ToDoubles(), buf, 1e-14);
  // Plain SGD keeps no state.
  auto plain = SGD::Create({p}, {g}, SGDOptions());
  ASSERT_TRUE(plain.ok());
  EXPECT_TRUE((*plain)->state().empty());
}

TEST(AdamWTest, MatchesHandComputation) {
  ParameterShard p = Replicated("w", {1.0, -2.0, 3.0});
  ParameterShard g = GradOf(p, {0, 0, 0});
  AdamWOptions o;
  o.lr = 0.01;
  o.beta1 = 0.8;
  o.beta2 = 0.95;
  o.eps = 1e-6;
  o.weight_decay = 0.1;
  auto adam = AdamW::Create({p}, {g}, o);
  ASSERT_TRUE(adam.ok()) << adam.status();
  Vec w = {1.0, -2.0, 3.0}, m(3, 0.0), v(3, 0.0);
  for (size_t step = 1; step <= kGrads.size(); ++step) {
    SetGrad(g, kGrads[step - 1]);
    TP_EXPECT_OK((*adam)->Step());
    for (int i = 0; i < 3; ++i) {
      const double gi = kGrads[step - 1][i];
      w[i] -= 0.01 * 0.1 * w[i];
      m[i] = 0.8 * m[i] + 0.2 * gi;
      v[i] = 0.95 * v[i] + 0.05 * gi * gi;
      const double mh = m[i] / (1 - std::pow(0.8, step));
      const double vh = v[i] / (1 - std::pow(0.95, step));
      w[i] -= 0.01 * mh / (std::sqrt(vh) + 1e-6);
    }
    ExpectNear(p.tensor.ToDoubles(), w, 1e-13);
  }
  const auto state = (*adam)->state();
  ASSERT_EQ(state.size(), 2u);
  EXPECT_EQ(state[0].name, "w.exp_avg");
  EXPECT_EQ(state[1].name, "w.exp_avg_sq");
  ExpectNear(state[0].tensor.ToDoubles(), m, 1e-14);
  ExpectNear(state[1].tensor.ToDoubles(), v, 1e-14);
}

// The first AdamW step moves every element by lr * g / (|g| + eps) (m_hat =
// g, v_hat = g^2): about lr * sign(g) whatever the gradient's scale.
TEST(AdamWTest, FirstStepIsSignTimesLearningRate) {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    ParameterShard p = Shard("w", {0.5, -0.5, 0.25, 1.0}, dtype, {8}, 0, 4);
    ParameterShard g = GradOf(p, {1e-3, -20.0, 0.0, 3.0});
    AdamWOptions o;
    o.lr = 0.125;
    o.weight_decay = 0.0;
    auto adam = AdamW::Create({p}, {g}, o);
    ASSERT_TRUE(adam.ok()) << adam.status();
    TP_EXPECT_OK((*adam)->Step());
    const double tol = dtype == DType::kFloat32 ? 1e-6 : 1e-2;
    const Vec g0 = {1e-3, -20.0, 0.0, 3.0}, p0 = {0.5, -0.5, 0.25, 1.0};
    Vec want(4);
    for (int i = 0; i < 4; ++i) {
      want[i] = p0[i] - 0.125 * g0[i] / (std::fabs(g0[i]) + 1e-8);
    }
    ExpectNear(p.tensor.ToDoubles(), want, tol);
    EXPECT_EQ((*adam)->state()[0].tensor.dtype(), DType::kFloat32);
    EXPECT_EQ((*adam)->state()[0].offset, 4);
  }
}

TEST(OptimizerTest, ZeroGradAndLearningRate) {
  ParameterShard p = Replicated("w", {1.0});
  ParameterShard g = GradOf(p, {2.0});
  auto sgd = SGD::Create({p}, {g}, SGDOptions());
  ASSERT_TRUE(sgd.ok());
  TP_EXPECT_OK((*sgd)->set_lr(0.5));
  EXPECT_EQ((*sgd)->lr(), 0.5);
  TP_EXPECT_OK((*sgd)->Step());
  ExpectNear(p.tensor.ToDoubles(), {0.0}, 1e-15);
  EXPECT_EQ((*sgd)->last_grad_norm(), 2.0);
  (*sgd)->ZeroGrad();
  EXPECT_EQ(g.tensor.ToDoubles(), Vec({0.0}));
  TP_EXPECT_OK(ExpectError((*sgd)->set_lr(-1), absl::StatusCode::kInvalidArgument,
                           {"lr"}, "negative lr"));
  TP_EXPECT_OK(ExpectError((*sgd)->set_lr(NAN), absl::StatusCode::kInvalidArgument,
                           {"lr"}, "nan lr"));
}

// TP = 2: a column-split weight [4] (2 elements per rank) and a replicated
// bias [2] held by both ranks. The global norm counts each weight element once
// (all-reduced) and the bias once (not all-reduced), and clipping scales
// every gradient by max_norm / (norm + 1e-6).
TEST(OptimizerTest, GlobalNormCountsReplicatedParametersOnce) {
  const Vec full_w_grad = {3.0, 1.0, -2.0, 4.0};
  const Vec bias_grad = {1.0, -5.0};
  double sq = 0;
  for (double v : full_w_grad) sq += v * v;
  for (double v : bias_grad) sq += v * v;
  const double norm = std::sqrt(sq);  // sqrt(56)
  for (double max_norm : {0.0, 100.0, 2.0}) {
    SCOPED_TRACE(max_norm);
    TP_EXPECT_OK(RunGrid(1, 2, [&](GridRank& r) -> absl::Status {
      const int64_t off = 2 * r.tp_rank;
      ParameterShard w = Shard("weight", {0, 0}, DType::kFloat32, {4}, 0, off);
      ParameterShard b = Replicated("bias", {0, 0}, DType::kFloat32);
      ParameterShard gw = GradOf(w, {full_w_grad[off], full_w_grad[off + 1]});
      ParameterShard gb = GradOf(b, bias_grad);
      SGDOptions o;
      o.lr = 1.0;
      o.max_grad_norm = max_norm;
      ASSIGN_OR_RETURN(auto sgd, SGD::Create({w, b}, {gw, gb}, o, {r.tp, r.dp}));
      RETURN_IF_ERROR(sgd->Step());
      if (std::fabs(sgd->last_grad_norm() - norm) > 1e-6 * norm) {
        return absl::InternalError(absl::StrCat("norm ", sgd->last_grad_norm(),
                                                " want ", norm));
      }
      const double coef =
          max_norm > 0 && norm > max_norm ? max_norm / (norm + 1e-6) : 1.0;
      const Vec got_w = w.tensor.ToDoubles(), got_b = b.tensor.ToDoubles();
      for (int i = 0; i < 2; ++i) {
        if (std::fabs(got_w[i] + coef * full_w_grad[off + i]) > 1e-6 ||
            std::fabs(got_b[i] + coef * bias_grad[i]) > 1e-6) {
          return absl::InternalError(absl::StrCat("update with coef ", coef));
        }
      }
      return absl::OkStatus();
    }));
  }
}

// DP 2 x TP 2: each data-parallel replica has its own gradient; Step averages
// them over DP, so both replicas apply the same update, and the norm is that
// of the averaged gradient over the whole model.
TEST(OptimizerTest, DataParallelAverageOnTwoByTwoGrid) {
  TP_EXPECT_OK(RunGrid(2, 2, [&](GridRank& r) -> absl::Status {
    const int64_t off = 3 * r.tp_rank;
    ParameterShard w = Shard("weight", {1, 1, 1}, DType::kFloat32, {6}, 0, off);
    ParameterShard b = Replicated("bias", {1, 1});
    ParameterShard h = Shard("half", {1, 1}, DType::kBFloat16, {4}, 0,
                             2 * r.tp_rank);
    // Replica d holds (d + 1) * base gradients: the average is 1.5 * base.
    const double s = r.dp_rank + 1.0;
    const Vec wg = {s * (off + 1), s * (off + 2), s * (off + 3)};
    ParameterShard gw = GradOf(w, wg);
    ParameterShard gb = GradOf(b, {s * 2, -s * 2});
    ParameterShard gh = GradOf(h, {s, s});
    SGDOptions o;
    o.lr = 0.5;
    ASSIGN_OR_RETURN(auto sgd,
                     SGD::Create({w, b, h}, {gw, gb, gh}, o, {r.tp, r.dp}));
    RETURN_IF_ERROR(sgd->Step());
    const Vec got = w.tensor.ToDoubles();
    for (int i = 0; i < 3; ++i) {
      const double want = 1 - 0.5 * 1.5 * (off + i + 1);
      if (std::fabs(got[i] - want) > 1e-6) {
        return absl::InternalError(absl::StrCat("weight[", i, "] = ", got[i],
                                                ", want ", want));
      }
    }
    if (std::fabs(b.tensor.ToDoubles()[0] - (1 - 0.5 * 3.0)) > 1e-12 ||
        std::fabs(h.tensor.ToDoubles()[1] - (1 - 0.5 * 1.5)) > 1e-12 ||
        std::fabs(gw.tensor.ToDoubles()[0] - 1.5 * (off + 1)) > 1e-6) {
      return absl::InternalError("bias, bf16 parameter or averaged grad");
    }
    // ||avg|| over the whole model: weights 1.5 * (1..6), bias 1.5 * (2, -2),
    // half 1.5 * (1, 1, 1, 1).
    double sq = 0;
    for (int i = 1; i <= 6; ++i) sq += 2.25 * i * i;
    sq += 2.25 * 8 + 2.25 * 4;
    if (std::fabs(sgd->last_grad_norm() - std::sqrt(sq)) > 1e-6) {
      return absl::InternalError(absl::StrCat("norm ", sgd->last_grad_norm(),
                                              " want ", std::sqrt(sq)));
    }
    return absl::OkStatus();
  }));
}

// A failed collective inside Step leaves parameters, gradients, state and
// the step counter unchanged, on every rank.
TEST(OptimizerTest, FailedCollectiveChangesNothing) {
  for (int64_t call : {0, 1}) {  // 0: the DP all-reduce; 1: the TP norm
    SCOPED_TRACE(call);
    std::vector<FakeCommunicatorOptions> options(2);
    options[1].fail_on_call = call;
    // Both roles on one fake pair: DP averaging first, then the TP norm.
    std::vector<absl::Status> statuses =
        RunFake(2, options, [&](Communicator& comm) -> absl::Status {
          ParameterShard w = Shard("weight", {1, 2}, DType::kFloat32, {4}, 0,
                                   2 * comm.rank());
          ParameterShard gw = GradOf(w, {comm.rank() + 1.0, 3.0});
          AdamWOptions o;
          o.max_grad_norm = 0.1;
          ASSIGN_OR_RETURN(auto adam,
                           AdamW::Create({w}, {gw}, o, {&comm, &comm}));
          absl::Status s = adam->Step();
          if (w.tensor.ToDoubles() != Vec({1, 2}) ||
              gw.tensor.ToDoubles() != Vec({comm.rank() + 1.0, 3.0}) ||
              adam->step_count() != 0 || adam->last_grad_norm() != 0 ||
              adam->state()[0].tensor.ToDoubles() != Vec({0, 0})) {
            return absl::InternalError("Step changed state after a failure");
          }
          return s;
        });
    EXPECT_EQ(statuses[0].code(), absl::StatusCode::kUnavailable) << statuses[0];
    EXPECT_EQ(statuses[1].code(), absl::StatusCode::kUnavailable) << statuses[1];
  }
}

TEST(OptimizerTest, InvalidOptionsAndMismatchedParameters) {
  ParameterShard p = Replicated("w", {1.0, 2.0});
  ParameterShard g = GradOf(p, {0, 0});
  auto sgd_error = [&](SGDOptions o) { return SGD::Create({p}, {g}, o).status(); };
  auto adam_error = [&](AdamWOptions o) {
    return AdamW::Create({p}, {g}, o).status();
  };
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  SGDOptions so;
  so.lr = -1;
  TP_EXPECT_OK(ExpectError(sgd_error(so), kInvalid, {"SGD", "lr"}, "lr"));
  so = SGDOptions();
  so.momentum = 1.0;
  TP_EXPECT_OK(ExpectError(sgd_error(so), kInvalid, {"momentum"}, "momentum"));
  so = SGDOptions();
  so.weight_decay = -0.1;
  TP_EXPECT_OK(ExpectError(sgd_error(so), kInvalid, {"weight_decay"}, "wd"));
  AdamWOptions ao;
  ao.beta1 = 1.0;
  TP_EXPECT_OK(ExpectError(adam_error(ao), kInvalid, {"AdamW", "beta1"}, "b1"));
  ao = AdamWOptions();
  ao.beta2 = -0.5;
  TP_EXPECT_OK(ExpectError(adam_error(ao), kInvalid, {"beta2"}, "b2"));
  ao = AdamWOptions();
  ao.eps = 0;
  TP_EXPECT_OK(ExpectError(adam_error(ao), kInvalid, {"eps"}, "eps"));
  ao = AdamWOptions();
  ao.max_grad_norm = NAN;
  TP_EXPECT_OK(ExpectError(adam_error(ao), kInvalid, {"max_grad_norm"}, "clip"));

  ParameterShard other = GradOf(p, {0, 0});
  other.name = "v";
  TP_EXPECT_OK(ExpectError(SGD::Create({p}, {other}, SGDOptions()).status(),
                           kInvalid, {"\"w\"", "\"v\""}, "names"));
  TP_EXPECT_OK(ExpectError(SGD::Create({p}, {}, SGDOptions()).status(), kInvalid,
                           {"1 parameters", "0 gradients"}, "counts"));
  ParameterShard wrong_shape = Replicated("w", {0, 0, 0});
  TP_EXPECT_OK(ExpectError(SGD::Create({p}, {wrong_shape}, SGDOptions()).status(),
                           kInvalid, {"w", "[2]", "[3]"}, "shape"));
  ParameterShard wrong_dtype = Replicated("w", {0, 0}, DType::kFloat32);
  TP_EXPECT_OK(ExpectError(SGD::Create({p}, {wrong_dtype}, SGDOptions()).status(),
                           kInvalid, {"float64", "float32"}, "dtype"));
  ParameterShard ints = p;
  ints.tensor = Tensor::Zeros({2}, DType::kInt32);
  ParameterShard int_grad = ints;
  int_grad.tensor = Tensor::Zeros({2}, DType::kInt32);
  TP_EXPECT_OK(ExpectError(SGD::Create({ints}, {int_grad}, SGDOptions()).status(),
                           kInvalid, {"int32"}, "int dtype"));
  TP_EXPECT_OK(ExpectError(SGD::Create({p}, {p}, SGDOptions()).status(), kInvalid,
                           {"share storage"}, "aliasing"));
  ParameterShard meta = GradOf(p, {0, 0});
  meta.split_dim = 0;
  TP_EXPECT_OK(ExpectError(SGD::Create({p}, {meta}, SGDOptions()).status(),
                           kInvalid, {"metadata"}, "metadata"));
  ParameterShard strided = Replicated("w", {1, 2, 3, 4});
  auto view = strided.tensor.Reshape({2, 2});
  ASSERT_TRUE(view.ok());
  auto col = view->Narrow(1, 0, 1);
  ASSERT_TRUE(col.ok());
  ParameterShard sp{"w", *col, {2, 1}, -1, 0};
  ParameterShard sg{"w", Tensor::Zeros({2, 1}, DType::kFloat64), {2, 1}, -1, 0};
  TP_EXPECT_OK(ExpectError(SGD::Create({sp}, {sg}, SGDOptions()).status(),
                           kInvalid, {"contiguous"}, "contiguous"));
}

}  // namespace
}  // namespace tp
