#include "runtime/ops.h"

#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/status_macros.h"

namespace tp {
namespace ops {
namespace {

// ---- descriptions and checks ----------------------------------------------

// "float32[2, 3]".
std::string Describe(const Tensor& t) {
  if (!t.defined()) return "undefined";
  return absl::StrCat(DTypeName(t.dtype()), ShapeToString(t.shape()));
}

absl::Status CheckUsable(absl::string_view op, absl::string_view name,
                         const Tensor& t) {
  if (!t.defined()) {
    return absl::InvalidArgumentError(
        absl::StrCat("ops::", op, ": ", name, " is an undefined tensor"));
  }
  if (!t.device().is_cpu()) {
    return absl::UnimplementedError(
        absl::StrCat("ops::", op, ": ", name, " is on ", t.device().ToString(),
                     "; these are the CPU ops"));
  }
  return absl::OkStatus();
}

absl::Status CheckFloat(absl::string_view op, absl::string_view name,
                        const Tensor& t) {
  RETURN_IF_ERROR(CheckUsable(op, name, t));
  if (!IsFloatingPoint(t.dtype())) {
    return absl::InvalidArgumentError(
        absl::StrCat("ops::", op, ": ", name, " must be a floating dtype, got ",
                     Describe(t)));
  }
  return absl::OkStatus();
}

absl::Status CheckSameDType(absl::string_view op, absl::string_view an,
                            const Tensor& a, absl::string_view bn,
                            const Tensor& b) {
  if (a.dtype() == b.dtype()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("ops::", op, ": dtypes differ: ", an, " is ", Describe(a),
                   ", ", bn, " is ", Describe(b)));
}

absl::Status CheckSameShape(absl::string_view op, absl::string_view an,
                            const Tensor& a, absl::string_view bn,
                            const Tensor& b) {
  if (a.shape() == b.shape()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("ops::", op, ": shapes differ: ", an, " is ", Describe(a),
                   ", ", bn, " is ", Describe(b)));
}

// Two floating tensors of the same shape and dtype.
absl::Status CheckPair(absl::string_view op, absl::string_view an,
                       const Tensor& a, absl::string_view bn, const Tensor& b) {
  RETURN_IF_ERROR(CheckFloat(op, an, a));
  RETURN_IF_ERROR(CheckFloat(op, bn, b));
  RETURN_IF_ERROR(CheckSameDType(op, an, a, bn, b));
  return CheckSameShape(op, an, a, bn, b);
}

// Normalises a possibly negative dimension; kInvalidArgument when out of range.
absl::StatusOr<int> NormDim(absl::string_view op, const Tensor& t, int dim) {
  const int nd = t.ndim();
  const int d = dim < 0 ? dim + nd : dim;
  if (d < 0 || d >= nd) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ops::", op, ": dim ", dim, " out of range for ", Describe(t)));
  }
  return d;
}

// ---- float compute helpers ------------------------------------------------

// Calls fn(C{}) with C = double for float64, float for the other float types.
template <typename Fn>
decltype(auto) WithComputeType(DType dtype, Fn&& fn) {
  if (dtype == DType::kFloat64) return fn(double{});
  return fn(float{});
}

// Converts n contiguous elements of dtype `src_dtype` to C.
template <typename C>
void LoadElements(const void* src, DType src_dtype, int64_t n, C* dst) {
  DispatchDType(src_dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* s = static_cast<const T*>(src);
    if constexpr (std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>) {
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<C>(ToFloat(s[i]));
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<C>(s[i]);
    }
  });
}

// Rounds n values of C into contiguous elements of floating `dst_dtype`.
template <typename C>
void StoreElements(const C* src, int64_t n, DType dst_dtype, void* dst) {
  switch (dst_dtype) {
    case DType::kFloat16: {
      Half* d = static_cast<Half*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = ToHalf(static_cast<float>(src[i]));
      return;
    }
    case DType::kBFloat16: {
      BFloat16* d = static_cast<BFloat16*>(dst);
      for (int64_t i = 0; i < n; ++i) {
        d[i] = ToBFloat16(static_cast<float>(src[i]));
      }
      return;
    }
    case DType::kFloat32: {
      float* d = static_cast<float*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(src[i]);
      return;
    }
    default: {
      double* d = static_cast<double*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<double>(src[i]);
      return;
    }
  }
}

// A floating tensor read as a contiguous array of C; no copy when the tensor
// already is contiguous C.
template <typename C>
class Input {
 public:
  explicit Input(const Tensor& t) : t_(t.Contiguous()) {
    if (t_.dtype() == DTypeOf<C>::value) {
      p_ = static_cast<const C*>(t_.raw_data());
    } else {
      buf_.resize(static_cast<size_t>(t_.numel()));
      LoadElements<C>(t_.raw_data(), t_.dtype(), t_.numel(), buf_.data());
      p_ = buf_.data();
    }
  }
  const C* data() const { return p_; }
  const C& operator[](int64_t i) const { return p_[i]; }

 private:
  Tensor t_;
  std::vector<C> buf_;
  const C* p_ = nullptr;
};

// A new contiguous tensor written as C; Finish() rounds into its dtype when
// that is not C.
template <typename C>
class Output {
 public:
  Output(Shape shape, DType dtype)
      : t_(Tensor::Empty(std::move(shape), dtype)) {
    if (dtype == DTypeOf<C>::value) {
      p_ = static_cast<C*>(t_.raw_data());
    } else {
      buf_.resize(static_cast<size_t>(t_.numel()));
      p_ = buf_.data();
    }
  }
  C* data() { return p_; }
  C& operator[](int64_t i) { return p_[i]; }
  int64_t numel() const { return t_.numel(); }
  Tensor Finish() {
    if (!buf_.empty()) {
      StoreElements<C>(buf_.data(), t_.numel(), t_.dtype(), t_.raw_data());
    }
    return t_;
  }

