// Serial float64 reference of the linear, embedding and cross-entropy layers
// (tests of layers/linear.h, layers/vocab_parallel.h, layers/mappings.h).
//
// Written independently of runtime/ops and layers/: plain loops over
// row-major std::vector<double>, no BLAS, no tensors, no communication. Each
// function computes what the TP = 1 layer computes, in float64, so a layer at
// any TP size can be compared against it.
//
// Shapes are given explicitly; matrices are row-major:
//   x [t, in], w [out, in] (the [out, in] layout of the layers), b [out].
//
// Example:
//   std::vector<double> y = ref::LinearForward(x, w, b, t, in, out);
//   ref::LinearGrads g = ref::LinearGradients(dy, x, w, t, in, out);
#ifndef TENSOR_PARALLEL_TESTS_LAYERS_LAYER_REFERENCE_H_
#define TENSOR_PARALLEL_TESTS_LAYERS_LAYER_REFERENCE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace tp {
namespace ref {

using Vec = std::vector<double>;

// y[i][o] = sum_k x[i][k] * w[o][k] + b[o]; `b` may be empty (no bias).
inline Vec LinearForward(const Vec& x, const Vec& w, const Vec& b, int64_t t,
                         int64_t in, int64_t out) {
  Vec y(t * out, 0.0);
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t o = 0; o < out; ++o) {
      double s = b.empty() ? 0.0 : b[o];
      for (int64_t k = 0; k < in; ++k) s += x[i * in + k] * w[o * in + k];
      y[i * out + o] = s;
    }
  }
  return y;
}

struct LinearGrads {
  Vec dx;  // [t, in]
  Vec dw;  // [out, in]
  Vec db;  // [out]
};

// Gradients of LinearForward for the upstream gradient dy [t, out].
inline LinearGrads LinearGradients(const Vec& dy, const Vec& x, const Vec& w,
                                   int64_t t, int64_t in, int64_t out) {
  LinearGrads g;
  g.dx.assign(t * in, 0.0);
  g.dw.assign(out * in, 0.0);
  g.db.assign(out, 0.0);
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t o = 0; o < out; ++o) {
      const double d = dy[i * out + o];
      g.db[o] += d;
      for (int64_t k = 0; k < in; ++k) {
        g.dx[i * in + k] += d * w[o * in + k];
        g.dw[o * in + k] += d * x[i * in + k];
      }
    }
  }
  return g;
}

// Rows of table [v, h] for ids (each in [0, v)) -> [n, h].
inline Vec EmbeddingForward(const Vec& table, const std::vector<int64_t>& ids,
                            int64_t h) {
  Vec y;
  y.reserve(ids.size() * h);
  for (int64_t id : ids) {
    for (int64_t j = 0; j < h; ++j) y.push_back(table[id * h + j]);
  }
  return y;
}

// d table [v, h] for the upstream gradient dy [n, h].
inline Vec EmbeddingBackward(const Vec& dy, const std::vector<int64_t>& ids,
                             int64_t v, int64_t h) {
  Vec dt(v * h, 0.0);
  for (size_t i = 0; i < ids.size(); ++i) {
    for (int64_t j = 0; j < h; ++j) dt[ids[i] * h + j] += dy[i * h + j];
  }
  return dt;
}

// Mean over t tokens of -log softmax(z_i)[target_i], z [t, v].
inline double CrossEntropyForward(const Vec& z,
                                  const std::vector<int64_t>& target, int64_t t,
                                  int64_t v) {
  double total = 0.0;
  for (int64_t i = 0; i < t; ++i) {
    double m = z[i * v];
    for (int64_t j = 1; j < v; ++j) m = std::max(m, z[i * v + j]);
    double s = 0.0;
    for (int64_t j = 0; j < v; ++j) s += std::exp(z[i * v + j] - m);
    total += std::log(s) + m - z[i * v + target[i]];
  }
  return total / static_cast<double>(t);
}

// d(mean loss)/dz [t, v] = (softmax(z) - onehot(target)) / t.
inline Vec CrossEntropyBackward(const Vec& z,
                                const std::vector<int64_t>& target, int64_t t,
                                int64_t v) {
  Vec g(t * v, 0.0);
  for (int64_t i = 0; i < t; ++i) {
    double m = z[i * v];
    for (int64_t j = 1; j < v; ++j) m = std::max(m, z[i * v + j]);
    double s = 0.0;
    for (int64_t j = 0; j < v; ++j) s += std::exp(z[i * v + j] - m);
    for (int64_t j = 0; j < v; ++j) {
      g[i * v + j] = std::exp(z[i * v + j] - m) / s / static_cast<double>(t);
    }
    g[i * v + target[i]] -= 1.0 / static_cast<double>(t);
  }
  return g;
}

// Columns [c0, c0 + n) of a row-major [rows, cols] matrix.
inline Vec Columns(const Vec& m, int64_t rows, int64_t cols, int64_t c0,
                   int64_t n) {
  Vec out;
  out.reserve(rows * n);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = c0; c < c0 + n; ++c) out.push_back(m[r * cols + c]);
  }
  return out;
}

// Rows [r0, r0 + n) of a row-major [rows, cols] matrix.
inline Vec Rows(const Vec& m, int64_t cols, int64_t r0, int64_t n) {
  return Vec(m.begin() + r0 * cols, m.begin() + (r0 + n) * cols);
}

// max |a - b| / max(max |b|, floor): the relative error used by the tests.
inline double RelError(const Vec& a, const Vec& b, double floor = 1e-12) {
  if (a.size() != b.size()) return INFINITY;
  double num = 0.0, den = floor;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::fabs(a[i] - b[i]));
    den = std::max(den, std::fabs(b[i]));
  }
  return num / den;
}

}  // namespace ref
}  // namespace tp

#endif  // TENSOR_PARALLEL_TESTS_LAYERS_LAYER_REFERENCE_H_
