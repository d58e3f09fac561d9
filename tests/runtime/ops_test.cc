// Tests of runtime/ops.h. Every op is compared with an independent naive
// float64 reference written here (on the exact values of the possibly
// rounded inputs), for every float dtype, with contiguous and non-contiguous
// (Narrow) inputs; backward passes are also checked by central finite
// differences in float64; every error path is exercised.
#include "runtime/ops.h"

#include <cblas.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tp {
namespace ops {
namespace {

using ::testing::HasSubstr;
using Vec = std::vector<double>;

// ---- helpers
// -----------------------------------------------------------------

// Relative tolerance per dtype: fp16/bf16 outputs are rounded once from
// float32 (2^-11 and 2^-8 relative), fp32 accumulates rounding in float.
double Tol(DType dt) {
  switch (dt) {
    case DType::kFloat64:
      return 1e-11;
    case DType::kFloat32:
      return 2e-5;
    case DType::kFloat16:
      return 3e-3;
    default:
      return 2e-2;
  }
}

// A tensor of `shape` with uniform values in [lo, hi). With `noncontig` it is
// a Narrow() view (along the last dimension) of a wider parent, so its rows
// are strided.
Tensor Random(const Shape& shape, DType dt, uint32_t seed,
              bool noncontig = false, double lo = -2.0, double hi = 2.0) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  Shape full = shape;
  if (noncontig) {
    if (full.empty()) full = {1};
    full.back() += 3;
  }
  Vec v(static_cast<size_t>(NumElements(full)));
  for (double& x : v) x = dist(gen);
  Tensor t = *Tensor::FromDoubles(v, full, dt);
  if (!noncontig) return t;
  Tensor view = *t.Narrow(-1, 1, shape.empty() ? 1 : shape.back());
  if (shape.empty()) view = *view.Reshape({});
  return view;
}

// Checks dtype, shape, contiguity and values of `got` against `want` (double
// reference): |got - want| <= tol * max(1, max|want|) elementwise.
void ExpectClose(const Tensor& got, const Vec& want, const Shape& shape,
                 DType dt, double tol_scale = 1.0) {
  ASSERT_TRUE(got.defined());
  EXPECT_EQ(got.dtype(), dt);
  ASSERT_EQ(got.shape(), shape);
  EXPECT_TRUE(got.is_contiguous());
  const Vec g = got.ToDoubles();
  ASSERT_EQ(g.size(), want.size());
  double scale = 1.0;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  const double tol = Tol(dt) * tol_scale * scale;
  int bad = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    if (!(std::fabs(g[i] - want[i]) <= tol)) {
      if (++bad <= 5) {
        ADD_FAILURE() << "element " << i << ": got " << g[i] << ", want "
                      << want[i] << " (tol " << tol << ", " << DTypeName(dt)
                      << ")";
      }
    }
  }
  EXPECT_EQ(bad, 0);
}

void ExpectInvalid(const absl::Status& s,
                   const std::vector<std::string>& parts) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  for (const std::string& p : parts)
    EXPECT_THAT(std::string(s.message()), HasSubstr(p));
}

template <typename T>
void ExpectInvalid(const absl::StatusOr<T>& s,
                   const std::vector<std::string>& parts) {
  ExpectInvalid(s.status(), parts);
}

int64_t Prod(const Shape& s) { return NumElements(s); }

// Naive row-major GEMM on double: op(A) [m,k], op(B) [k,n].
Vec RefMatMul(const Vec& a, const Vec& b, int64_t m, int64_t k, int64_t n,
              bool ta, bool tb) {
  Vec c(static_cast<size_t>(m * n), 0.0);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p) {
        const double av = ta ? a[p * m + i] : a[i * k + p];
        const double bv = tb ? b[j * k + p] : b[p * n + j];
        s += av * bv;
      }
      c[i * n + j] = s;
    }
  }
  return c;
}

double RefGeLU(double x) {
  const double c = std::sqrt(2.0 / M_PI);
  return 0.5 * x * (1 + std::tanh(c * (x + 0.044715 * x * x * x)));
}
double RefGeLUGrad(double x) {
  const double c = std::sqrt(2.0 / M_PI);
  const double u = c * (x + 0.044715 * x * x * x);
  const double t = std::tanh(u);
  return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x);
}
double RefSiLU(double x) { return x / (1 + std::exp(-x)); }
double RefSiLUGrad(double x) {
  const double s = 1 / (1 + std::exp(-x));
  return s + x * s * (1 - s);
}

// Softmax over rows of length sk; causal for [.., sq, sk].
Vec RefSoftmax(const Vec& x, int64_t sq, int64_t sk, bool causal) {
  Vec y(x.size(), 0.0);
  const int64_t rows = static_cast<int64_t>(x.size()) / sk;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t visible = causal ? (r % sq) + (sk - sq) + 1 : sk;
    double mx = -INFINITY;
    for (int64_t j = 0; j < visible; ++j) mx = std::max(mx, x[r * sk + j]);
    double sum = 0;
    for (int64_t j = 0; j < visible; ++j) sum += std::exp(x[r * sk + j] - mx);
    for (int64_t j = 0; j < visible; ++j) {
      y[r * sk + j] = std::exp(x[r * sk + j] - mx) / sum;
    }
  }
  return y;
}

struct RefNorm {
  Vec y, mean, rstd;
};
RefNorm RefNormForward(const Vec& x, const Vec& g, const Vec* b, int64_t n,
                       double eps) {
  RefNorm out;
  const int64_t rows = static_cast<int64_t>(x.size()) / n;
  out.y.resize(x.size());
  for (int64_t r = 0; r < rows; ++r) {
    double mean = 0;
    if (b != nullptr) {
      for (int64_t j = 0; j < n; ++j) mean += x[r * n + j];
      mean /= n;
    }
    double var = 0;
    for (int64_t j = 0; j < n; ++j) {
      var += (x[r * n + j] - mean) * (x[r * n + j] - mean);
    }
    var /= n;
    const double rstd = 1 / std::sqrt(var + eps);
    out.mean.push_back(mean);
    out.rstd.push_back(rstd);
    for (int64_t j = 0; j < n; ++j) {
      out.y[r * n + j] =
          (x[r * n + j] - mean) * rstd * g[j] + (b != nullptr ? (*b)[j] : 0.0);
    }
  }
  return out;
}

// Central finite differences of L(x) = sum(w * f(x)) for f evaluated by
// `forward` on float64 tensors.
template <typename Fn>
Vec FiniteDiff(const Tensor& x, const Vec& w, Fn forward, double h = 1e-6) {
  const Vec x0 = x.ToDoubles();
  Vec grad(x0.size());
  const auto loss = [&](const Vec& xv) {
    Tensor t = *Tensor::FromDoubles(xv, x.shape(), DType::kFloat64);
    const Vec y = forward(t);
    double l = 0;
    for (size_t i = 0; i < y.size(); ++i) l += w[i] * y[i];
    return l;
  };
  for (size_t i = 0; i < x0.size(); ++i) {
    Vec xp = x0, xm = x0;
    xp[i] += h;
    xm[i] -= h;
    grad[i] = (loss(xp) - loss(xm)) / (2 * h);
  }
  return grad;
}

