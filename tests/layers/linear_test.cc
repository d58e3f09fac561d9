// Tests of layers/linear.h: ColumnParallelLinear and RowParallelLinear at
// TP = 1, 2, 3, 4 over real Gloo communicators, forward and backward, against
// the float64 serial reference in tests/layers/layer_reference.h; finite
// differences on tiny float64 shapes; shard metadata; errors.
#include "layers/linear.h"

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "glog/logging.h"
#include "gtest/gtest.h"
#include "runtime/init.h"
#include "runtime/status_macros.h"
#include "tests/layers/layer_reference.h"
#include "tests/layers/layer_test_util.h"

namespace tp {
namespace {

using testing_layers::Close;
using testing_layers::ExpectError;
using testing_layers::MakeTensor;
using testing_layers::RandomVec;
using testing_layers::RoundTo;
using testing_layers::RunFake;
using testing_layers::RunGloo;
using testing_layers::Tolerance;
using testing_layers::ToStatus;
using testing_layers::Vec;

// Sizes divisible by 1, 2, 3 and 4. Inputs are [kSeq, kBatch, features]
// (the sequence-parallel layout: dim 0 is split).
constexpr int64_t kSeq = 12;
constexpr int64_t kBatch = 2;
constexpr int64_t kTokens = kSeq * kBatch;
constexpr int64_t kIn = 24;
constexpr int64_t kOut = 36;

const InitSpec kWeightInit = InitSpec::Normal(0.0, 0.2, 11);
const InitSpec kBiasInit = InitSpec::Uniform(-0.5, 0.5, 12);

struct Case {
  bool bias = true;
  bool gather_output = false;     // column
  bool input_is_parallel = true;  // row
  bool skip_bias_add = false;
  bool sequence_parallel = false;
  DType dtype = DType::kFloat32;

  std::string Name(bool column) const {
    return absl::StrCat(
        DTypeName(dtype), bias ? " bias" : " nobias",
        column && gather_output ? " gather_output" : "",
        !column && input_is_parallel ? " input_is_parallel" : "",
        skip_bias_add ? " skip_bias_add" : "",
        sequence_parallel ? " sequence_parallel" : "");
  }
};

// The TP = 1 weight and bias, as the layer's dtype rounds them.
Vec FullWeight(int64_t out, int64_t in, DType dtype) {
  absl::StatusOr<Tensor> w = InitTensor(kWeightInit, {out, in}, dtype);
  CHECK(w.ok()) << w.status();
  return w->ToDoubles();
}
Vec FullBias(int64_t out, DType dtype) {
  absl::StatusOr<Tensor> b = InitTensor(kBiasInit, {out}, dtype);
  CHECK(b.ok()) << b.status();
  return b->ToDoubles();
}
Vec Slice(const Vec& v, int64_t start, int64_t n) {
  return Vec(v.begin() + start, v.begin() + start + n);
}

absl::Status CheckShape(const Tensor& t, const Shape& want,
                        const std::string& what) {
  if (t.shape() == want) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": shape ",
                                          ShapeToString(t.shape()), ", want ",
                                          ShapeToString(want)));
}