 private:
  Tensor t_;
  std::vector<C> buf_;
  C* p_ = nullptr;
};

// Element-wise loops of at least this many elements per thread are split
// over openblas_get_num_threads() threads: the threads the GEMMs use
// (tools/launch sets OPENBLAS_NUM_THREADS to cores / ranks per host). Every
// element is computed alone, so the result does not depend on the split.
constexpr int64_t kMinElementsPerThread = int64_t{1} << 16;

// Calls body(begin, end) over [0, n) in contiguous pieces, on this thread and
// up to openblas_get_num_threads() - 1 more. (OpenBLAS exposes no pool for
// other work, and Abseil has none; a thread per piece costs ~50 us against
// the >= 65,536 elements of each piece.)
template <typename Body>
void ParallelFor(int64_t n, Body body) {
  const int64_t wanted = std::min<int64_t>(
      std::max(1, openblas_get_num_threads()), n / kMinElementsPerThread);
  if (wanted <= 1) {
    body(int64_t{0}, n);
    return;
  }
  const int64_t piece = (n + wanted - 1) / wanted;
  std::vector<std::thread> helpers;
  helpers.reserve(static_cast<size_t>(wanted - 1));
  for (int64_t begin = piece; begin < n; begin += piece) {
    const int64_t end = std::min(n, begin + piece);
    try {
      helpers.emplace_back([=] { body(begin, end); });
    } catch (const std::system_error&) {
      body(begin, end);  // no thread to be had: do it here
    }
  }
  body(int64_t{0}, std::min(n, piece));
  for (std::thread& t : helpers) t.join();
}

// Element-wise map over same-shape inputs.
template <typename Fn>
absl::StatusOr<Tensor> Unary(const Tensor& x, Fn fn) {
  return WithComputeType(x.dtype(), [&](auto tag) -> absl::StatusOr<Tensor> {
    using C = decltype(tag);
    Input<C> in(x);
    Output<C> out(x.shape(), x.dtype());
    const int64_t n = x.numel();
    C* o = out.data();
    const C* p = in.data();
    ParallelFor(n, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = fn(p[i]);
    });
    return out.Finish();
  });
}

template <typename Fn>
absl::StatusOr<Tensor> Binary(const Tensor& a, const Tensor& b, Fn fn) {
  return WithComputeType(a.dtype(), [&](auto tag) -> absl::StatusOr<Tensor> {
    using C = decltype(tag);
    Input<C> ia(a);
    Input<C> ib(b);
    Output<C> out(a.shape(), a.dtype());
    const int64_t n = a.numel();
    C* o = out.data();
    const C* pa = ia.data();
    const C* pb = ib.data();
    ParallelFor(n, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = fn(pa[i], pb[i]);
    });
    return out.Finish();
  });
}

// Shape without its last dimension.
Shape LeadingShape(const Shape& s) { return Shape(s.begin(), s.end() - 1); }

// ---- GEMM -----------------------------------------------------------------

absl::Status CheckBlasInt(absl::string_view op, int64_t v,
                          absl::string_view what) {
  if (v > static_cast<int64_t>(INT_MAX)) {
    return absl::InvalidArgumentError(
        absl::StrCat("ops::", op, ": ", what, " = ", v,
                     " exceeds the BLAS integer range (", INT_MAX, ")"));
  }
  return absl::OkStatus();
}

// Row-major C[M,N] = alpha op(A) op(B) + beta C.
void Gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, double beta,
          float* c, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans,
              tb ? CblasTrans : CblasNoTrans, static_cast<int>(m),
              static_cast<int>(n), static_cast<int>(k),
              static_cast<float>(alpha), a, static_cast<int>(lda), b,
              static_cast<int>(ldb), static_cast<float>(beta), c,
              static_cast<int>(ldc));
}

void Gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb,
          double beta, double* c, int64_t ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans,
              tb ? CblasTrans : CblasNoTrans, static_cast<int>(m),
              static_cast<int>(n), static_cast<int>(k), alpha, a,
              static_cast<int>(lda), b, static_cast<int>(ldb), beta, c,
              static_cast<int>(ldc));
}

// A GEMM operand of rank >= 2: `batch` matrices [rows, cols] (the last two
// dims) at p + i * batch_stride with leading dimension ld; a 2-D tensor is a
// batch of one. Views whose last dim is unit-stride and whose batch dims
// collapse into one stride (a Narrow() of a matrix, or along dim -2 or -1
// of a KV-cache buffer) are used in place; anything else is made contiguous
// (and converted to C).
template <typename C>
class BatchMatrix {
 public:
  explicit BatchMatrix(const Tensor& t) {
    const int nd = t.ndim();
    const int64_t rows = t.dim(-2), cols = t.dim(-1);
    const std::vector<int64_t>& st = t.strides();
    bool direct = t.dtype() == DTypeOf<C>::value &&
                  (cols <= 1 || st[nd - 1] == 1) &&
                  (rows <= 1 || st[nd - 2] >= cols);
    // Batch dims of size > 1 must step by one stride: innermost first.
    int64_t stride = -1, span = 1;
    for (int d = nd - 3; direct && d >= 0; --d) {
      if (t.dim(d) == 1) continue;
      if (stride < 0) {
        stride = st[d];
      } else if (st[d] != stride * span) {
        direct = false;
      }
      span *= t.dim(d);
    }
    if (direct) {
      p_ = static_cast<const C*>(t.raw_data());
      ld_ = rows <= 1 ? std::max<int64_t>(cols, 1) : st[nd - 2];
      batch_stride_ = stride < 0 ? 0 : stride;
      return;
    }
    in_ = std::make_unique<Input<C>>(t);
    p_ = in_->data();
    ld_ = std::max<int64_t>(cols, 1);
    batch_stride_ = rows * cols;
  }
  const C* matrix(int64_t i) const { return p_ + i * batch_stride_; }
  int64_t ld() const { return ld_; }

 private:
  std::unique_ptr<Input<C>> in_;
  const C* p_ = nullptr;
  int64_t ld_ = 1;
  int64_t batch_stride_ = 0;
};

std::string TransNote(bool ta, bool tb) {
  if (ta && tb) return " (trans_a, trans_b)";
  if (ta) return " (trans_a)";
  if (tb) return " (trans_b)";
  return "";
}

absl::Status CheckGemmOperands(absl::string_view op, const Tensor& a,
                               const Tensor& b) {
  RETURN_IF_ERROR(CheckFloat(op, "a", a));
  RETURN_IF_ERROR(CheckFloat(op, "b", b));
  return CheckSameDType(op, "a", a, "b", b);
}

}  // namespace

// ---- matrix products -------------------------------------------------------