void ExpectNearVec(const Vec& got, const Vec& want, double tol) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], tol) << "element " << i;
  }
}

// ---- parameterized over dtype x contiguity -------------------------------

using Param = std::tuple<DType, bool>;

class OpsTest : public ::testing::TestWithParam<Param> {
 protected:
  DType dt() const { return std::get<0>(GetParam()); }
  bool noncontig() const { return std::get<1>(GetParam()); }
  Tensor Rand(const Shape& s, uint32_t seed, double lo = -2, double hi = 2) {
    return Random(s, dt(), seed, noncontig(), lo, hi);
  }
};

TEST_P(OpsTest, MatMulAllTransposes) {
  const int64_t m = 5, k = 37, n = 6;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      SCOPED_TRACE(absl::StrCat("ta=", ta, " tb=", tb));
      Tensor a = Rand(ta ? Shape{k, m} : Shape{m, k}, 1);
      Tensor b = Rand(tb ? Shape{n, k} : Shape{k, n}, 2);
      auto c = MatMul(a, b, ta, tb);
      ASSERT_TRUE(c.ok()) << c.status();
      ExpectClose(*c, RefMatMul(a.ToDoubles(), b.ToDoubles(), m, k, n, ta, tb),
                  {m, n}, dt());
    }
  }
}

TEST_P(OpsTest, MatMulFlattensLeadingDimsOfA) {
  Tensor a = Rand({2, 3, 4, 9}, 3);
  Tensor b = Rand({7, 9}, 4);
  auto c = MatMul(a, b, false, true);
  ASSERT_TRUE(c.ok()) << c.status();
  ExpectClose(*c,
              RefMatMul(a.ToDoubles(), b.ToDoubles(), 24, 9, 7, false, true),
              {2, 3, 4, 7}, dt());
}

TEST_P(OpsTest, MatMulIntoAccumulatesWithAlphaAndBeta) {
  const int64_t m = 4, k = 6, n = 5;
  Tensor a = Rand({k, m}, 5);
  Tensor b = Rand({k, n}, 6);
  Tensor c = Random({m, n}, dt(), 7);
  const Vec c0 = c.ToDoubles();
  ASSERT_TRUE(MatMulInto(a, b, c, /*trans_a=*/true, false, 0.5, 1.0).ok());
  Vec want = RefMatMul(a.ToDoubles(), b.ToDoubles(), m, k, n, true, false);
  for (size_t i = 0; i < want.size(); ++i) want[i] = 0.5 * want[i] + c0[i];
  ExpectClose(c, want, {m, n}, dt());
}

TEST_P(OpsTest, MatMulIntoWritesOnlyItsSliceOfAView) {
  const int64_t m = 3, k = 4, n = 5;
  Tensor parent = Random({m, n + 4}, dt(), 8);
  const Vec p0 = parent.ToDoubles();
  Tensor c = *parent.Narrow(1, 2, n);
  Tensor a = Rand({m, k}, 9);
  Tensor b = Rand({n, k}, 10);
  ASSERT_TRUE(MatMulInto(a, b, c, false, true, 1.0, 1.0).ok());
  const Vec ab = RefMatMul(a.ToDoubles(), b.ToDoubles(), m, k, n, false, true);
  Vec want = p0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) want[i * (n + 4) + 2 + j] += ab[i * n + j];
  }
  const Vec got = parent.ToDoubles();
  double scale = 1;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  for (size_t i = 0; i < got.size(); ++i) {
    const int64_t col = static_cast<int64_t>(i) % (n + 4);
    if (col < 2 || col >= 2 + n) {
      EXPECT_EQ(got[i], p0[i]) << "outside the view, element " << i;
    } else {
      EXPECT_NEAR(got[i], want[i], Tol(dt()) * scale) << "element " << i;
    }
  }
}

TEST_P(OpsTest, MatMulIntoBetaZeroIgnoresNaNInC) {
  Tensor a = Rand({2, 3}, 11);
  Tensor b = Rand({3, 2}, 12);
  Tensor c = Tensor::Full({2, 2}, std::nan(""), dt());
  ASSERT_TRUE(MatMulInto(a, b, c).ok());
  ExpectClose(c, RefMatMul(a.ToDoubles(), b.ToDoubles(), 2, 3, 2, false, false),
              {2, 2}, dt());
}

TEST_P(OpsTest, BatchMatMulAllTransposes) {
  const int64_t m = 3, k = 5, n = 4;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      SCOPED_TRACE(absl::StrCat("ta=", ta, " tb=", tb));
      Tensor a = Rand(ta ? Shape{2, 3, k, m} : Shape{2, 3, m, k}, 13);
      Tensor b = Rand(tb ? Shape{2, 3, n, k} : Shape{2, 3, k, n}, 14);
      auto c = BatchMatMul(a, b, ta, tb);
      ASSERT_TRUE(c.ok()) << c.status();
      const Vec av = a.ToDoubles(), bv = b.ToDoubles();
      Vec want;
      for (int64_t i = 0; i < 6; ++i) {
        const Vec ai(av.begin() + i * m * k, av.begin() + (i + 1) * m * k);
        const Vec bi(bv.begin() + i * k * n, bv.begin() + (i + 1) * k * n);
        const Vec ci = RefMatMul(ai, bi, m, k, n, ta, tb);
        want.insert(want.end(), ci.begin(), ci.end());
      }
      ExpectClose(*c, want, {2, 3, m, n}, dt());
    }
  }
}

// Views as operands: the first rows/cols of a larger buffer (read in place)
// and a slice along a batch dim (copied first) give the same products as
// their contiguous copies.
TEST_P(OpsTest, BatchMatMulOfViews) {
  const int64_t m = 3, k = 5, n = 4;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      for (bool batch_slice : {false, true}) {
        SCOPED_TRACE(
            absl::StrCat("ta=", ta, " tb=", tb, " batch_slice=", batch_slice));
        const Shape as = ta ? Shape{k, m} : Shape{m, k};
        const Shape bs = tb ? Shape{n, k} : Shape{k, n};
        // Buffers with room to spare in the last two dims and in dim 1.
        Tensor abuf = Rand({2, 4, as[0] + 3, as[1] + 2}, 31);
        Tensor bbuf = Rand({2, 4, bs[0] + 1, bs[1] + 3}, 32);
        const int64_t b1 = batch_slice ? 3 : 4;
        Tensor a = abuf.Narrow(1, 0, b1)
                       .value()
                       .Narrow(2, 2, as[0])
                       .value()
                       .Narrow(3, 1, as[1])
                       .value();
        Tensor b = bbuf.Narrow(1, 4 - b1, b1)
                       .value()
                       .Narrow(2, 0, bs[0])
                       .value()
                       .Narrow(3, 0, bs[1])
                       .value();
        ASSERT_FALSE(a.is_contiguous());
        auto c = BatchMatMul(a, b, ta, tb);
        ASSERT_TRUE(c.ok()) << c.status();
        const Vec av = a.ToDoubles(), bv = b.ToDoubles();
        Vec want;
        for (int64_t i = 0; i < 2 * b1; ++i) {
          const Vec ai(av.begin() + i * m * k, av.begin() + (i + 1) * m * k);
          const Vec bi(bv.begin() + i * k * n, bv.begin() + (i + 1) * k * n);
          const Vec ci = RefMatMul(ai, bi, m, k, n, ta, tb);
          want.insert(want.end(), ci.begin(), ci.end());
        }
        ExpectClose(*c, want, {2, b1, m, n}, dt());
      }
    }
  }
  // A decode step's shapes: one query row against a 1-row slice of a cache
  // buffer, with a size-1 batch dim whose stride is irrelevant.
  Tensor qbuf = Rand({1, 3, 1, 4}, 33);
  Tensor kbuf = Rand({1, 3, 9, 4}, 34);
  Tensor k1 = kbuf.Narrow(2, 5, 1).value();  // [1, 3, 1, 4]
  auto c = BatchMatMul(qbuf, k1, false, true);
  ASSERT_TRUE(c.ok()) << c.status();
  const Vec qv = qbuf.ToDoubles(), kv = k1.ToDoubles();
  Vec want;
  for (int64_t h = 0; h < 3; ++h) {
    double dot = 0;
    for (int64_t i = 0; i < 4; ++i) dot += qv[h * 4 + i] * kv[h * 4 + i];
    want.push_back(dot);
  }
  ExpectClose(*c, want, {1, 3, 1, 1}, dt());
}