// One column case on one rank; compares everything with the reference.
absl::Status CheckColumn(Communicator& comm, const Case& c) {
  const int tp = comm.size();
  const int r = comm.rank();
  const std::string name = absl::StrCat("column ", c.Name(true), " rank ", r);
  const double tol = Tolerance(c.dtype);
  ColumnParallelLinear::Options o;
  o.in_features = kIn;
  o.out_features = kOut;
  o.bias = c.bias;
  o.gather_output = c.gather_output;
  o.skip_bias_add = c.skip_bias_add;
  o.sequence_parallel = c.sequence_parallel;
  o.dtype = c.dtype;
  o.weight_init = kWeightInit;
  o.bias_init = kBiasInit;
  ASSIGN_OR_RETURN(auto layer, ColumnParallelLinear::Create(comm, o));

  const int64_t out_l = kOut / tp;
  const Vec w = FullWeight(kOut, kIn, c.dtype);
  const Vec b = c.bias ? FullBias(kOut, c.dtype) : Vec();
  const Vec x = RoundTo(RandomVec(kTokens * kIn, 1), c.dtype);
  const Vec dy = RoundTo(RandomVec(kTokens * kOut, 2), c.dtype);
  const Vec y_ref =
      ref::LinearForward(x, w, c.skip_bias_add ? Vec() : b, kTokens, kIn, kOut);
  const ref::LinearGrads g = ref::LinearGradients(dy, x, w, kTokens, kIn, kOut);

  // The shard is exactly this rank's rows of the TP = 1 weight.
  if (layer->weight().ToDoubles() != ref::Rows(w, kIn, r * out_l, out_l)) {
    return absl::InternalError(name + ": weight shard != slice of full weight");
  }
  if (c.bias && layer->bias().ToDoubles() != Slice(b, r * out_l, out_l)) {
    return absl::InternalError(name + ": bias shard != slice of full bias");
  }

  Tensor x_full = MakeTensor(x, {kSeq, kBatch, kIn}, c.dtype);
  Tensor x_in = x_full;
  const int64_t rows_l = kTokens / tp;
  if (c.sequence_parallel) {
    ASSIGN_OR_RETURN(x_in, x_full.Narrow(0, r * kSeq / tp, kSeq / tp));
  }
  ASSIGN_OR_RETURN(Tensor y, layer->Forward(x_in));
  if (c.gather_output) {
    RETURN_IF_ERROR(CheckShape(y, {kSeq, kBatch, kOut}, name + " y"));
    RETURN_IF_ERROR(ToStatus(Close(y, y_ref, tol, name + " y")));
  } else {
    RETURN_IF_ERROR(CheckShape(y, {kSeq, kBatch, out_l}, name + " y"));
    RETURN_IF_ERROR(
        ToStatus(Close(y, ref::Columns(y_ref, kTokens, kOut, r * out_l, out_l),
                       tol, name + " y")));
  }

  Tensor grad_in =
      c.gather_output
          ? MakeTensor(dy, {kSeq, kBatch, kOut}, c.dtype)
          : MakeTensor(ref::Columns(dy, kTokens, kOut, r * out_l, out_l),
                       {kSeq, kBatch, out_l}, c.dtype);
  ASSIGN_OR_RETURN(Tensor dx, layer->Backward(grad_in));
  RETURN_IF_ERROR(CheckShape(dx, x_in.shape(), name + " dx"));
  const Vec dx_want =
      c.sequence_parallel ? ref::Rows(g.dx, kIn, r * rows_l, rows_l) : g.dx;
  RETURN_IF_ERROR(ToStatus(Close(dx, dx_want, tol, name + " dx")));
  RETURN_IF_ERROR(ToStatus(Close(layer->weight_grad(),
                                 ref::Rows(g.dw, kIn, r * out_l, out_l), tol,
                                 name + " dW")));
  if (c.bias) {
    RETURN_IF_ERROR(ToStatus(Close(
        layer->bias_grad(), Slice(g.db, r * out_l, out_l), tol, name + " db")));
  }
  return absl::OkStatus();
}