absl::StatusOr<Tensor> MatMul(const Tensor& a, const Tensor& b, bool trans_a,
                              bool trans_b) {
  RETURN_IF_ERROR(CheckGemmOperands("MatMul", a, b));
  if (a.ndim() < 2 || (trans_a && a.ndim() != 2) || b.ndim() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ops::MatMul: a ", Describe(a), " and b ", Describe(b),
        TransNote(trans_a, trans_b),
        ": a must be [..., M, K] (2-D with trans_a) and b 2-D; use "
        "BatchMatMul for batched b"));
  }
  const int64_t a_cols = a.dim(-1);
  const int64_t a_rows_exact = NumElements(LeadingShape(a.shape()));
  const int64_t m = trans_a ? a_cols : a_rows_exact;
  const int64_t k = trans_a ? a_rows_exact : a_cols;
  const int64_t kb = trans_b ? b.dim(1) : b.dim(0);
  const int64_t n = trans_b ? b.dim(0) : b.dim(1);
  if (k != kb) {
    return absl::InvalidArgumentError(
        absl::StrCat("ops::MatMul: a ", Describe(a), " and b ", Describe(b),
                     TransNote(trans_a, trans_b), " have inner dimensions ", k,
                     " and ", kb));
  }
  for (int64_t v : {m, n, k})
    RETURN_IF_ERROR(CheckBlasInt("MatMul", v, "a dimension"));
  Shape out_shape;
  if (trans_a) {
    out_shape = {m, n};
  } else {
    out_shape = LeadingShape(a.shape());
    out_shape.push_back(n);
  }
  if (m == 0 || n == 0 || k == 0) {
    return Tensor::Zeros(std::move(out_shape), a.dtype());
  }
  return WithComputeType(a.dtype(), [&](auto tag) -> absl::StatusOr<Tensor> {
    using C = decltype(tag);
    // Leading dimensions of a are flattened: view a as a 2-D [rows, cols].
    Tensor a2 = a;
    if (a.ndim() != 2) {
      ASSIGN_OR_RETURN(a2, a.Contiguous().Reshape({a_rows_exact, a_cols}));
    }
    BatchMatrix<C> ma(a2);
    BatchMatrix<C> mb(b);
    RETURN_IF_ERROR(CheckBlasInt("MatMul", ma.ld(), "lda"));
    RETURN_IF_ERROR(CheckBlasInt("MatMul", mb.ld(), "ldb"));
    Output<C> out(std::move(out_shape), a.dtype());
    Gemm(trans_a, trans_b, m, n, k, 1.0, ma.matrix(0), ma.ld(), mb.matrix(0),
         mb.ld(), 0.0, out.data(), n);
    return out.Finish();
  });
}

absl::Status MatMulInto(const Tensor& a, const Tensor& b, Tensor& c,
                        bool trans_a, bool trans_b, double alpha, double beta) {
  RETURN_IF_ERROR(CheckGemmOperands("MatMulInto", a, b));
  RETURN_IF_ERROR(CheckFloat("MatMulInto", "c", c));
  RETURN_IF_ERROR(CheckSameDType("MatMulInto", "a", a, "c", c));
  if (a.ndim() != 2 || b.ndim() != 2 || c.ndim() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("ops::MatMulInto: a ", Describe(a), ", b ", Describe(b),
                     ", c ", Describe(c), ": all must be 2-D"));
  }
  const int64_t m = trans_a ? a.dim(1) : a.dim(0);
  const int64_t k = trans_a ? a.dim(0) : a.dim(1);
  const int64_t kb = trans_b ? b.dim(1) : b.dim(0);
  const int64_t n = trans_b ? b.dim(0) : b.dim(1);
  if (k != kb) {
    return absl::InvalidArgumentError(
        absl::StrCat("ops::MatMulInto: a ", Describe(a), " and b ", Describe(b),
                     TransNote(trans_a, trans_b), " have inner dimensions ", k,
                     " and ", kb));
  }
  if (c.dim(0) != m || c.dim(1) != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("ops::MatMulInto: c is ", Describe(c), " but a ",
                     Describe(a), " and b ", Describe(b),
                     TransNote(trans_a, trans_b), " give [", m, ", ", n, "]"));
  }
  if (c.SharesStorageWith(a) || c.SharesStorageWith(b)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ops::MatMulInto: c ", Describe(c),
        " shares storage with an input; the result would overwrite it"));
  }
  if (m == 0 || n == 0) return absl::OkStatus();
  if (!(c.strides()[1] == 1 || n == 1) || (m > 1 && c.strides()[0] < n)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ops::MatMulInto: c ", Describe(c), " has strides [", c.strides()[0],
        ", ", c.strides()[1], "]; its last dimension must have unit stride"));
  }
  for (int64_t v : {m, n, k}) {
    RETURN_IF_ERROR(CheckBlasInt("MatMulInto", v, "a dimension"));
  }
  return WithComputeType(a.dtype(), [&](auto tag) -> absl::Status {
    using C = decltype(tag);
    const bool native = c.dtype() == DTypeOf<C>::value;
    // ldc: row stride of c, or n for a contiguous buffer / single row.
    int64_t ldc = m > 1 ? c.strides()[0] : n;
    RETURN_IF_ERROR(CheckBlasInt("MatMulInto", ldc, "ldc"));
    std::vector<C> cbuf;
    C* cp = nullptr;
    if (native) {
      cp = static_cast<C*>(c.raw_data());
    } else {
      // fp16/bf16: read c into float32 (only when beta needs it), compute,
      // and round back once.
      cbuf.assign(static_cast<size_t>(m * n), C{0});
      if (beta != 0.0) {
        Input<C> cin(c);
        std::copy(cin.data(), cin.data() + m * n, cbuf.begin());
      }
      cp = cbuf.data();
      ldc = n;
    }
    if (k == 0) {
      // BLAS may skip the update entirely; do alpha * 0 + beta * c by hand.
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          C& v = cp[i * ldc + j];
          v = beta == 0.0 ? C{0} : static_cast<C>(beta * v);
        }
      }
    } else {
      BatchMatrix<C> ma(a);
      BatchMatrix<C> mb(b);
      RETURN_IF_ERROR(CheckBlasInt("MatMulInto", ma.ld(), "lda"));
      RETURN_IF_ERROR(CheckBlasInt("MatMulInto", mb.ld(), "ldb"));
      Gemm(trans_a, trans_b, m, n, k, alpha, ma.matrix(0), ma.ld(),
           mb.matrix(0), mb.ld(), beta, cp, ldc);
    }
    if (!native) {
      Tensor rounded = Tensor::Empty({m, n}, c.dtype());
      StoreElements<C>(cbuf.data(), m * n, c.dtype(), rounded.raw_data());
      RETURN_IF_ERROR(c.CopyFrom(rounded));
    }
    return absl::OkStatus();
  });
}