TEST_P(OpsTest, ElementwiseArithmetic) {
  Tensor a = Rand({3, 4, 5}, 15);
  Tensor b = Rand({3, 4, 5}, 16);
  const Vec av = a.ToDoubles(), bv = b.ToDoubles();
  Vec add(av.size()), sub(av.size()), mul(av.size()), sc(av.size());
  for (size_t i = 0; i < av.size(); ++i) {
    add[i] = av[i] + bv[i];
    sub[i] = av[i] - bv[i];
    mul[i] = av[i] * bv[i];
    sc[i] = -1.5 * av[i];
  }
  ExpectClose(*Add(a, b), add, {3, 4, 5}, dt());
  ExpectClose(*Sub(a, b), sub, {3, 4, 5}, dt());
  ExpectClose(*Mul(a, b), mul, {3, 4, 5}, dt());
  ExpectClose(*Scale(a, -1.5), sc, {3, 4, 5}, dt());
}

TEST_P(OpsTest, AddInPlaceWritesThroughAView) {
  Tensor parent = Random({3, 8}, dt(), 17);
  const Vec p0 = parent.ToDoubles();
  Tensor a = noncontig() ? *parent.Narrow(1, 2, 5) : parent;
  const Shape shape = a.shape();
  Tensor b = Rand(shape, 18);
  const Vec a0 = a.ToDoubles(), bv = b.ToDoubles();
  ASSERT_TRUE(AddInPlace(a, b).ok());
  Vec want(a0.size());
  for (size_t i = 0; i < a0.size(); ++i) want[i] = a0[i] + bv[i];
  const Vec got = a.ToDoubles();
  ExpectClose(a.Contiguous(), want, shape, dt());
  if (noncontig()) {  // The columns outside the view are untouched.
    const Vec pv = parent.ToDoubles();
    for (int64_t r = 0; r < 3; ++r) {
      for (int64_t j : {0, 1, 7}) EXPECT_EQ(pv[r * 8 + j], p0[r * 8 + j]);
    }
  }
}

TEST_P(OpsTest, AddBiasAndBiasGrad) {
  Tensor x = Rand({2, 3, 6}, 19);
  Tensor bias = Rand({6}, 20);
  const Vec xv = x.ToDoubles(), bv = bias.ToDoubles();
  Vec want(xv.size());
  for (size_t i = 0; i < xv.size(); ++i) want[i] = xv[i] + bv[i % 6];
  ExpectClose(*AddBias(x, bias), want, {2, 3, 6}, dt());
  Vec grad_want(6, 0.0);
  for (size_t i = 0; i < xv.size(); ++i) grad_want[i % 6] += xv[i];
  ExpectClose(*BiasGrad(x), grad_want, {6}, dt());
}

TEST_P(OpsTest, ActivationsForwardAndBackward) {
  Tensor x = Rand({4, 7}, 21, -4, 4);
  Tensor g = Rand({4, 7}, 22);
  const Vec xv = x.ToDoubles(), gv = g.ToDoubles();
  Vec gelu(xv.size()), dgelu(xv.size()), silu(xv.size()), dsilu(xv.size());
  for (size_t i = 0; i < xv.size(); ++i) {
    gelu[i] = RefGeLU(xv[i]);
    dgelu[i] = gv[i] * RefGeLUGrad(xv[i]);
    silu[i] = RefSiLU(xv[i]);
    dsilu[i] = gv[i] * RefSiLUGrad(xv[i]);
  }
  ExpectClose(*GeLU(x), gelu, {4, 7}, dt());
  ExpectClose(*GeLUBackward(g, x), dgelu, {4, 7}, dt());
  ExpectClose(*SiLU(x), silu, {4, 7}, dt());
  ExpectClose(*SiLUBackward(g, x), dsilu, {4, 7}, dt());
}

TEST_P(OpsTest, ElementwiseOpsSplitOverThreadsMatchTheReference) {
  // Above 2 x 65,536 elements, element-wise ops run on up to
  // openblas_get_num_threads() threads in contiguous pieces; n is not a
  // multiple of the piece, so the last piece is short.
  const int saved = openblas_get_num_threads();
  openblas_set_num_threads(3);
  const int64_t n = 3 * 65536 + 17;
  Tensor x = Rand({n}, 31, -4, 4);
  Tensor g = Rand({n}, 32);
  const Vec xv = x.ToDoubles(), gv = g.ToDoubles();
  Vec gelu(n), dgelu(n), sum(n);
  for (int64_t i = 0; i < n; ++i) {
    gelu[i] = RefGeLU(xv[i]);
    dgelu[i] = gv[i] * RefGeLUGrad(xv[i]);
    sum[i] = xv[i] + gv[i];
  }
  ExpectClose(*GeLU(x), gelu, {n}, dt());
  ExpectClose(*GeLUBackward(g, x), dgelu, {n}, dt());
  ExpectClose(*Add(x, g), sum, {n}, dt());
  openblas_set_num_threads(saved);
}

TEST_P(OpsTest, SoftmaxPlainAndCausal) {
  for (bool causal : {false, true}) {
    for (int64_t sq : {4, 2}) {  // sq == sk and sq < sk (KV cache)
      SCOPED_TRACE(absl::StrCat("causal=", causal, " sq=", sq));
      const int64_t sk = 4;
      Tensor x = Rand({2, sq, sk}, 23, -5, 5);
      auto y = Softmax(x, causal);
      ASSERT_TRUE(y.ok()) << y.status();
      const Vec want = RefSoftmax(x.ToDoubles(), sq, sk, causal);
      ExpectClose(*y, want, {2, sq, sk}, dt());
      const Vec yv = y->ToDoubles();
      for (size_t i = 0; i < want.size(); ++i) {
        if (want[i] == 0.0) {
          EXPECT_EQ(yv[i], 0.0) << "masked element " << i;
        }
      }
      Tensor g = Rand({2, sq, sk}, 24);
      const Vec gv = g.ToDoubles();
      // Reference on the op's own output y (the backward's input).
      Vec dx(yv.size());
      for (int64_t r = 0; r < 2 * sq; ++r) {
        double dot = 0;
        for (int64_t j = 0; j < sk; ++j) dot += gv[r * sk + j] * yv[r * sk + j];
        for (int64_t j = 0; j < sk; ++j) {
          dx[r * sk + j] = yv[r * sk + j] * (gv[r * sk + j] - dot);
        }
      }
      ExpectClose(*SoftmaxBackward(g, *y), dx, {2, sq, sk}, dt());
    }
  }
}