absl::Status CheckRow(Communicator& comm, const Case& c) {
  const int tp = comm.size();
  const int r = comm.rank();
  const std::string name = absl::StrCat("row ", c.Name(false), " rank ", r);
  const double tol = Tolerance(c.dtype);
  RowParallelLinear::Options o;
  o.in_features = kOut;  // the row layer maps 36 -> 24
  o.out_features = kIn;
  o.bias = c.bias;
  o.input_is_parallel = c.input_is_parallel;
  o.skip_bias_add = c.skip_bias_add;
  o.sequence_parallel = c.sequence_parallel;
  o.dtype = c.dtype;
  o.weight_init = kWeightInit;
  o.bias_init = kBiasInit;
  ASSIGN_OR_RETURN(auto layer, RowParallelLinear::Create(comm, o));
  const int64_t in = kOut, out = kIn;

  const int64_t in_l = in / tp;
  const Vec w = FullWeight(out, in, c.dtype);
  const Vec b = c.bias ? FullBias(out, c.dtype) : Vec();
  const Vec x = RoundTo(RandomVec(kTokens * in, 3), c.dtype);
  const Vec dy = RoundTo(RandomVec(kTokens * out, 4), c.dtype);
  const Vec y_ref =
      ref::LinearForward(x, w, c.skip_bias_add ? Vec() : b, kTokens, in, out);
  const ref::LinearGrads g = ref::LinearGradients(dy, x, w, kTokens, in, out);

  if (layer->weight().ToDoubles() != ref::Columns(w, out, in, r * in_l, in_l)) {
    return absl::InternalError(name + ": weight shard != slice of full weight");
  }
  if (c.bias && layer->bias().ToDoubles() != b) {
    return absl::InternalError(name + ": bias != full bias");
  }

  Tensor x_in = c.input_is_parallel
                    ? MakeTensor(ref::Columns(x, kTokens, in, r * in_l, in_l),
                                 {kSeq, kBatch, in_l}, c.dtype)
                    : MakeTensor(x, {kSeq, kBatch, in}, c.dtype);
  const int64_t rows_l = kTokens / tp;
  ASSIGN_OR_RETURN(Tensor y, layer->Forward(x_in));
  if (c.sequence_parallel) {
    RETURN_IF_ERROR(CheckShape(y, {kSeq / tp, kBatch, out}, name + " y"));
    RETURN_IF_ERROR(ToStatus(
        Close(y, ref::Rows(y_ref, out, r * rows_l, rows_l), tol, name + " y")));
  } else {
    RETURN_IF_ERROR(CheckShape(y, {kSeq, kBatch, out}, name + " y"));
    RETURN_IF_ERROR(ToStatus(Close(y, y_ref, tol, name + " y")));
  }

  Tensor grad_in = c.sequence_parallel
                       ? MakeTensor(ref::Rows(dy, out, r * rows_l, rows_l),
                                    {kSeq / tp, kBatch, out}, c.dtype)
                       : MakeTensor(dy, {kSeq, kBatch, out}, c.dtype);
  ASSIGN_OR_RETURN(Tensor dx, layer->Backward(grad_in));
  RETURN_IF_ERROR(CheckShape(dx, x_in.shape(), name + " dx"));
  const Vec dx_want = c.input_is_parallel
                          ? ref::Columns(g.dx, kTokens, in, r * in_l, in_l)
                          : g.dx;
  RETURN_IF_ERROR(ToStatus(Close(dx, dx_want, tol, name + " dx")));
  RETURN_IF_ERROR(ToStatus(Close(layer->weight_grad(),
                                 ref::Columns(g.dw, out, in, r * in_l, in_l),
                                 tol, name + " dW")));
  if (c.bias) {
    RETURN_IF_ERROR(
        ToStatus(Close(layer->bias_grad(), g.db, tol, name + " db")));
  }
  return absl::OkStatus();
}

std::vector<Case> ColumnCases() {
  std::vector<Case> cases;
  for (bool bias : {true, false}) {
    for (bool gather : {false, true}) {
      for (bool skip : {false, true}) {
        for (bool sp : {false, true}) {
          if ((skip && !bias) || (sp && gather)) continue;
          Case c;
          c.bias = bias;
          c.gather_output = gather;
          c.skip_bias_add = skip;
          c.sequence_parallel = sp;
          cases.push_back(c);
        }
      }
    }
  }
  for (DType dt : {DType::kFloat64, DType::kFloat16, DType::kBFloat16}) {
    for (bool gather : {false, true}) {
      Case c;
      c.gather_output = gather;
      c.dtype = dt;
      cases.push_back(c);
    }
  }
  return cases;
}

std::vector<Case> RowCases() {
  std::vector<Case> cases;
  for (bool bias : {true, false}) {
    for (bool parallel : {true, false}) {
      for (bool skip : {false, true}) {
        for (bool sp : {false, true}) {
          if ((skip && !bias) || (sp && !parallel)) continue;
          Case c;
          c.bias = bias;
          c.input_is_parallel = parallel;
          c.skip_bias_add = skip;
          c.sequence_parallel = sp;
          cases.push_back(c);
        }
      }
    }
  }
  for (DType dt : {DType::kFloat64, DType::kFloat16, DType::kBFloat16}) {
    for (bool parallel : {true, false}) {
      Case c;
      c.input_is_parallel = parallel;
      c.dtype = dt;
      cases.push_back(c);
    }
  }
  return cases;
}

class LinearTest : public ::testing::TestWithParam<int> {};

TEST_P(LinearTest, ColumnParallelMatchesSerialReference) {
  TP_EXPECT_OK(RunGloo(GetParam(), [&](Communicator& comm) -> absl::Status {
    for (const Case& c : ColumnCases()) RETURN_IF_ERROR(CheckColumn(comm, c));
    return absl::OkStatus();
  }));
}