absl::StatusOr<Tensor> BatchMatMul(const Tensor& a, const Tensor& b,
                                   bool trans_a, bool trans_b) {
  RETURN_IF_ERROR(CheckGemmOperands("BatchMatMul", a, b));
  const auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("ops::BatchMatMul: a ", Describe(a), " and b ",
                     Describe(b), TransNote(trans_a, trans_b), ": ", why));
  };
  if (a.ndim() < 3 || b.ndim() != a.ndim()) {
    return bad("both must have the same rank >= 3");
  }
  const int nd = a.ndim();
  for (int d = 0; d < nd - 2; ++d) {
    if (a.dim(d) != b.dim(d)) return bad("batch dimensions differ");
  }
  const int64_t m = trans_a ? a.dim(-1) : a.dim(-2);
  const int64_t k = trans_a ? a.dim(-2) : a.dim(-1);
  const int64_t kb = trans_b ? b.dim(-1) : b.dim(-2);
  const int64_t n = trans_b ? b.dim(-2) : b.dim(-1);
  if (k != kb) {
    return bad(absl::StrCat("inner dimensions ", k, " and ", kb, " differ"));
  }
  for (int64_t v : {m, n, k}) {
    RETURN_IF_ERROR(CheckBlasInt("BatchMatMul", v, "a dimension"));
  }
  Shape out_shape(a.shape().begin(), a.shape().end() - 2);
  const int64_t batch = NumElements(out_shape);
  out_shape.push_back(m);
  out_shape.push_back(n);
  if (m == 0 || n == 0 || k == 0 || batch == 0) {
    return Tensor::Zeros(std::move(out_shape), a.dtype());
  }
  return WithComputeType(a.dtype(), [&](auto tag) -> absl::StatusOr<Tensor> {
    using C = decltype(tag);
    BatchMatrix<C> ma(a);
    BatchMatrix<C> mb(b);
    RETURN_IF_ERROR(CheckBlasInt("BatchMatMul", ma.ld(), "lda"));
    RETURN_IF_ERROR(CheckBlasInt("BatchMatMul", mb.ld(), "ldb"));
    Output<C> out(std::move(out_shape), a.dtype());
    for (int64_t i = 0; i < batch; ++i) {
      Gemm(trans_a, trans_b, m, n, k, 1.0, ma.matrix(i), ma.ld(), mb.matrix(i),
           mb.ld(), 0.0, out.data() + i * m * n, n);
    }
    return out.Finish();
  });
}

// ---- element-wise -----------------------------------------------------------

absl::StatusOr<Tensor> Add(const Tensor& a, const Tensor& b) {
  RETURN_IF_ERROR(CheckPair("Add", "a", a, "b", b));
  return Binary(a, b, [](auto x, auto y) { return x + y; });
}

absl::StatusOr<Tensor> Sub(const Tensor& a, const Tensor& b) {
  RETURN_IF_ERROR(CheckPair("Sub", "a", a, "b", b));
  return Binary(a, b, [](auto x, auto y) { return x - y; });
}

absl::StatusOr<Tensor> Mul(const Tensor& a, const Tensor& b) {
  RETURN_IF_ERROR(CheckPair("Mul", "a", a, "b", b));
  return Binary(a, b, [](auto x, auto y) { return x * y; });
}

absl::StatusOr<Tensor> Scale(const Tensor& a, double s) {
  RETURN_IF_ERROR(CheckFloat("Scale", "a", a));
  return Unary(a, [s](auto x) {
    using C = decltype(x);
    return static_cast<C>(s) * x;
  });
}

absl::Status AddInPlace(Tensor& a, const Tensor& b) {
  RETURN_IF_ERROR(CheckPair("AddInPlace", "a", a, "b", b));
  if (a.is_contiguous() &&
      (a.dtype() == DType::kFloat32 || a.dtype() == DType::kFloat64)) {
    return WithComputeType(a.dtype(), [&](auto tag) -> absl::Status {
      using C = decltype(tag);
      Input<C> ib(b);
      C* pa = static_cast<C*>(a.raw_data());
      const C* pb = ib.data();
      const int64_t n = a.numel();
      for (int64_t i = 0; i < n; ++i) pa[i] += pb[i];
      return absl::OkStatus();
    });
  }
  ASSIGN_OR_RETURN(Tensor sum, Add(a, b));
  return a.CopyFrom(sum);
}

absl::StatusOr<Tensor> AddBias(const Tensor& x, const Tensor& bias) {
  RETURN_IF_ERROR(CheckFloat("AddBias", "x", x));
  RETURN_IF_ERROR(CheckFloat("AddBias", "bias", bias));
  RETURN_IF_ERROR(CheckSameDType("AddBias", "x", x, "bias", bias));
  if (x.ndim() < 1 || bias.ndim() != 1 || bias.dim(0) != x.dim(-1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("ops::AddBias: bias ", Describe(bias),
                     " must be 1-D of the last dimension of x ", Describe(x)));
  }
  return WithComputeType(x.dtype(), [&](auto tag) -> absl::StatusOr<Tensor> {
    using C = decltype(tag);
    Input<C> ix(x);
    Input<C> ib(bias);
    Output<C> out(x.shape(), x.dtype());
    const int64_t n = bias.dim(0);
    const int64_t rows = n == 0 ? 0 : x.numel() / n;
    for (int64_t r = 0; r < rows; ++r) {
      const C* xr = ix.data() + r * n;
      C* o = out.data() + r * n;
      for (int64_t j = 0; j < n; ++j) o[j] = xr[j] + ib[j];
    }
    return out.Finish();
  });
}

absl::StatusOr<Tensor> BiasGrad(const Tensor& grad) {
  RETURN_IF_ERROR(CheckFloat("BiasGrad", "grad", grad));
  if (grad.ndim() < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ops::BiasGrad: grad ", Describe(grad), " must have rank >= 1"));
  }
  return WithComputeType(grad.dtype(), [&](auto tag) -> absl::StatusOr<Tensor> {
    using C = decltype(tag);
    Input<C> ig(grad);
    const int64_t n = grad.dim(-1);
    const int64_t rows = NumElements(LeadingShape(grad.shape()));
    // Accumulate in double: rows can be large (batch * sequence).
    std::vector<double> acc(static_cast<size_t>(n), 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      const C* g = ig.data() + r * n;
      for (int64_t j = 0; j < n; ++j) acc[j] += g[j];
    }
    Output<C> out({n}, grad.dtype());
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<C>(acc[j]);
    return out.Finish();
  });
}