TEST_P(OpsTest, LayerNormForwardAndBackward) {
  const int64_t n = 8;
  Tensor x = Rand({3, 2, n}, 25, -3, 3);
  Tensor gamma = Rand({n}, 26, 0.5, 1.5);
  Tensor beta = Rand({n}, 27);
  auto out = LayerNorm(x, gamma, beta, 1e-5);
  ASSERT_TRUE(out.ok()) << out.status();
  const Vec xv = x.ToDoubles(), gv = gamma.ToDoubles(), bv = beta.ToDoubles();
  const RefNorm ref = RefNormForward(xv, gv, &bv, n, 1e-5);
  const DType stats =
      dt() == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
  ExpectClose(out->y, ref.y, {3, 2, n}, dt());
  ExpectClose(out->mean, ref.mean, {3, 2}, stats, Tol(dt()) / Tol(stats));
  ExpectClose(out->rstd, ref.rstd, {3, 2}, stats, Tol(dt()) / Tol(stats));

  // Backward reference: the closed form, evaluated in double.
  Tensor gy = Rand({3, 2, n}, 28);
  const Vec gyv = gy.ToDoubles();
  Vec dx(xv.size()), dg(n, 0.0), db(n, 0.0);
  for (int64_t r = 0; r < 6; ++r) {
    double sg = 0, sgx = 0;
    Vec xhat(n);
    for (int64_t j = 0; j < n; ++j) {
      xhat[j] = (xv[r * n + j] - ref.mean[r]) * ref.rstd[r];
      sg += gyv[r * n + j] * gv[j];
      sgx += gyv[r * n + j] * gv[j] * xhat[j];
      dg[j] += gyv[r * n + j] * xhat[j];
      db[j] += gyv[r * n + j];
    }
    for (int64_t j = 0; j < n; ++j) {
      dx[r * n + j] =
          ref.rstd[r] * (gyv[r * n + j] * gv[j] - sg / n - xhat[j] * sgx / n);
    }
  }
  auto grads = LayerNormBackward(gy, x, gamma, out->mean, out->rstd);
  ASSERT_TRUE(grads.ok()) << grads.status();
  ExpectClose(grads->dx, dx, {3, 2, n}, dt(), 2);
  ExpectClose(grads->dgamma, dg, {n}, dt(), 2);
  ExpectClose(grads->dbeta, db, {n}, dt());
}

TEST_P(OpsTest, RMSNormForwardAndBackward) {
  const int64_t n = 8;
  Tensor x = Rand({5, n}, 29, -3, 3);
  Tensor gamma = Rand({n}, 30, 0.5, 1.5);
  auto out = RMSNorm(x, gamma, 1e-6);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_FALSE(out->mean.defined());
  const Vec xv = x.ToDoubles(), gv = gamma.ToDoubles();
  const RefNorm ref = RefNormForward(xv, gv, nullptr, n, 1e-6);
  const DType stats =
      dt() == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
  ExpectClose(out->y, ref.y, {5, n}, dt());
  ExpectClose(out->rstd, ref.rstd, {5}, stats, Tol(dt()) / Tol(stats));
  Tensor gy = Rand({5, n}, 31);
  const Vec gyv = gy.ToDoubles();
  Vec dx(xv.size()), dg(n, 0.0);
  for (int64_t r = 0; r < 5; ++r) {
    double sgx = 0;
    for (int64_t j = 0; j < n; ++j) {
      const double xhat = xv[r * n + j] * ref.rstd[r];
      sgx += gyv[r * n + j] * gv[j] * xhat;
      dg[j] += gyv[r * n + j] * xhat;
    }
    for (int64_t j = 0; j < n; ++j) {
      const double xhat = xv[r * n + j] * ref.rstd[r];
      dx[r * n + j] = ref.rstd[r] * (gyv[r * n + j] * gv[j] - xhat * sgx / n);
    }
  }
  auto grads = RMSNormBackward(gy, x, gamma, out->rstd);
  ASSERT_TRUE(grads.ok()) << grads.status();
  ExpectClose(grads->dx, dx, {5, n}, dt(), 2);
  ExpectClose(grads->dgamma, dg, {n}, dt(), 2);
  EXPECT_FALSE(grads->dbeta.defined());
}

TEST_P(OpsTest, EmbeddingAndBackward) {
  Tensor table = Rand({6, 5}, 32);
  for (DType id_dt : {DType::kInt32, DType::kInt64}) {
    SCOPED_TRACE(DTypeName(id_dt));
    const Vec idv = {3, 0, 5, 3, 3, 1};
    Tensor ids = *Tensor::FromDoubles(idv, {2, 3}, id_dt);
    auto e = Embedding(table, ids);
    ASSERT_TRUE(e.ok()) << e.status();
    const Vec tv = table.ToDoubles();
    Vec want;
    for (double id : idv) {
      for (int64_t j = 0; j < 5; ++j) want.push_back(tv[id * 5 + j]);
    }
    ExpectClose(*e, want, {2, 3, 5}, dt());
    EXPECT_EQ(e->ToDoubles(), want);  // a lookup is exact

    Tensor g = Rand({2, 3, 5}, 33);
    const Vec gv = g.ToDoubles();
    Vec dt_want(7 * 5, 0.0);  // vocab 7 > max id + 1: row 6 stays zero
    for (size_t i = 0; i < idv.size(); ++i) {
      for (int64_t j = 0; j < 5; ++j) dt_want[idv[i] * 5 + j] += gv[i * 5 + j];
    }
    auto d = EmbeddingBackward(g, ids, 7);
    ASSERT_TRUE(d.ok()) << d.status();
    ExpectClose(*d, dt_want, {7, 5}, dt());
  }
}

std::string ParamName(const ::testing::TestParamInfo<Param>& info) {
  return absl::StrCat(DTypeName(std::get<0>(info.param)),
                      std::get<1>(info.param) ? "_strided" : "_contiguous");
}

INSTANTIATE_TEST_SUITE_P(
    DTypesAndLayouts, OpsTest,
    ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat64,
                                         DType::kFloat16, DType::kBFloat16),
                       ::testing::Bool()),
    ParamName);

// ---- larger GEMM shapes (blocking paths of OpenBLAS) -----------------------

TEST(MatMulTest, LargerShapesMatchNaiveReference) {
  for (DType dt : {DType::kFloat32, DType::kFloat64}) {
    Tensor a = Random({67, 300}, dt, 40);
    Tensor b = Random({300, 129}, dt, 41);
    auto c = MatMul(a, b);
    ASSERT_TRUE(c.ok()) << c.status();
    ExpectClose(
        *c, RefMatMul(a.ToDoubles(), b.ToDoubles(), 67, 300, 129, false, false),
        {67, 129}, dt);
  }
}