TEST_P(LinearTest, RowParallelMatchesSerialReference) {
  TP_EXPECT_OK(RunGloo(GetParam(), [&](Communicator& comm) -> absl::Status {
    for (const Case& c : RowCases()) RETURN_IF_ERROR(CheckRow(comm, c));
    return absl::OkStatus();
  }));
}

// Column(gather_output = false) -> Row(input_is_parallel) equals the serial
// Linear -> Linear, forward and backward, with and without sequence
// parallelism.
TEST_P(LinearTest, ColumnThenRowEqualsSerialLinearLinear) {
  const int tp = GetParam();
  constexpr int64_t kHidden = 24, kFfn = 48;
  for (bool sp : {false, true}) {
    SCOPED_TRACE(sp ? "sequence_parallel" : "tensor_parallel");
    TP_EXPECT_OK(RunGloo(tp, [&](Communicator& comm) -> absl::Status {
      const int r = comm.rank();
      ColumnParallelLinear::Options co;
      co.in_features = kHidden;
      co.out_features = kFfn;
      co.gather_output = false;
      co.sequence_parallel = sp;
      co.weight_init = InitSpec::Normal(0, 0.2, 21);
      co.bias_init = InitSpec::Uniform(-0.5, 0.5, 22);
      RowParallelLinear::Options ro;
      ro.in_features = kFfn;
      ro.out_features = kHidden;
      ro.input_is_parallel = true;
      ro.sequence_parallel = sp;
      ro.weight_init = InitSpec::Normal(0, 0.2, 23);
      ro.bias_init = InitSpec::Uniform(-0.5, 0.5, 24);
      ASSIGN_OR_RETURN(auto fc1, ColumnParallelLinear::Create(comm, co));
      ASSIGN_OR_RETURN(auto fc2, RowParallelLinear::Create(comm, ro));

      auto full = [](const InitSpec& s, Shape shape) {
        return InitTensor(s, shape, DType::kFloat32)->ToDoubles();
      };
      const Vec w1 = full(co.weight_init, {kFfn, kHidden});
      const Vec b1 = full(co.bias_init, {kFfn});
      const Vec w2 = full(ro.weight_init, {kHidden, kFfn});
      const Vec b2 = full(ro.bias_init, {kHidden});
      const Vec x = RoundTo(RandomVec(kTokens * kHidden, 5), DType::kFloat32);
      const Vec dy = RoundTo(RandomVec(kTokens * kHidden, 6), DType::kFloat32);
      const Vec h = ref::LinearForward(x, w1, b1, kTokens, kHidden, kFfn);
      const Vec y = ref::LinearForward(h, w2, b2, kTokens, kFfn, kHidden);
      const ref::LinearGrads g2 =
          ref::LinearGradients(dy, h, w2, kTokens, kFfn, kHidden);
      const ref::LinearGrads g1 =
          ref::LinearGradients(g2.dx, x, w1, kTokens, kHidden, kFfn);

      const int64_t rows_l = kTokens / tp, f_l = kFfn / tp;
      const Vec x_in = sp ? ref::Rows(x, kHidden, r * rows_l, rows_l) : x;
      const Vec dy_in = sp ? ref::Rows(dy, kHidden, r * rows_l, rows_l) : dy;
      const int64_t seq_in = sp ? kSeq / tp : kSeq;
      ASSIGN_OR_RETURN(Tensor a,
                       fc1->Forward(MakeTensor(x_in, {seq_in, kBatch, kHidden},
                                               DType::kFloat32)));
      ASSIGN_OR_RETURN(Tensor out, fc2->Forward(a));
      const std::string n = absl::StrCat("rank ", r);
      RETURN_IF_ERROR(ToStatus(
          Close(out, sp ? ref::Rows(y, kHidden, r * rows_l, rows_l) : y, 1e-5,
                n + " y")));
      ASSIGN_OR_RETURN(
          Tensor da, fc2->Backward(MakeTensor(dy_in, {seq_in, kBatch, kHidden},
                                              DType::kFloat32)));
      ASSIGN_OR_RETURN(Tensor dx, fc1->Backward(da));
      RETURN_IF_ERROR(ToStatus(
          Close(dx, sp ? ref::Rows(g1.dx, kHidden, r * rows_l, rows_l) : g1.dx,
                1e-5, n + " dx")));
      RETURN_IF_ERROR(ToStatus(Close(fc1->weight_grad(),
                                     ref::Rows(g1.dw, kHidden, r * f_l, f_l),
                                     1e-5, n + " dW1")));
      RETURN_IF_ERROR(ToStatus(Close(
          fc1->bias_grad(), Slice(g1.db, r * f_l, f_l), 1e-5, n + " db1")));
      RETURN_IF_ERROR(ToStatus(Close(
          fc2->weight_grad(), ref::Columns(g2.dw, kHidden, kFfn, r * f_l, f_l),
          1e-5, n + " dW2")));
      return ToStatus(Close(fc2->bias_grad(), g2.db, 1e-5, n + " db2"));
    }));
  }
}

