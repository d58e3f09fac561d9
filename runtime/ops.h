// CPU tensor operations: matrix products (OpenBLAS cblas), element-wise
// arithmetic, activations, softmax, normalisations, shape manipulation and
// embeddings, each with the backward pass the parallel layers need.
//
// Conventions shared by every function in this file:
//  - Inputs are borrowed (`const Tensor&`) and may be non-contiguous views
//    (e.g. made by Narrow()); outputs are new, contiguous CPU tensors that own
//    their storage. No op keeps a reference to its inputs.
//  - Floating dtypes: kFloat32 and kFloat64 are computed natively; kFloat16
//    and kBFloat16 are converted to float32, computed in float32 (reductions
//    accumulate in float32 or wider) and rounded back to the input dtype with
//    round-to-nearest-even. The output dtype equals the input dtype unless the
//    function says otherwise. Integer dtypes are accepted only where a
//    function says so (ids in Embedding, Cast, Sum, Concat/Split/Transpose).
//  - Errors: an undefined tensor, a shape, rank or dtype mismatch, or a bad
//    dimension gives kInvalidArgument whose message names the op and the
//    offending shapes/dtypes, e.g.
//      "ops::Add: shapes differ: a is float32[2, 3], b is float32[3, 2]".
//    A tensor on a non-CPU device gives kUnimplemented. Nothing CHECK-fails
//    on user input.
//  - Dimensions (`dim`, `d0`, `d1`) may be negative, counting from the end.
//  - Thread safety: functions may be called from several threads at once
//    (tests/runtime/ops_test.cc runs concurrent MatMuls); they only read
//    their inputs, except the `...Into`/`...InPlace` forms, which write their
//    first tensor argument, so that storage must not be used by a concurrent
//    caller. GEMMs run on OpenBLAS's own thread pool.
//
// Example:
//   ASSIGN_OR_RETURN(Tensor h, tp::ops::MatMul(x, w1, false, /*trans_b=*/true));
//   ASSIGN_OR_RETURN(h, tp::ops::AddBias(h, b1));
//   ASSIGN_OR_RETURN(Tensor a, tp::ops::GeLU(h));
//   // Backward through the activation:
//   ASSIGN_OR_RETURN(Tensor dh, tp::ops::GeLUBackward(da, h));
//   ASSIGN_OR_RETURN(Tensor db1, tp::ops::BiasGrad(dh));
#ifndef TENSOR_PARALLEL_RUNTIME_OPS_H_
#define TENSOR_PARALLEL_RUNTIME_OPS_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "runtime/dtype.h"
#include "runtime/tensor.h"