// ---- activations ------------------------------------------------------------

namespace {
constexpr double kSqrt2OverPi = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kGeLUCoeff = 0.044715;

template <typename C>
C Sigmoid(C x) {
  if (x >= 0) return C{1} / (C{1} + std::exp(-x));
  const C e = std::exp(x);
  return e / (C{1} + e);
}
}  // namespace

absl::StatusOr<Tensor> GeLU(const Tensor& x) {
  RETURN_IF_ERROR(CheckFloat("GeLU", "x", x));
  return Unary(x, [](auto v) {
    using C = decltype(v);
    const C u = static_cast<C>(kSqrt2OverPi) *
                (v + static_cast<C>(kGeLUCoeff) * v * v * v);
    return C{0.5} * v * (C{1} + std::tanh(u));
  });
}

absl::StatusOr<Tensor> GeLUBackward(const Tensor& grad, const Tensor& x) {
  RETURN_IF_ERROR(CheckPair("GeLUBackward", "grad", grad, "x", x));
  return Binary(grad, x, [](auto g, auto v) {
    using C = decltype(v);
    const C c = static_cast<C>(kSqrt2OverPi);
    const C a = static_cast<C>(kGeLUCoeff);
    const C t = std::tanh(c * (v + a * v * v * v));
    const C du = c * (C{1} + C{3} * a * v * v);
    return g * (C{0.5} * (C{1} + t) + C{0.5} * v * (C{1} - t * t) * du);
  });
}

absl::StatusOr<Tensor> SiLU(const Tensor& x) {
  RETURN_IF_ERROR(CheckFloat("SiLU", "x", x));
  return Unary(x, [](auto v) { return v * Sigmoid(v); });
}

absl::StatusOr<Tensor> SiLUBackward(const Tensor& grad, const Tensor& x) {
  RETURN_IF_ERROR(CheckPair("SiLUBackward", "grad", grad, "x", x));
  return Binary(grad, x, [](auto g, auto v) {
    using C = decltype(v);
    const C s = Sigmoid(v);
    return g * s * (C{1} + v * (C{1} - s));
  });
}

// ---- softmax
// ------------------------------------------------------------------

absl::StatusOr<Tensor> Softmax(const Tensor& x, bool causal) {
  RETURN_IF_ERROR(CheckFloat("Softmax", "x", x));
  if (x.ndim() < 1 || (causal && x.ndim() < 2)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ops::Softmax: x ", Describe(x),
        " must have rank >= ", causal ? "2 (causal: [..., Sq, Sk])" : "1"));
  }
  const int64_t sk = x.dim(-1);
  const int64_t sq = causal ? x.dim(-2) : 1;
  if (causal && sk < sq) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ops::Softmax: causal x ", Describe(x), " has fewer keys (", sk,
        ") than queries (", sq, "); the first queries would see no key"));
  }
  return WithComputeType(x.dtype(), [&](auto tag) -> absl::StatusOr<Tensor> {
    using C = decltype(tag);
    Input<C> ix(x);
    Output<C> out(x.shape(), x.dtype());
    const int64_t rows = sk == 0 ? 0 : x.numel() / sk;
    for (int64_t r = 0; r < rows; ++r) {
      const C* xr = ix.data() + r * sk;
      C* y = out.data() + r * sk;
      // Keys [0, visible) take part; the rest are masked to exactly 0.
      const int64_t visible = causal ? (r % sq) + (sk - sq) + 1 : sk;
      C mx = -std::numeric_limits<C>::infinity();
      for (int64_t j = 0; j < visible; ++j) mx = std::max(mx, xr[j]);
      C sum = 0;
      for (int64_t j = 0; j < visible; ++j) {
        y[j] = std::exp(xr[j] - mx);
        sum += y[j];
      }
      const C inv = C{1} / sum;
      for (int64_t j = 0; j < visible; ++j) y[j] *= inv;
      for (int64_t j = visible; j < sk; ++j) y[j] = 0;
    }
    return out.Finish();
  });
}

absl::StatusOr<Tensor> SoftmaxBackward(const Tensor& grad_y, const Tensor& y) {
  RETURN_IF_ERROR(CheckPair("SoftmaxBackward", "grad_y", grad_y, "y", y));
  if (y.ndim() < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ops::SoftmaxBackward: y ", Describe(y), " must have rank >= 1"));
  }
  return WithComputeType(y.dtype(), [&](auto tag) -> absl::StatusOr<Tensor> {
    using C = decltype(tag);
    Input<C> ig(grad_y);
    Input<C> iy(y);
    Output<C> out(y.shape(), y.dtype());
    const int64_t n = y.dim(-1);
    const int64_t rows = n == 0 ? 0 : y.numel() / n;
    for (int64_t r = 0; r < rows; ++r) {
      const C* g = ig.data() + r * n;
      const C* yr = iy.data() + r * n;
      C* dx = out.data() + r * n;
      double dot = 0;
      for (int64_t j = 0; j < n; ++j) dot += static_cast<double>(g[j]) * yr[j];
      const C d = static_cast<C>(dot);
      for (int64_t j = 0; j < n; ++j) dx[j] = yr[j] * (g[j] - d);
    }
    return out.Finish();
  });
}

// ---- normalisation
// ----------------------------------------------------------------

namespace {

DType StatsDType(DType x) {
  return x == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
}

absl::Status CheckNormParams(absl::string_view op, const Tensor& x,
                             const Tensor& gamma, const Tensor* beta,
                             double eps) {
  RETURN_IF_ERROR(CheckFloat(op, "x", x));
  RETURN_IF_ERROR(CheckFloat(op, "gamma", gamma));
  RETURN_IF_ERROR(CheckSameDType(op, "x", x, "gamma", gamma));
  if (x.ndim() < 1 || x.dim(-1) == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("ops::", op, ": x ", Describe(x),
                     " must have rank >= 1 and a non-empty last dimension"));
  }
  const Shape n = {x.dim(-1)};
  if (gamma.shape() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("ops::", op, ": gamma ", Describe(gamma), " must be ",
                     ShapeToString(n), " for x ", Describe(x)));
  }
  if (beta != nullptr) {
    RETURN_IF_ERROR(CheckFloat(op, "beta", *beta));
    RETURN_IF_ERROR(CheckSameDType(op, "x", x, "beta", *beta));
    if (beta->shape() != n) {
      return absl::InvalidArgumentError(
          absl::StrCat("ops::", op, ": beta ", Describe(*beta), " must be ",
                       ShapeToString(n), " for x ", Describe(x)));
    }
  }
  if (!(eps >= 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("ops::", op, ": eps must be >= 0, got ", eps));
  }
  return absl::OkStatus();
}