// parameters()/grads() metadata, storage sharing, accumulation, ZeroGrad.
TEST_P(LinearTest, ShardMetadataAccumulationAndZeroGrad) {
  const int tp = GetParam();
  TP_EXPECT_OK(RunGloo(tp, [&](Communicator& comm) -> absl::Status {
    const int r = comm.rank();
    ColumnParallelLinear::Options co;
    co.in_features = kIn;
    co.out_features = kOut;
    co.gather_output = false;
    co.name = "fc1";
    ASSIGN_OR_RETURN(auto col, ColumnParallelLinear::Create(comm, co));
    RowParallelLinear::Options ro;
    ro.in_features = kOut;
    ro.out_features = kIn;
    ro.input_is_parallel = true;
    ASSIGN_OR_RETURN(auto row, RowParallelLinear::Create(comm, ro));

    std::vector<ParameterShard> cp = col->parameters();
    std::vector<ParameterShard> rp = row->parameters();
    const int64_t out_l = kOut / tp;
    if (cp.size() != 2 || cp[0].name != "weight" || cp[1].name != "bias" ||
        cp[0].full_shape != Shape({kOut, kIn}) || cp[0].split_dim != 0 ||
        cp[0].offset != r * out_l || cp[1].full_shape != Shape({kOut}) ||
        cp[1].split_dim != 0 || cp[1].offset != r * out_l ||
        cp[0].tensor.shape() != Shape({out_l, kIn}) ||
        !cp[0].tensor.SharesStorageWith(col->weight())) {
      return absl::InternalError("column parameters() metadata is wrong");
    }
    if (rp.size() != 2 || rp[0].full_shape != Shape({kIn, kOut}) ||
        rp[0].split_dim != 1 || rp[0].offset != r * out_l ||
        rp[0].tensor.shape() != Shape({kIn, out_l}) || !rp[1].replicated() ||
        rp[1].full_shape != Shape({kIn}) || rp[1].offset != 0) {
      return absl::InternalError("row parameters() metadata is wrong");
    }
    std::vector<ParameterShard> cg = col->grads();
    if (cg.size() != 2 || cg[0].name != "weight" || cg[0].offset != r * out_l ||
        !cg[0].tensor.SharesStorageWith(col->weight_grad())) {
      return absl::InternalError("column grads() metadata is wrong");
    }
    std::vector<ParameterShard> prefixed = PrefixNames("mlp.fc1", cp);
    if (prefixed[0].name != "mlp.fc1.weight") {
      return absl::InternalError("PrefixNames: " + prefixed[0].name);
    }

    // Two forward/backward passes accumulate exactly twice one pass.
    Tensor x = MakeTensor(RandomVec(kTokens * kIn, 7), {kTokens, kIn},
                          DType::kFloat32);
    Tensor dy = MakeTensor(RandomVec(kTokens * out_l, 8 + r), {kTokens, out_l},
                           DType::kFloat32);
    ASSIGN_OR_RETURN(Tensor y1, col->Forward(x));
    RETURN_IF_ERROR(col->Backward(dy).status());
    const Vec once = col->weight_grad().ToDoubles();
    const Vec once_b = col->bias_grad().ToDoubles();
    ASSIGN_OR_RETURN(Tensor y2, col->Forward(x));
    RETURN_IF_ERROR(col->Backward(dy).status());
    Vec twice = once, twice_b = once_b;
    for (double& v : twice) v *= 2;
    for (double& v : twice_b) v *= 2;
    RETURN_IF_ERROR(
        ToStatus(Close(col->weight_grad(), twice, 1e-6, "accumulated dW")));
    RETURN_IF_ERROR(
        ToStatus(Close(col->bias_grad(), twice_b, 1e-6, "accumulated db")));
    col->ZeroGrad();
    for (const ParameterShard& s : col->grads()) {
      for (double v : s.tensor.ToDoubles()) {
        if (v != 0) return absl::InternalError("ZeroGrad left " + s.name);
      }
    }
    // Writing through parameters() updates the layer (optimizers do this).
    col->parameters()[0].tensor.data<float>()[0] = 42.0f;
    if (col->weight().ToDoubles()[0] != 42.0) {
      return absl::InternalError("parameters() does not share storage");
    }
    return absl::OkStatus();
  }));
}