TEST(MatMulTest, ConcurrentCallsFromSeveralThreadsAgree) {
  // Multi-rank tests run one rank per thread, each calling MatMul.
  Tensor a = Random({96, 200}, DType::kFloat32, 42);
  Tensor b = Random({150, 200}, DType::kFloat32, 43);
  const Vec want = MatMul(a, b, false, true)->ToDoubles();
  std::vector<Vec> got(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 20; ++i)
        got[t] = MatMul(a, b, false, true)->ToDoubles();
    });
  }
  for (std::thread& t : threads) t.join();
  for (const Vec& g : got) EXPECT_EQ(g, want);
}

TEST(MatMulTest, EmptyInnerDimensionGivesZeros) {
  Tensor a = Tensor::Zeros({3, 0}, DType::kFloat32);
  Tensor b = Tensor::Zeros({0, 2}, DType::kFloat32);
  auto c = MatMul(a, b);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->shape(), (Shape{3, 2}));
  EXPECT_EQ(c->ToDoubles(), Vec(6, 0.0));
  // MatMulInto with k = 0 scales c by beta.
  Tensor cc = Tensor::Full({3, 2}, 2.0, DType::kFloat32);
  ASSERT_TRUE(MatMulInto(a, b, cc, false, false, 1.0, 0.5).ok());
  EXPECT_EQ(cc.ToDoubles(), Vec(6, 1.0));
}

TEST(MatMulTest, FloatOutputsOfHalfInputsAreRoundedOnce) {
  // 1 + 2^-11 is not representable in fp16: the fp32 product is rounded.
  Tensor a = *Tensor::FromDoubles({1.0, 1.0}, {1, 2}, DType::kFloat16);
  Tensor b =
      *Tensor::FromDoubles({1.0, 0.00048828125}, {2, 1}, DType::kFloat16);
  auto c = MatMul(a, b);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->ToDoubles(), Vec{1.0});  // tie -> even (1.0, not 1 + 2^-10)
}

// ---- finite differences in float64 ----------------------------------------

TEST(FiniteDifferenceTest, ActivationBackwardsMatchNumericalGradients) {
  Tensor x = Random({3, 5}, DType::kFloat64, 50, false, -3, 3);
  Tensor w = Random({3, 5}, DType::kFloat64, 51);
  const Vec wv = w.ToDoubles();
  ExpectNearVec(
      GeLUBackward(w, x)->ToDoubles(),
      FiniteDiff(x, wv, [](const Tensor& t) { return GeLU(t)->ToDoubles(); }),
      1e-7);
  ExpectNearVec(
      SiLUBackward(w, x)->ToDoubles(),
      FiniteDiff(x, wv, [](const Tensor& t) { return SiLU(t)->ToDoubles(); }),
      1e-7);
}

TEST(FiniteDifferenceTest, SoftmaxBackwardMatchesNumericalGradient) {
  for (bool causal : {false, true}) {
    Tensor x = Random({2, 3, 5}, DType::kFloat64, 52, false, -3, 3);
    Tensor w = Random({2, 3, 5}, DType::kFloat64, 53);
    Tensor y = *Softmax(x, causal);
    ExpectNearVec(SoftmaxBackward(w, y)->ToDoubles(),
                  FiniteDiff(x, w.ToDoubles(),
                             [causal](const Tensor& t) {
                               return Softmax(t, causal)->ToDoubles();
                             }),
                  1e-7);
  }
}

TEST(FiniteDifferenceTest, NormBackwardsMatchNumericalGradients) {
  const int64_t n = 6;
  Tensor x = Random({4, n}, DType::kFloat64, 54, false, -2, 2);
  Tensor gamma = Random({n}, DType::kFloat64, 55, false, 0.5, 1.5);
  Tensor beta = Random({n}, DType::kFloat64, 56);
  Tensor w = Random({4, n}, DType::kFloat64, 57);
  const Vec wv = w.ToDoubles();

  NormOutput ln = *LayerNorm(x, gamma, beta, 1e-5);
  NormGrads lg = *LayerNormBackward(w, x, gamma, ln.mean, ln.rstd);
  ExpectNearVec(
      lg.dx.ToDoubles(),
      FiniteDiff(x, wv,
                 [&](const Tensor& t) {
                   return LayerNorm(t, gamma, beta, 1e-5)->y.ToDoubles();
                 }),
      1e-6);
  ExpectNearVec(lg.dgamma.ToDoubles(),
                FiniteDiff(gamma, wv,
                           [&](const Tensor& t) {
                             return LayerNorm(x, t, beta, 1e-5)->y.ToDoubles();
                           }),
                1e-6);
  ExpectNearVec(lg.dbeta.ToDoubles(),
                FiniteDiff(beta, wv,
                           [&](const Tensor& t) {
                             return LayerNorm(x, gamma, t, 1e-5)->y.ToDoubles();
                           }),
                1e-6);

  NormOutput rn = *RMSNorm(x, gamma, 1e-6);
  NormGrads rg = *RMSNormBackward(w, x, gamma, rn.rstd);
  ExpectNearVec(rg.dx.ToDoubles(),
                FiniteDiff(x, wv,
                           [&](const Tensor& t) {
                             return RMSNorm(t, gamma, 1e-6)->y.ToDoubles();
                           }),
                1e-6);
  ExpectNearVec(rg.dgamma.ToDoubles(),
                FiniteDiff(gamma, wv,
                           [&](const Tensor& t) {
                             return RMSNorm(x, t, 1e-6)->y.ToDoubles();
                           }),
                1e-6);
}

TEST(FiniteDifferenceTest, MatMulAndEmbeddingGradientsMatch) {
  // dL/dA = G B^T via MatMul(trans_b), dL/dB = A^T G via MatMulInto(trans_a).
  Tensor a = Random({3, 4}, DType::kFloat64, 58);
  Tensor b = Random({4, 2}, DType::kFloat64, 59);
  Tensor g = Random({3, 2}, DType::kFloat64, 60);
  const Vec gv = g.ToDoubles();
  ExpectNearVec(
      MatMul(g, b, false, true)->ToDoubles(),
      FiniteDiff(a, gv,
                 [&](const Tensor& t) { return MatMul(t, b)->ToDoubles(); }),
      1e-7);
  Tensor db = Tensor::Zeros({4, 2}, DType::kFloat64);
  ASSERT_TRUE(MatMulInto(a, g, db, true, false).ok());
  ExpectNearVec(
      db.ToDoubles(),
      FiniteDiff(b, gv,
                 [&](const Tensor& t) { return MatMul(a, t)->ToDoubles(); }),
      1e-7);
}

// ---- numerics
// ----------------------------------------------------------------

TEST(SoftmaxTest, IsStableForLargeLogits) {
  Tensor x = *Tensor::FromVector<float>({1000, 1001, 1002, -1000}, {1, 4});
  const Vec y = Softmax(x)->ToDoubles();
  const Vec want = RefSoftmax({1000, 1001, 1002, -1000}, 1, 4, false);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(y[i], want[i], 1e-6);
}