namespace tp {
namespace ops {

// ---------------------------------------------------------------------------
// Matrix products (cblas_sgemm / cblas_dgemm).
// ---------------------------------------------------------------------------

// op(a) @ op(b), where op(x) is x or its transpose.
//  - a: [..., M, K] (or, with trans_a, a 2-D [K, M]). Leading dimensions of
//    `a` are flattened into M, so a [batch, seq, K] activation multiplies a
//    [K, N] weight in one GEMM and gives [batch, seq, N].
//  - b: 2-D [K, N], or [N, K] with trans_b (the usual [out, in] weight).
// Returns [..., M, N] with a's dtype. a and b must share a floating dtype.
// kInvalidArgument: a of rank < 2 (or rank != 2 with trans_a), b not 2-D
// (use BatchMatMul), inner dimensions that differ, dtypes that differ or are
// not floating. The message names both shapes and the transposes, e.g.
// "ops::MatMul: a float32[4, 3] and b float32[5, 2] (trans_b) have inner
// dimensions 3 and 2".
//
// Example:
//   // y = x W^T for x [B, S, in], W [out, in]:
//   ASSIGN_OR_RETURN(Tensor y, ops::MatMul(x, w, false, /*trans_b=*/true));
absl::StatusOr<Tensor> MatMul(const Tensor& a, const Tensor& b,
                              bool trans_a = false, bool trans_b = false);

// c = alpha * op(a) @ op(b) + beta * c, written into `c` in place (beta = 1
// accumulates, e.g. a weight gradient over micro-batches). a, b and c are
// 2-D; c is [M, N] with the dtype of a and b. `c` may be a view whose last
// dimension has unit stride (a contiguous tensor, or a Narrow() of one along
// dim 0 or 1), so a result can be written straight into a slice of a larger
// buffer; other layouts give kInvalidArgument. With beta = 0 the previous
// contents of c are ignored (NaN in c does not propagate). fp16/bf16 c is
// read, updated in float32 and rounded back once.
// kInvalidArgument: ranks, inner dimensions, c's shape, dtypes (all named);
// c sharing storage with a or b.
//
// Example:
//   // dW += dY^T X, for dY [T, out], X [T, in], dW [out, in]:
//   RETURN_IF_ERROR(ops::MatMulInto(dy, x, dw, /*trans_a=*/true, false,
//                                   1.0, /*beta=*/1.0));
absl::Status MatMulInto(const Tensor& a, const Tensor& b, Tensor& c,
                        bool trans_a = false, bool trans_b = false,
                        double alpha = 1.0, double beta = 0.0);

// Batched product for attention: a [..., M, K] (or [..., K, M] with
// trans_a), b [..., K, N] (or [..., N, K] with trans_b), rank >= 3, with
// identical leading (batch) dimensions. Returns [..., M, N]. Views (e.g. the
// first L positions of a KV-cache buffer [B, H, capacity, D]) are read in
// place, without a copy, when their last dim is unit-stride and their batch
// dims step evenly.
// kInvalidArgument: rank < 3, ranks or batch dimensions that differ, inner
// dimensions that differ, dtypes.
//
// Example:
//   // scores = Q K^T for Q, K [B, H, S, D]:
//   ASSIGN_OR_RETURN(Tensor s, ops::BatchMatMul(q, k, false, true));
absl::StatusOr<Tensor> BatchMatMul(const Tensor& a, const Tensor& b,
                                   bool trans_a = false, bool trans_b = false);

// ---------------------------------------------------------------------------
// Element-wise arithmetic. Operands have the same shape and dtype (no
// broadcasting; use AddBias for the bias case). kInvalidArgument names both.
// ---------------------------------------------------------------------------

absl::StatusOr<Tensor> Add(const Tensor& a, const Tensor& b);  // a + b
absl::StatusOr<Tensor> Sub(const Tensor& a, const Tensor& b);  // a - b
absl::StatusOr<Tensor> Mul(const Tensor& a, const Tensor& b);  // a * b
// s * a, with s converted to the compute type (float or double).
absl::StatusOr<Tensor> Scale(const Tensor& a, double s);
// a += b in place (a may be a view; its storage is written). Same shape and
// dtype required.
absl::Status AddInPlace(Tensor& a, const Tensor& b);

// x [..., N] + bias [N], the bias broadcast over the leading dimensions.
// kInvalidArgument when bias is not 1-D of x's last dimension or dtypes
// differ.
absl::StatusOr<Tensor> AddBias(const Tensor& x, const Tensor& bias);
// Gradient of AddBias with respect to the bias: grad [..., N] summed over
// every leading dimension -> [N]. kInvalidArgument for rank 0.
absl::StatusOr<Tensor> BiasGrad(const Tensor& grad);

// ---------------------------------------------------------------------------
// Activations. Backward forms take the upstream gradient and the forward
// INPUT x (same shape and dtype) and return dL/dx.
// ---------------------------------------------------------------------------

// GeLU, tanh approximation:
//   0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
absl::StatusOr<Tensor> GeLU(const Tensor& x);
absl::StatusOr<Tensor> GeLUBackward(const Tensor& grad, const Tensor& x);
// SiLU (swish): x * sigmoid(x).
absl::StatusOr<Tensor> SiLU(const Tensor& x);
absl::StatusOr<Tensor> SiLUBackward(const Tensor& grad, const Tensor& x);

// ---------------------------------------------------------------------------
// Softmax over the last dimension (numerically stable: max subtracted).
// ---------------------------------------------------------------------------

// With `causal`, x is [..., Sq, Sk] and query row i may attend to key j only
// when j <= i + (Sk - Sq) (the KV-cache convention: the Sq queries are the
// last Sq positions of the Sk keys); masked entries of the result are exactly
// 0. kInvalidArgument: rank 0; with causal, rank < 2 or Sk < Sq (a query
// would see no key at all).
//
// Example:
//   ASSIGN_OR_RETURN(Tensor p, ops::Softmax(scores, /*causal=*/true));
absl::StatusOr<Tensor> Softmax(const Tensor& x, bool causal = false);
// dL/dx from the upstream gradient and the forward OUTPUT y:
//   dx = y * (grad_y - sum_last(grad_y * y)).
// Valid for causal softmax too (masked y are 0, so their dx is 0).
absl::StatusOr<Tensor> SoftmaxBackward(const Tensor& grad_y, const Tensor& y);

// ---------------------------------------------------------------------------
// Normalisation over the last dimension.
// ---------------------------------------------------------------------------

// Forward results. `mean` and `rstd` (1 / sqrt(var + eps), or for RMSNorm
// 1 / sqrt(mean(x^2) + eps)) have x's shape without the last dimension and
// are float64 for float64 input, float32 otherwise; they are saved for the
// backward pass. RMSNorm leaves `mean` undefined.
struct NormOutput {
  Tensor y;
  Tensor mean;
  Tensor rstd;
};

// Gradients. dgamma and dbeta are [N] with gamma's dtype; RMSNorm leaves
// `dbeta` undefined.
struct NormGrads {
  Tensor dx;
  Tensor dgamma;
  Tensor dbeta;
};

// y = (x - mean) * rstd * gamma + beta, biased variance. x [..., N],
// gamma and beta [N] with x's dtype. kInvalidArgument: rank 0, N == 0,
// gamma/beta shape or dtype, eps < 0.
absl::StatusOr<NormOutput> LayerNorm(const Tensor& x, const Tensor& gamma,
                                     const Tensor& beta, double eps = 1e-5);
// Gradients of LayerNorm from the saved mean and rstd (as returned by
// LayerNorm for this x). kInvalidArgument on any shape or dtype mismatch.
absl::StatusOr<NormGrads> LayerNormBackward(const Tensor& grad_y,
                                            const Tensor& x,
                                            const Tensor& gamma,
                                            const Tensor& mean,
                                            const Tensor& rstd);

// y = x * rstd * gamma with rstd = 1 / sqrt(mean(x^2) + eps).
absl::StatusOr<NormOutput> RMSNorm(const Tensor& x, const Tensor& gamma,
                                   double eps = 1e-6);
absl::StatusOr<NormGrads> RMSNormBackward(const Tensor& grad_y,
                                          const Tensor& x,
                                          const Tensor& gamma,
                                          const Tensor& rstd);

// ---------------------------------------------------------------------------
// Shape manipulation (any dtype, integers included). Results are contiguous
// copies, never views.
// ---------------------------------------------------------------------------

// Joins `tensors` along `dim`. All must have the same rank, dtype and every
// dimension but `dim`. kInvalidArgument: empty list, mismatch (naming the
// index and shape of the first offending tensor), dim out of range.
//
// Example:
//   ASSIGN_OR_RETURN(Tensor full, ops::Concat({shard0, shard1}, /*dim=*/0));
absl::StatusOr<Tensor> Concat(absl::Span<const Tensor> tensors, int dim);
// `parts` equal pieces along `dim`. kInvalidArgument when parts < 1 or the
// dimension is not divisible by parts.
absl::StatusOr<std::vector<Tensor>> Split(const Tensor& t, int parts, int dim);
// Pieces of the given sizes along `dim`. kInvalidArgument when a size is
// negative or the sizes do not sum to the dimension.
absl::StatusOr<std::vector<Tensor>> SplitSizes(const Tensor& t,
                                               absl::Span<const int64_t> sizes,
                                               int dim);
// Swaps dimensions d0 and d1, materialised (contiguous).
absl::StatusOr<Tensor> Transpose(const Tensor& t, int d0, int d1);

// ---------------------------------------------------------------------------
// Embeddings.
// ---------------------------------------------------------------------------

// Row lookup: table [V, H] (floating), ids int32/int64 of any shape [...]
// -> [..., H] with the table's dtype. kInvalidArgument: table not 2-D, ids
// not an integer dtype, an id outside [0, V) (the message names the id and
// its position).
absl::StatusOr<Tensor> Embedding(const Tensor& table, const Tensor& ids);
// Gradient of Embedding: grad [..., H] scatter-added into a zero [vocab, H]
// tensor (repeated ids accumulate; fp16/bf16 accumulate in float32).
// kInvalidArgument: grad's leading shape differs from ids' shape, vocab < 1,
// an id outside [0, vocab).
absl::StatusOr<Tensor> EmbeddingBackward(const Tensor& grad, const Tensor& ids,
                                         int64_t vocab);

// ---------------------------------------------------------------------------
// Conversion and reduction.
// ---------------------------------------------------------------------------

// A contiguous copy (never a view, even for the same dtype) converted to
// `dtype`, any dtype to any: to a float type the value is rounded once to
// nearest even (float64 -> float16 is correctly rounded, no double
// rounding); float -> integer truncates toward zero, NaN gives 0 and values
// out of range saturate to the integer type's limits.
absl::StatusOr<Tensor> Cast(const Tensor& t, DType dtype);
// Sum of every element, accumulated in double (for losses and tests).
// 0 for an empty tensor.
absl::StatusOr<double> Sum(const Tensor& t);

}  // namespace ops
}  // namespace tp

#endif  // TENSOR_PARALLEL_RUNTIME_OPS_H_