INSTANTIATE_TEST_SUITE_P(TensorParallelSizes, LinearTest,
                         ::testing::Values(1, 2, 3, 4),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return absl::StrCat("tp", info.param);
                         });

// ---------------------------------------------------------------------------
// Finite differences (float64, tiny shapes): the loss L = sum(y * R) with R
// fixed; dL/dx and dL/dW from Backward(R) against central differences of
// Forward. Every rank perturbs the same input element; a weight element is
// perturbed only on the rank that owns it.
// ---------------------------------------------------------------------------

constexpr double kFdStep = 1e-6;

template <typename Layer>
absl::Status CheckFiniteDifferences(Communicator& comm, Layer& layer,
                                    const Shape& x_shape, int64_t out) {
  const int64_t t = x_shape[0];
  Tensor x =
      MakeTensor(RandomVec(NumElements(x_shape), 31), x_shape, DType::kFloat64);
  Tensor rr = MakeTensor(RandomVec(t * out, 32), {t, out}, DType::kFloat64);
  auto loss = [&]() -> absl::StatusOr<double> {
    ASSIGN_OR_RETURN(Tensor y, layer.Forward(x));
    const Vec yv = y.ToDoubles(), rv = rr.ToDoubles();
    double s = 0;
    for (size_t i = 0; i < yv.size(); ++i) s += yv[i] * rv[i];
    return s;
  };
  RETURN_IF_ERROR(loss().status());
  ASSIGN_OR_RETURN(Tensor dx, layer.Backward(rr));
  const Vec dxv = dx.ToDoubles();
  double* xp = x.data<double>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double keep = xp[i];
    xp[i] = keep + kFdStep;
    ASSIGN_OR_RETURN(double lp, loss());
    xp[i] = keep - kFdStep;
    ASSIGN_OR_RETURN(double lm, loss());
    xp[i] = keep;
    const double fd = (lp - lm) / (2 * kFdStep);
    if (std::fabs(fd - dxv[i]) > 1e-6 * (1 + std::fabs(fd))) {
      return absl::InternalError(
          absl::StrCat("dx[", i, "] = ", dxv[i], ", finite difference ", fd));
    }
  }
  for (int owner = 0; owner < comm.size(); ++owner) {
    for (const char* which : {"weight", "bias"}) {
      const bool w = std::string(which) == "weight";
      Tensor p = w ? layer.weight() : layer.bias();
      Tensor g = w ? layer.weight_grad() : layer.bias_grad();
      // Replicated parameters (the row bias) are perturbed on every rank.
      const bool replicated = !w && layer.parameters()[1].replicated();
      if (replicated && owner > 0) continue;
      // Every rank loops over the owner's element count (shards are equal).
      for (int64_t i = 0; i < p.numel(); ++i) {
        const bool mine = replicated || comm.rank() == owner;
        double* pp = p.template data<double>();
        const double keep = pp[i];
        if (mine) pp[i] = keep + kFdStep;
        ASSIGN_OR_RETURN(double lp, loss());
        if (mine) pp[i] = keep - kFdStep;
        ASSIGN_OR_RETURN(double lm, loss());
        if (mine) pp[i] = keep;
        const double fd = (lp - lm) / (2 * kFdStep);
        const double an = g.ToDoubles()[i];
        if (mine && std::fabs(fd - an) > 1e-6 * (1 + std::fabs(fd))) {
          return absl::InternalError(absl::StrCat(
              which, " grad[", i, "] = ", an, ", finite difference ", fd));
        }
      }
    }
  }
  return absl::OkStatus();
}