absl::Status CheckStats(absl::string_view op, absl::string_view name,
                        const Tensor& s, const Tensor& x) {
  RETURN_IF_ERROR(CheckUsable(op, name, s));
  const Shape want = LeadingShape(x.shape());
  const DType dt = StatsDType(x.dtype());
  if (s.shape() != want || s.dtype() != dt) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ops::", op, ": ", name, " is ", Describe(s), " but x ", Describe(x),
        " needs ", DTypeName(dt), ShapeToString(want)));
  }
  return absl::OkStatus();
}

// Shared forward: LayerNorm when `beta` is given (centred), else RMSNorm.
template <typename C>
NormOutput NormForward(const Tensor& x, const Tensor& gamma, const Tensor* beta,
                       double eps) {
  const int64_t n = x.dim(-1);
  const int64_t rows = x.numel() / n;
  Input<C> ix(x);
  Input<C> ig(gamma);
  std::unique_ptr<Input<C>> ib;
  if (beta != nullptr) ib = std::make_unique<Input<C>>(*beta);
  Output<C> y(x.shape(), x.dtype());
  const Shape stats_shape = LeadingShape(x.shape());
  Tensor mean_t;
  if (beta != nullptr)
    mean_t = Tensor::Empty(stats_shape, StatsDType(x.dtype()));
  Tensor rstd_t = Tensor::Empty(stats_shape, StatsDType(x.dtype()));
  C* mean_p = beta != nullptr ? static_cast<C*>(mean_t.raw_data()) : nullptr;
  C* rstd_p = static_cast<C*>(rstd_t.raw_data());
  for (int64_t r = 0; r < rows; ++r) {
    const C* xr = ix.data() + r * n;
    double mean = 0;
    if (beta != nullptr) {
      for (int64_t j = 0; j < n; ++j) mean += xr[j];
      mean /= static_cast<double>(n);
    }
    double ss = 0;  // sum of squared deviations (from 0 for RMSNorm)
    for (int64_t j = 0; j < n; ++j) {
      const double d = static_cast<double>(xr[j]) - mean;
      ss += d * d;
    }
    const double rstd = 1.0 / std::sqrt(ss / static_cast<double>(n) + eps);
    const C cm = static_cast<C>(mean);
    const C cr = static_cast<C>(rstd);
    if (mean_p != nullptr) mean_p[r] = cm;
    rstd_p[r] = cr;
    C* yr = y.data() + r * n;
    for (int64_t j = 0; j < n; ++j) {
      C v = (xr[j] - cm) * cr * ig[j];
      if (ib != nullptr) v += (*ib)[j];
      yr[j] = v;
    }
  }
  return NormOutput{y.Finish(), mean_t, rstd_t};
}

template <typename C>
NormGrads NormBackward(const Tensor& grad_y, const Tensor& x,
                       const Tensor& gamma, const Tensor* mean,
                       const Tensor& rstd) {
  const int64_t n = x.dim(-1);
  const int64_t rows = x.numel() / n;
  Input<C> igy(grad_y);
  Input<C> ix(x);
  Input<C> ig(gamma);
  std::unique_ptr<Input<C>> im;
  if (mean != nullptr) im = std::make_unique<Input<C>>(*mean);
  Input<C> ir(rstd);
  Output<C> dx(x.shape(), x.dtype());
  std::vector<double> dgamma(static_cast<size_t>(n), 0.0);
  std::vector<double> dbeta(static_cast<size_t>(n), 0.0);
  std::vector<double> xhat(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    const C* xr = ix.data() + r * n;
    const C* gy = igy.data() + r * n;
    const double m = im != nullptr ? static_cast<double>((*im)[r]) : 0.0;
    const double rs = ir[r];
    double sum_g = 0, sum_gx = 0;  // sums of g = gy * gamma and g * xhat
    for (int64_t j = 0; j < n; ++j) {
      xhat[j] = (static_cast<double>(xr[j]) - m) * rs;
      const double g = static_cast<double>(gy[j]) * ig[j];
      sum_g += g;
      sum_gx += g * xhat[j];
      dgamma[j] += static_cast<double>(gy[j]) * xhat[j];
      dbeta[j] += gy[j];
    }
    const double mean_g = im != nullptr ? sum_g / n : 0.0;
    const double mean_gx = sum_gx / n;
    C* d = dx.data() + r * n;
    for (int64_t j = 0; j < n; ++j) {
      const double g = static_cast<double>(gy[j]) * ig[j];
      d[j] = static_cast<C>(rs * (g - mean_g - xhat[j] * mean_gx));
    }
  }
  NormGrads out;
  out.dx = dx.Finish();
  Output<C> dg({n}, gamma.dtype());
  for (int64_t j = 0; j < n; ++j) dg[j] = static_cast<C>(dgamma[j]);
  out.dgamma = dg.Finish();
  if (mean != nullptr) {
    Output<C> db({n}, gamma.dtype());
    for (int64_t j = 0; j < n; ++j) db[j] = static_cast<C>(dbeta[j]);
    out.dbeta = db.Finish();
  }
  return out;
}

}  // namespace

absl::StatusOr<NormOutput> LayerNorm(const Tensor& x, const Tensor& gamma,
                                     const Tensor& beta, double eps) {
  RETURN_IF_ERROR(CheckNormParams("LayerNorm", x, gamma, &beta, eps));
  return WithComputeType(
      x.dtype(), [&](auto tag) -> absl::StatusOr<NormOutput> {
        return NormForward<decltype(tag)>(x, gamma, &beta, eps);
      });
}

absl::StatusOr<NormGrads> LayerNormBackward(const Tensor& grad_y,
                                            const Tensor& x,
                                            const Tensor& gamma,
                                            const Tensor& mean,
                                            const Tensor& rstd) {
  constexpr absl::string_view kOp = "LayerNormBackward";
  RETURN_IF_ERROR(CheckNormParams(kOp, x, gamma, nullptr, 0.0));
  RETURN_IF_ERROR(CheckPair(kOp, "grad_y", grad_y, "x", x));
  RETURN_IF_ERROR(CheckStats(kOp, "mean", mean, x));
  RETURN_IF_ERROR(CheckStats(kOp, "rstd", rstd, x));
  return WithComputeType(x.dtype(), [&](auto tag) -> absl::StatusOr<NormGrads> {
    return NormBackward<decltype(tag)>(grad_y, x, gamma, &mean, rstd);
  });
}