TEST(SoftmaxTest, CausalMaskFollowsTheKVCacheConvention) {
  // Sq = 2 queries are the last two of Sk = 4 keys: row 0 sees keys 0..2,
  // row 1 sees all four.
  Tensor x = Tensor::Zeros({2, 4}, DType::kFloat64);
  const Vec y = Softmax(x, true)->ToDoubles();
  const double t = 1.0 / 3;
  EXPECT_EQ(y, (Vec{t, t, t, 0, 0.25, 0.25, 0.25, 0.25}));
}

TEST(SumTest, SumsAnyDTypeAndViews) {
  Tensor i = *Tensor::FromVector<int64_t>({1, 2, 3, 4, 5, 6}, {2, 3});
  EXPECT_EQ(*Sum(i), 21.0);
  EXPECT_EQ(*Sum(*i.Narrow(1, 1, 2)), 16.0);  // 2 + 3 + 5 + 6
  Tensor h = *Tensor::FromDoubles({0.5, 0.25, 1.5}, {3}, DType::kBFloat16);
  EXPECT_EQ(*Sum(h), 2.25);
  EXPECT_EQ(*Sum(Tensor::Zeros({0, 3}, DType::kFloat32)), 0.0);
  ExpectInvalid(Sum(Tensor()), {"Sum", "undefined"});
}

TEST(CastTest, RoundsCorrectlyWithoutDoubleRounding) {
  // 1 + 2^-11 + 2^-40: float32 would round it to the fp16 tie 1 + 2^-11
  // (then to 1.0); the correctly rounded fp16 is 1 + 2^-10.
  const double v = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);
  Tensor d = *Tensor::FromVector<double>({v, -v}, {2});
  Tensor h = *Cast(d, DType::kFloat16);
  auto hv = *h.ToVector<Half>();
  EXPECT_EQ(hv[0].bits, 0x3c01);
  EXPECT_EQ(hv[1].bits, 0xbc01);
  // Same for bf16: 1 + 2^-8 + 2^-40 -> 1 + 2^-7.
  const double w = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);
  auto bv = *Cast(*Tensor::FromVector<double>({w}, {1}), DType::kBFloat16)
                 ->ToVector<BFloat16>();
  EXPECT_EQ(bv[0].bits, 0x3f81);
}

TEST(CastTest, FloatToIntegerTruncatesSaturatesAndMapsNaNToZero) {
  Tensor f = *Tensor::FromVector<float>(
      {-2.7f, 2.7f, std::nanf(""), 1e20f, -1e20f, 0.0f}, {6});
  EXPECT_THAT(*Cast(f, DType::kInt32)->ToVector<int32_t>(),
              ::testing::ElementsAre(-2, 2, 0, INT32_MAX, INT32_MIN, 0));
  EXPECT_THAT(*Cast(f, DType::kInt64)->ToVector<int64_t>(),
              ::testing::ElementsAre(-2, 2, 0, INT64_MAX, INT64_MIN, 0));
}

TEST(CastTest, IntegersAndSameDTypeCopies) {
  Tensor i = *Tensor::FromVector<int64_t>({(int64_t{1} << 53) + 1, -7}, {2});
  // int64 -> float64 rounds 2^53 + 1 to nearest even (2^53).
  EXPECT_EQ(Cast(i, DType::kFloat64)->ToDoubles(),
            (Vec{9007199254740992.0, -7}));
  EXPECT_THAT(*Cast(i, DType::kInt32)->ToVector<int32_t>(),
              ::testing::ElementsAre(INT32_MAX, -7));
  Tensor same = *Cast(i, DType::kInt64);
  EXPECT_FALSE(same.SharesStorageWith(i));
  EXPECT_EQ(same.ToDoubles(), i.ToDoubles());
  // A float32 value that fp16 cannot hold overflows to infinity.
  Tensor big = *Tensor::FromVector<float>({70000.0f}, {1});
  EXPECT_TRUE(std::isinf(Cast(big, DType::kFloat16)->ToDoubles()[0]));
}

// ---- shape manipulation -----------------------------------------------------

// Reference element of a [2, 3, 4] tensor whose value encodes its index.
Tensor Iota(const Shape& s, DType dt) {
  Vec v(static_cast<size_t>(Prod(s)));
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(i);
  return *Tensor::FromDoubles(v, s, dt);
}

TEST(ShapeOpsTest, ConcatAlongEveryDimension) {
  for (DType dt : {DType::kFloat32, DType::kInt32, DType::kFloat16}) {
    for (int dim : {0, 1, 2, -1}) {
      SCOPED_TRACE(absl::StrCat(DTypeName(dt), " dim ", dim));
      const int d = dim < 0 ? dim + 3 : dim;
      Shape s1 = {2, 3, 4}, s2 = {2, 3, 4};
      s2[d] = 1;
      Tensor a = Iota(s1, dt);
      Tensor b = *Tensor::FromDoubles(Vec(Prod(s2), -1.0), s2, dt);
      // A strided third input: a Narrow view of a wider tensor.
      Shape s3 = s1;
      s3[d] = 2;
      Tensor wide = Iota(
          {2 + (d == 0 ? 2 : 0), 3 + (d == 1 ? 2 : 0), 4 + (d == 2 ? 2 : 0)},
          dt);
      Tensor c = *wide.Narrow(d, 1, 2);
      auto out = Concat({a, b, c}, dim);
      ASSERT_TRUE(out.ok()) << out.status();
      Shape so = s1;
      so[d] = s1[d] + 1 + 2;
      ASSERT_EQ(out->shape(), so);
      const Vec av = a.ToDoubles(), bv = b.ToDoubles(), cv = c.ToDoubles();
      const Vec ov = out->ToDoubles();
      // Reference: walk the output index and pick the source.
      for (int64_t i = 0; i < so[0]; ++i) {
        for (int64_t j = 0; j < so[1]; ++j) {
          for (int64_t k = 0; k < so[2]; ++k) {
            int64_t idx[3] = {i, j, k};
            double want;
            const int64_t pos = idx[d];
            if (pos < s1[d]) {
              want = av[(idx[0] * s1[1] + idx[1]) * s1[2] + idx[2]];
            } else if (pos < s1[d] + 1) {
              idx[d] -= s1[d];
              want = bv[(idx[0] * s2[1] + idx[1]) * s2[2] + idx[2]];
            } else {
              idx[d] -= s1[d] + 1;
              want = cv[(idx[0] * s3[1] + idx[1]) * s3[2] + idx[2]];
            }
            EXPECT_EQ(ov[(i * so[1] + j) * so[2] + k], want);
          }
        }
      }
    }
  }
}