TEST(LinearFiniteDifferences, ColumnParallel) {
  for (int tp : {2, 3}) {
    TP_EXPECT_OK(RunGloo(tp, [&](Communicator& comm) -> absl::Status {
      ColumnParallelLinear::Options o;
      o.in_features = 4;
      o.out_features = 6;
      o.gather_output = true;  // y replicated: the loss is the same everywhere
      o.dtype = DType::kFloat64;
      o.weight_init = InitSpec::Normal(0, 0.5, 41);
      o.bias_init = InitSpec::Uniform(-1, 1, 42);
      ASSIGN_OR_RETURN(auto layer, ColumnParallelLinear::Create(comm, o));
      return CheckFiniteDifferences(comm, *layer, {3, 4}, 6);
    }));
  }
}

TEST(LinearFiniteDifferences, RowParallel) {
  for (int tp : {2, 3}) {
    TP_EXPECT_OK(RunGloo(tp, [&](Communicator& comm) -> absl::Status {
      RowParallelLinear::Options o;
      o.in_features = 6;
      o.out_features = 4;
      o.input_is_parallel = false;  // full x on every rank
      o.dtype = DType::kFloat64;
      o.weight_init = InitSpec::Normal(0, 0.5, 43);
      o.bias_init = InitSpec::Uniform(-1, 1, 44);
      ASSIGN_OR_RETURN(auto layer, RowParallelLinear::Create(comm, o));
      return CheckFiniteDifferences(comm, *layer, {3, 6}, 4);
    }));
  }
}

// ---------------------------------------------------------------------------
// Errors. Creation and input validation do not communicate, so one rank of a
// fake group is enough.
// ---------------------------------------------------------------------------

TEST(LinearErrors, IndivisibleSizesAndBadOptions) {
  auto group3 = FakeCommunicator::CreateGroup(3);
  auto group4 = FakeCommunicator::CreateGroup(4);
  ColumnParallelLinear::Options co;
  co.in_features = 12;
  co.out_features = 10;
  co.name = "qkv";
  TP_EXPECT_OK(
      ExpectError(ColumnParallelLinear::Create(*group3[1], co).status(),
                  absl::StatusCode::kInvalidArgument,
                  {"qkv", "out_features 10", "3"}, "column indivisible"));
  RowParallelLinear::Options ro;
  ro.in_features = 10;
  ro.out_features = 12;
  ro.name = "o_proj";
  TP_EXPECT_OK(ExpectError(RowParallelLinear::Create(*group4[0], ro).status(),
                           absl::StatusCode::kInvalidArgument,
                           {"o_proj", "in_features 10", "4"},
                           "row indivisible"));
  co.out_features = 12;
  co.in_features = 0;
  TP_EXPECT_OK(
      ExpectError(ColumnParallelLinear::Create(*group3[0], co).status(),
                  absl::StatusCode::kInvalidArgument,
                  {"qkv", "in_features (0)"}, "zero in_features"));
  co.in_features = 12;
  co.dtype = DType::kInt32;
  TP_EXPECT_OK(ExpectError(
      ColumnParallelLinear::Create(*group3[0], co).status(),
      absl::StatusCode::kInvalidArgument, {"qkv", "int32"}, "int dtype"));
  co.dtype = DType::kFloat32;
  co.sequence_parallel = true;
  co.gather_output = true;
  TP_EXPECT_OK(
      ExpectError(ColumnParallelLinear::Create(*group3[0], co).status(),
                  absl::StatusCode::kInvalidArgument,
                  {"qkv", "sequence_parallel"}, "sp with gather"));
  ro.in_features = 12;
  ro.sequence_parallel = true;
  ro.input_is_parallel = false;
  TP_EXPECT_OK(ExpectError(RowParallelLinear::Create(*group4[0], ro).status(),
                           absl::StatusCode::kInvalidArgument,
                           {"o_proj", "input_is_parallel"},
                           "sp without parallel input"));
  co.sequence_parallel = false;
  co.weight_init = InitSpec::Normal(0, -1, 0);  // negative std
  TP_EXPECT_OK(ExpectError(
      ColumnParallelLinear::Create(*group3[0], co).status(),
      absl::StatusCode::kInvalidArgument, {"qkv.weight"}, "bad init"));
}