absl::StatusOr<NormOutput> RMSNorm(const Tensor& x, const Tensor& gamma,
                                   double eps) {
  RETURN_IF_ERROR(CheckNormParams("RMSNorm", x, gamma, nullptr, eps));
  return WithComputeType(
      x.dtype(), [&](auto tag) -> absl::StatusOr<NormOutput> {
        return NormForward<decltype(tag)>(x, gamma, nullptr, eps);
      });
}

absl::StatusOr<NormGrads> RMSNormBackward(const Tensor& grad_y, const Tensor& x,
                                          const Tensor& gamma,
                                          const Tensor& rstd) {
  constexpr absl::string_view kOp = "RMSNormBackward";
  RETURN_IF_ERROR(CheckNormParams(kOp, x, gamma, nullptr, 0.0));
  RETURN_IF_ERROR(CheckPair(kOp, "grad_y", grad_y, "x", x));
  RETURN_IF_ERROR(CheckStats(kOp, "rstd", rstd, x));
  return WithComputeType(x.dtype(), [&](auto tag) -> absl::StatusOr<NormGrads> {
    return NormBackward<decltype(tag)>(grad_y, x, gamma, nullptr, rstd);
  });
}

// ---- shape manipulation
// ----------------------------------------------------------

absl::StatusOr<Tensor> Concat(absl::Span<const Tensor> tensors, int dim) {
  if (tensors.empty()) {
    return absl::InvalidArgumentError("ops::Concat: no tensors to concatenate");
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    RETURN_IF_ERROR(
        CheckUsable("Concat", absl::StrCat("tensors[", i, "]"), tensors[i]));
  }
  const Tensor& first = tensors[0];
  ASSIGN_OR_RETURN(const int d, NormDim("Concat", first, dim));
  Shape out_shape = first.shape();
  out_shape[d] = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    bool ok = t.dtype() == first.dtype() && t.ndim() == first.ndim();
    for (int k = 0; ok && k < t.ndim(); ++k) {
      if (k != d && t.dim(k) != first.dim(k)) ok = false;
    }
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("ops::Concat: tensors[", i, "] is ", Describe(t),
                       " but tensors[0] is ", Describe(first), "; only dim ", d,
                       " may differ"));
    }
    out_shape[d] += t.dim(d);
  }
  Tensor out = Tensor::Empty(out_shape, first.dtype());
  int64_t offset = 0;
  for (const Tensor& t : tensors) {
    ASSIGN_OR_RETURN(Tensor slot, out.Narrow(d, offset, t.dim(d)));
    RETURN_IF_ERROR(slot.CopyFrom(t));
    offset += t.dim(d);
  }
  return out;
}

absl::StatusOr<std::vector<Tensor>> SplitSizes(const Tensor& t,
                                               absl::Span<const int64_t> sizes,
                                               int dim) {
  RETURN_IF_ERROR(CheckUsable("SplitSizes", "t", t));
  ASSIGN_OR_RETURN(const int d, NormDim("SplitSizes", t, dim));
  int64_t total = 0;
  for (int64_t s : sizes) {
    if (s < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ops::SplitSizes: negative size ", s, " splitting ", Describe(t)));
    }
    total += s;
  }
  if (total != t.dim(d)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ops::SplitSizes: sizes [", absl::StrJoin(sizes, ", "), "] sum to ",
        total, " but dim ", d, " of ", Describe(t), " is ", t.dim(d)));
  }
  std::vector<Tensor> parts;
  parts.reserve(sizes.size());
  int64_t offset = 0;
  for (int64_t s : sizes) {
    ASSIGN_OR_RETURN(Tensor view, t.Narrow(d, offset, s));
    parts.push_back(view.Clone());
    offset += s;
  }
  return parts;
}

absl::StatusOr<std::vector<Tensor>> Split(const Tensor& t, int parts, int dim) {
  RETURN_IF_ERROR(CheckUsable("Split", "t", t));
  ASSIGN_OR_RETURN(const int d, NormDim("Split", t, dim));
  if (parts < 1 || t.dim(d) % parts != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("ops::Split: dim ", d, " of ", Describe(t), " (", t.dim(d),
                     ") is not divisible into ", parts, " equal parts"));
  }
  return SplitSizes(t, std::vector<int64_t>(parts, t.dim(d) / parts), d);
}

absl::StatusOr<Tensor> Transpose(const Tensor& t, int d0, int d1) {
  RETURN_IF_ERROR(CheckUsable("Transpose", "t", t));
  ASSIGN_OR_RETURN(const int a, NormDim("Transpose", t, d0));
  ASSIGN_OR_RETURN(const int b, NormDim("Transpose", t, d1));
  Shape out_shape = t.shape();
  std::swap(out_shape[a], out_shape[b]);
  // Source strides permuted into the output's dimension order.
  std::vector<int64_t> src_strides = t.strides();
  std::swap(src_strides[a], src_strides[b]);
  Tensor out = Tensor::Empty(out_shape, t.dtype());
  const int64_t n = out.numel();
  if (n == 0) return out;
  const int nd = t.ndim();
  const char* src = static_cast<const char*>(t.raw_data());
  char* dst = static_cast<char*>(out.raw_data());
  if (nd == 0) {
    std::memcpy(dst, src, t.element_size());
    return out;
  }
  // Odometer over the output index; `soff` tracks the source offset.
  std::vector<int64_t> idx(nd, 0);
  int64_t soff = 0;
  const int64_t inner = out_shape[nd - 1];
  const int64_t inner_stride = src_strides[nd - 1];
  for (int64_t o = 0; o < n; o += inner) {
    DispatchDType(t.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const T* s = reinterpret_cast<const T*>(src) + soff;
      T* dd = reinterpret_cast<T*>(dst) + o;
      for (int64_t i = 0; i < inner; ++i) dd[i] = s[i * inner_stride];
    });
    for (int k = nd - 2; k >= 0; --k) {
      soff += src_strides[k];
      if (++idx[k] < out_shape[k]) break;
      soff -= src_strides[k] * out_shape[k];
      idx[k] = 0;
    }
  }
  return out;
}