TEST(ShapeOpsTest, SplitInvertsConcatAndCopies) {
  Tensor x = Iota({4, 6, 2}, DType::kFloat64);
  for (int dim : {0, 1, -1}) {
    SCOPED_TRACE(dim);
    const int d = dim < 0 ? dim + 3 : dim;
    auto parts = Split(x, 2, dim);
    ASSERT_TRUE(parts.ok()) << parts.status();
    ASSERT_EQ(parts->size(), 2u);
    for (int p = 0; p < 2; ++p) {
      const Tensor& part = (*parts)[p];
      EXPECT_FALSE(part.SharesStorageWith(x));
      EXPECT_TRUE(part.is_contiguous());
      EXPECT_EQ(part.ToDoubles(),
                x.Narrow(d, p * x.dim(d) / 2, x.dim(d) / 2)->ToDoubles());
    }
    EXPECT_EQ(Concat(*parts, dim)->ToDoubles(), x.ToDoubles());
  }
  auto sized = SplitSizes(x, {1, 0, 5}, 1);
  ASSERT_TRUE(sized.ok()) << sized.status();
  EXPECT_EQ((*sized)[0].shape(), (Shape{4, 1, 2}));
  EXPECT_EQ((*sized)[1].shape(), (Shape{4, 0, 2}));
  EXPECT_EQ((*sized)[2].ToDoubles(), x.Narrow(1, 1, 5)->ToDoubles());
}

TEST(ShapeOpsTest, TransposeMatchesIndexSwap) {
  for (bool strided : {false, true}) {
    Tensor base = Iota({2, 3, 6}, DType::kInt64);
    Tensor x = strided ? *base.Narrow(2, 1, 4) : *base.Narrow(2, 0, 6);
    const Shape s = x.shape();
    const Vec xv = x.ToDoubles();
    for (auto [d0, d1] : {std::pair<int, int>{0, 1}, {0, 2}, {1, -1}, {2, 2}}) {
      SCOPED_TRACE(absl::StrCat("strided ", strided, " ", d0, ",", d1));
      auto t = Transpose(x, d0, d1);
      ASSERT_TRUE(t.ok()) << t.status();
      const int a = d0 < 0 ? d0 + 3 : d0, b = d1 < 0 ? d1 + 3 : d1;
      Shape ts = s;
      std::swap(ts[a], ts[b]);
      ASSERT_EQ(t->shape(), ts);
      EXPECT_TRUE(t->is_contiguous());
      const Vec tv = t->ToDoubles();
      for (int64_t i = 0; i < ts[0]; ++i) {
        for (int64_t j = 0; j < ts[1]; ++j) {
          for (int64_t k = 0; k < ts[2]; ++k) {
            int64_t src[3] = {i, j, k};
            std::swap(src[a], src[b]);
            EXPECT_EQ(tv[(i * ts[1] + j) * ts[2] + k],
                      xv[(src[0] * s[1] + src[1]) * s[2] + src[2]]);
          }
        }
      }
    }
  }
}

// ---- error paths
// ---------------------------------------------------------------

TEST(OpsErrorTest, MatMulNamesShapesAndDTypes) {
  Tensor a = Tensor::Zeros({4, 3}, DType::kFloat32);
  Tensor b = Tensor::Zeros({5, 2}, DType::kFloat32);
  ExpectInvalid(MatMul(a, b, false, true),
                {"MatMul", "[4, 3]", "[5, 2]", "trans_b", "3 and 2"});
  ExpectInvalid(MatMul(a, Tensor::Zeros({3, 2}, DType::kFloat64)),
                {"MatMul", "float32", "float64"});
  ExpectInvalid(MatMul(a, Tensor::Zeros({2, 3, 2}, DType::kFloat32)),
                {"MatMul", "[2, 3, 2]", "BatchMatMul"});
  ExpectInvalid(MatMul(Tensor::Zeros({2, 4, 3}, DType::kFloat32),
                       Tensor::Zeros({4, 2}, DType::kFloat32), true, false),
                {"MatMul", "trans_a"});
  ExpectInvalid(MatMul(Tensor::Zeros({3}, DType::kFloat32), a),
                {"MatMul", "[3]"});
  ExpectInvalid(MatMul(Tensor::Zeros({2, 3}, DType::kInt32),
                       Tensor::Zeros({3, 2}, DType::kInt32)),
                {"MatMul", "floating", "int32"});
  ExpectInvalid(MatMul(Tensor(), a), {"MatMul", "undefined"});
}

TEST(OpsErrorTest, MatMulIntoChecksC) {
  Tensor a = Tensor::Zeros({4, 3}, DType::kFloat32);
  Tensor b = Tensor::Zeros({3, 2}, DType::kFloat32);
  Tensor c = Tensor::Zeros({4, 3}, DType::kFloat32);
  ExpectInvalid(MatMulInto(a, b, c), {"MatMulInto", "[4, 3]", "[4, 2]"});
  Tensor c64 = Tensor::Zeros({4, 2}, DType::kFloat64);
  ExpectInvalid(MatMulInto(a, b, c64), {"MatMulInto", "float64", "float32"});
  Tensor sq = Tensor::Zeros({3, 3}, DType::kFloat32);
  Tensor alias = sq;
  ExpectInvalid(MatMulInto(sq, sq, alias), {"MatMulInto", "shares storage"});
  ExpectInvalid(MatMulInto(a, Tensor::Zeros({2, 2}, DType::kFloat32), c),
                {"MatMulInto", "inner dimensions 3 and 2"});
  Tensor c3 = Tensor::Zeros({1, 4, 2}, DType::kFloat32);
  ExpectInvalid(MatMulInto(a, b, c3), {"MatMulInto", "2-D"});
}

TEST(OpsErrorTest, BatchMatMulChecksBatchAndInnerDims) {
  Tensor a = Tensor::Zeros({2, 3, 4}, DType::kFloat32);
  ExpectInvalid(BatchMatMul(a, Tensor::Zeros({3, 4, 5}, DType::kFloat32)),
                {"BatchMatMul", "[2, 3, 4]", "[3, 4, 5]", "batch"});
  ExpectInvalid(BatchMatMul(a, Tensor::Zeros({2, 5, 5}, DType::kFloat32)),
                {"BatchMatMul", "inner dimensions 4 and 5"});
  ExpectInvalid(BatchMatMul(Tensor::Zeros({3, 4}, DType::kFloat32),
                            Tensor::Zeros({4, 5}, DType::kFloat32)),
                {"BatchMatMul", "rank >= 3"});
}

TEST(OpsErrorTest, ElementwiseNamesBothShapes) {
  Tensor a = Tensor::Zeros({2, 3}, DType::kFloat32);
  Tensor b = Tensor::Zeros({3, 2}, DType::kFloat32);
  ExpectInvalid(Add(a, b), {"ops::Add", "[2, 3]", "[3, 2]"});
  ExpectInvalid(Sub(a, b), {"ops::Sub", "[2, 3]", "[3, 2]"});
  ExpectInvalid(Mul(a, b), {"ops::Mul", "[2, 3]", "[3, 2]"});
  ExpectInvalid(AddInPlace(a, b), {"AddInPlace", "[2, 3]", "[3, 2]"});
  ExpectInvalid(Add(a, Tensor::Zeros({2, 3}, DType::kBFloat16)),
                {"ops::Add", "float32", "bfloat16"});
  ExpectInvalid(Scale(Tensor::Zeros({2}, DType::kInt64), 2.0),
                {"Scale", "int64"});
  ExpectInvalid(GeLUBackward(a, b), {"GeLUBackward", "[2, 3]", "[3, 2]"});
  ExpectInvalid(SiLUBackward(a, b), {"SiLUBackward", "[2, 3]", "[3, 2]"});
  ExpectInvalid(GeLU(Tensor::Zeros({2}, DType::kInt32)), {"GeLU", "int32"});
  ExpectInvalid(SiLU(Tensor()), {"SiLU", "undefined"});
  ExpectInvalid(SoftmaxBackward(a, b), {"SoftmaxBackward", "[2, 3]", "[3, 2]"});
}