TEST(LinearErrors, BadInputsAreInvalidArgumentAndChangeNothing) {
  FakeCommunicator single;
  ColumnParallelLinear::Options co;
  co.in_features = 8;
  co.out_features = 12;
  co.name = "up";
  auto col = ColumnParallelLinear::Create(single, co);
  ASSERT_TRUE(col.ok()) << col.status();
  ColumnParallelLinear& layer = **col;

  // Backward before any Forward.
  TP_EXPECT_OK(ExpectError(
      layer.Backward(Tensor::Zeros({6, 12}, DType::kFloat32)).status(),
      absl::StatusCode::kFailedPrecondition, {"up", "Forward"},
      "backward first"));
  // Wrong feature count, naming the shape and the expected size.
  TP_EXPECT_OK(ExpectError(
      layer.Forward(Tensor::Zeros({6, 7}, DType::kFloat32)).status(),
      absl::StatusCode::kInvalidArgument, {"up", "[6, 7]", "8"},
      "wrong in_features"));
  // Wrong dtype.
  TP_EXPECT_OK(ExpectError(
      layer.Forward(Tensor::Zeros({6, 8}, DType::kFloat64)).status(),
      absl::StatusCode::kInvalidArgument, {"up", "float64", "float32"},
      "wrong dtype"));
  TP_EXPECT_OK(ExpectError(layer.Forward(Tensor()).status(),
                           absl::StatusCode::kInvalidArgument, {"up"},
                           "undefined input"));
  TP_EXPECT_OK(ExpectError(
      layer.Forward(Tensor::Zeros({}, DType::kFloat32)).status(),
      absl::StatusCode::kInvalidArgument, {"up", "[]"}, "scalar input"));

  // A good Forward, then a Backward with the wrong gradient shape: the
  // error leaves the cache, so the right gradient still works.
  Tensor x = MakeTensor(RandomVec(48, 9), {6, 8}, DType::kFloat32);
  ASSERT_TRUE(layer.Forward(x).ok());
  TP_EXPECT_OK(ExpectError(
      layer.Backward(Tensor::Zeros({6, 11}, DType::kFloat32)).status(),
      absl::StatusCode::kInvalidArgument, {"up", "[6, 11]", "[6, 12]"},
      "wrong grad shape"));
  TP_EXPECT_OK(ExpectError(
      layer.Backward(Tensor::Zeros({6, 12}, DType::kFloat16)).status(),
      absl::StatusCode::kInvalidArgument, {"up", "float16"},
      "wrong grad dtype"));
  for (double v : layer.weight_grad().ToDoubles()) ASSERT_EQ(v, 0.0);
  EXPECT_TRUE(layer.Backward(Tensor::Full({6, 12}, 1.0, DType::kFloat32)).ok());
  // The cache is consumed: a second Backward needs a new Forward.
  EXPECT_EQ(layer.Backward(Tensor::Full({6, 12}, 1.0, DType::kFloat32))
                .status()
                .code(),
            absl::StatusCode::kFailedPrecondition);

  // Row layer: the parallel input must end in in/tp features.
  auto group = FakeCommunicator::CreateGroup(2);
  RowParallelLinear::Options ro;
  ro.in_features = 12;
  ro.out_features = 8;
  ro.input_is_parallel = true;
  ro.name = "down";
  auto row = RowParallelLinear::Create(*group[0], ro);
  ASSERT_TRUE(row.ok()) << row.status();
  TP_EXPECT_OK(ExpectError(
      (*row)->Forward(Tensor::Zeros({4, 12}, DType::kFloat32)).status(),
      absl::StatusCode::kInvalidArgument, {"down", "[4, 12]", "6"},
      "row full input with input_is_parallel"));
  ro.sequence_parallel = true;
  auto sp_row = RowParallelLinear::Create(*group[1], ro);
  ASSERT_TRUE(sp_row.ok()) << sp_row.status();
  TP_EXPECT_OK(ExpectError(
      (*sp_row)->Forward(Tensor::Zeros({3, 6}, DType::kFloat32)).status(),
      absl::StatusCode::kInvalidArgument, {"down", "[3, 6]", "2"},
      "sequence parallel odd dim 0"));
}

}  // namespace
}  // namespace tp