// ---- embeddings
// --------------------------------------------------------------------

namespace {

// Reads the ids as int64 and checks each is in [0, vocab).
absl::StatusOr<std::vector<int64_t>> ReadIds(absl::string_view op,
                                             const Tensor& ids, int64_t vocab) {
  RETURN_IF_ERROR(CheckUsable(op, "ids", ids));
  if (ids.dtype() != DType::kInt32 && ids.dtype() != DType::kInt64) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ops::", op, ": ids must be int32 or int64, got ", Describe(ids)));
  }
  std::vector<int64_t> out(static_cast<size_t>(ids.numel()));
  Tensor c = ids.Contiguous();
  if (ids.dtype() == DType::kInt32) {
    const int32_t* p = static_cast<const int32_t*>(c.raw_data());
    for (size_t i = 0; i < out.size(); ++i) out[i] = p[i];
  } else {
    const int64_t* p = static_cast<const int64_t*>(c.raw_data());
    for (size_t i = 0; i < out.size(); ++i) out[i] = p[i];
  }
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i] < 0 || out[i] >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ops::", op, ": id ", out[i], " at flat position ", i, " of ids ",
          Describe(ids), " is outside the vocabulary [0, ", vocab, ")"));
    }
  }
  return out;
}

}  // namespace

absl::StatusOr<Tensor> Embedding(const Tensor& table, const Tensor& ids) {
  RETURN_IF_ERROR(CheckFloat("Embedding", "table", table));
  if (table.ndim() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ops::Embedding: table ", Describe(table), " must be 2-D [V, H]"));
  }
  ASSIGN_OR_RETURN(std::vector<int64_t> id,
                   ReadIds("Embedding", ids, table.dim(0)));
  const int64_t h = table.dim(1);
  Shape out_shape = ids.shape();
  out_shape.push_back(h);
  Tensor out = Tensor::Empty(out_shape, table.dtype());
  // Rows are read in place when they are contiguous (a Narrow() of a larger
  // table included), so a big table is never copied for a lookup.
  const Tensor tc = table.strides()[1] == 1 ? table : table.Contiguous();
  const size_t es = table.element_size();
  const size_t row_bytes = static_cast<size_t>(h) * es;
  const size_t row_stride = static_cast<size_t>(tc.strides()[0]) * es;
  const char* src = static_cast<const char*>(tc.raw_data());
  char* dst = static_cast<char*>(out.raw_data());
  if (row_bytes == 0) return out;
  for (size_t i = 0; i < id.size(); ++i) {
    std::memcpy(dst + i * row_bytes, src + id[i] * row_stride, row_bytes);
  }
  return out;
}

absl::StatusOr<Tensor> EmbeddingBackward(const Tensor& grad, const Tensor& ids,
                                         int64_t vocab) {
  RETURN_IF_ERROR(CheckFloat("EmbeddingBackward", "grad", grad));
  if (vocab < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ops::EmbeddingBackward: vocab must be >= 1, got ", vocab));
  }
  RETURN_IF_ERROR(CheckUsable("EmbeddingBackward", "ids", ids));
  if (grad.ndim() != ids.ndim() + 1 ||
      LeadingShape(grad.shape()) != ids.shape()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ops::EmbeddingBackward: grad ", Describe(grad), " must be ids' shape ",
        ShapeToString(ids.shape()), " plus [H]"));
  }
  ASSIGN_OR_RETURN(std::vector<int64_t> id,
                   ReadIds("EmbeddingBackward", ids, vocab));
  const int64_t h = grad.dim(-1);
  return WithComputeType(grad.dtype(), [&](auto tag) -> absl::StatusOr<Tensor> {
    using C = decltype(tag);
    Input<C> ig(grad);
    Output<C> out({vocab, h}, grad.dtype());
    std::fill(out.data(), out.data() + vocab * h, C{0});
    for (size_t i = 0; i < id.size(); ++i) {
      const C* g = ig.data() + i * h;
      C* row = out.data() + id[i] * h;
      for (int64_t j = 0; j < h; ++j) row[j] += g[j];
    }
    return out.Finish();
  });
}

// ---- conversion and reduction
// --------------------------------------------------------

namespace {

template <typename S>
long double SourceValue(S v) {
  if constexpr (std::is_same_v<S, Half> || std::is_same_v<S, BFloat16>) {
    return ToFloat(v);
  } else {
    return static_cast<long double>(v);
  }
}

template <typename D>
D ConvertTo(long double v) {
  if constexpr (std::is_same_v<D, Half>) {
    return ToHalf(RoundToOddFloat(v));
  } else if constexpr (std::is_same_v<D, BFloat16>) {
    return ToBFloat16(RoundToOddFloat(v));
  } else if constexpr (std::is_integral_v<D>) {
    if (std::isnan(v)) return D{0};
    const long double t = std::trunc(v);
    if (t <= static_cast<long double>(std::numeric_limits<D>::min())) {
      return std::numeric_limits<D>::min();
    }
    if (t >= static_cast<long double>(std::numeric_limits<D>::max())) {
      return std::numeric_limits<D>::max();
    }
    return static_cast<D>(t);
  } else {
    return static_cast<D>(v);  // long double -> float/double: one rounding.
  }
}

}  // namespace

absl::StatusOr<Tensor> Cast(const Tensor& t, DType dtype) {
  RETURN_IF_ERROR(CheckUsable("Cast", "t", t));
  Tensor src = t.Contiguous();
  if (dtype == t.dtype()) return src.SharesStorageWith(t) ? t.Clone() : src;
  Tensor out = Tensor::Empty(t.shape(), dtype);
  const int64_t n = t.numel();
  DispatchDType(t.dtype(), [&](auto stag) {
    using S = decltype(stag);
    const S* s = static_cast<const S*>(src.raw_data());
    DispatchDType(dtype, [&](auto dtag) {
      using D = decltype(dtag);
      D* d = static_cast<D*>(out.raw_data());
      for (int64_t i = 0; i < n; ++i) d[i] = ConvertTo<D>(SourceValue(s[i]));
    });
  });
  return out;
}

absl::StatusOr<double> Sum(const Tensor& t) {
  RETURN_IF_ERROR(CheckUsable("Sum", "t", t));
  const std::vector<double> v = t.ToDoubles();
  double sum = 0;
  for (double x : v) sum += x;
  return sum;
}

}  // namespace ops
}  // namespace tp