TEST(OpsErrorTest, BiasShapes) {
  Tensor x = Tensor::Zeros({2, 3}, DType::kFloat32);
  ExpectInvalid(AddBias(x, Tensor::Zeros({2}, DType::kFloat32)),
                {"AddBias", "[2]", "[2, 3]"});
  ExpectInvalid(AddBias(x, Tensor::Zeros({1, 3}, DType::kFloat32)),
                {"AddBias", "[1, 3]"});
  ExpectInvalid(AddBias(x, Tensor::Zeros({3}, DType::kFloat64)),
                {"AddBias", "float64"});
  ExpectInvalid(BiasGrad(Tensor::Zeros({}, DType::kFloat32)),
                {"BiasGrad", "rank"});
}

TEST(OpsErrorTest, SoftmaxRanksAndCausalShape) {
  ExpectInvalid(Softmax(Tensor::Zeros({4}, DType::kFloat32), true),
                {"Softmax", "[4]", "causal"});
  ExpectInvalid(Softmax(Tensor::Zeros({3, 2}, DType::kFloat32), true),
                {"Softmax", "[3, 2]", "fewer keys (2) than queries (3)"});
  ExpectInvalid(Softmax(Tensor::Zeros({}, DType::kFloat32)),
                {"Softmax", "rank"});
}

TEST(OpsErrorTest, NormParameters) {
  Tensor x = Tensor::Zeros({2, 4}, DType::kFloat32);
  Tensor g = Tensor::Zeros({4}, DType::kFloat32);
  Tensor bad = Tensor::Zeros({3}, DType::kFloat32);
  ExpectInvalid(LayerNorm(x, bad, g), {"LayerNorm", "gamma", "[3]", "[2, 4]"});
  ExpectInvalid(LayerNorm(x, g, bad), {"LayerNorm", "beta", "[3]"});
  ExpectInvalid(LayerNorm(x, g, Tensor::Zeros({4}, DType::kFloat16)),
                {"LayerNorm", "float16"});
  ExpectInvalid(LayerNorm(x, g, g, -1.0), {"LayerNorm", "eps"});
  ExpectInvalid(RMSNorm(x, bad), {"RMSNorm", "gamma", "[3]"});
  ExpectInvalid(RMSNorm(Tensor::Zeros({2, 0}, DType::kFloat32),
                        Tensor::Zeros({0}, DType::kFloat32)),
                {"RMSNorm", "[2, 0]"});
  NormOutput out = *LayerNorm(x, g, g);
  ExpectInvalid(
      LayerNormBackward(x, x, g, out.rstd, Tensor::Zeros({4}, DType::kFloat32)),
      {"LayerNormBackward", "rstd", "[4]", "[2]"});
  ExpectInvalid(
      LayerNormBackward(x, x, g, Tensor::Zeros({2}, DType::kFloat64), out.rstd),
      {"LayerNormBackward", "mean", "float64"});
  ExpectInvalid(LayerNormBackward(Tensor::Zeros({2, 3}, DType::kFloat32), x, g,
                                  out.mean, out.rstd),
                {"LayerNormBackward", "[2, 3]", "[2, 4]"});
  ExpectInvalid(RMSNormBackward(x, x, g, Tensor()),
                {"RMSNormBackward", "rstd"});
}

TEST(OpsErrorTest, ConcatSplitTranspose) {
  Tensor a = Tensor::Zeros({2, 3}, DType::kFloat32);
  ExpectInvalid(Concat({}, 0), {"Concat"});
  ExpectInvalid(Concat({a, Tensor::Zeros({3, 3}, DType::kFloat32)}, 1),
                {"Concat", "tensors[1]", "[3, 3]", "[2, 3]"});
  ExpectInvalid(Concat({a, Tensor::Zeros({2, 3}, DType::kInt32)}, 0),
                {"Concat", "int32"});
  ExpectInvalid(Concat({a, Tensor::Zeros({2, 3, 1}, DType::kFloat32)}, 0),
                {"Concat", "[2, 3, 1]"});
  ExpectInvalid(Concat({a}, 2), {"Concat", "dim 2"});
  ExpectInvalid(Split(a, 2, 1), {"Split", "[2, 3]", "2 equal parts"});
  ExpectInvalid(Split(a, 0, 0), {"Split", "0 equal parts"});
  ExpectInvalid(Split(a, 1, -3), {"Split", "dim -3"});
  ExpectInvalid(SplitSizes(a, {1, 1}, 1), {"SplitSizes", "sum to 2", "3"});
  ExpectInvalid(SplitSizes(a, {4, -1}, 1), {"SplitSizes", "negative"});
  ExpectInvalid(Transpose(a, 0, 2), {"Transpose", "dim 2"});
}

TEST(OpsErrorTest, EmbeddingIdsAndShapes) {
  Tensor table = Tensor::Zeros({4, 3}, DType::kFloat32);
  Tensor ids = *Tensor::FromVector<int32_t>({0, 7, 1}, {3});
  ExpectInvalid(Embedding(table, ids),
                {"Embedding", "id 7", "position 1", "[0, 4)"});
  ExpectInvalid(Embedding(table, *Tensor::FromVector<int64_t>({-1}, {1})),
                {"Embedding", "id -1"});
  ExpectInvalid(Embedding(table, Tensor::Zeros({2}, DType::kFloat32)),
                {"Embedding", "int32 or int64", "float32"});
  ExpectInvalid(Embedding(Tensor::Zeros({4}, DType::kFloat32),
                          *Tensor::FromVector<int32_t>({0}, {1})),
                {"Embedding", "2-D"});
  Tensor good = *Tensor::FromVector<int64_t>({0, 3}, {2});
  ExpectInvalid(
      EmbeddingBackward(Tensor::Zeros({3, 3}, DType::kFloat32), good, 4),
      {"EmbeddingBackward", "[3, 3]", "[2]"});
  ExpectInvalid(
      EmbeddingBackward(Tensor::Zeros({2, 3}, DType::kFloat32), good, 3),
      {"EmbeddingBackward", "id 3", "[0, 3)"});
  ExpectInvalid(
      EmbeddingBackward(Tensor::Zeros({2, 3}, DType::kFloat32), good, 0),
      {"EmbeddingBackward", "vocab"});
}

TEST(OpsErrorTest, UndefinedInputs) {
  ExpectInvalid(Cast(Tensor(), DType::kFloat32), {"Cast", "undefined"});
  ExpectInvalid(Transpose(Tensor(), 0, 1), {"Transpose", "undefined"});
  ExpectInvalid(Embedding(Tensor(), Tensor()), {"Embedding", "undefined"});
}

}  // namespace
}  // namespace ops
}  // namespace tp
