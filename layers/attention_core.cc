#include "layers/attention_core.h"

#include <cmath>

#include "runtime/ops.h"
#include "runtime/status_macros.h"

namespace tp {
namespace attention_core {

absl::StatusOr<Tensor> TokensToHeads(const Tensor& t) {
  ASSIGN_OR_RETURN(Tensor a, ops::Transpose(t, 1, 2));  // [b, kv, s, n, d]
  ASSIGN_OR_RETURN(a, ops::Transpose(a, 2, 3));         // [b, kv, n, s, d]
  return a.Reshape({a.dim(0), a.dim(1), a.dim(2) * a.dim(3), a.dim(4)});
}

absl::StatusOr<Tensor> HeadsToTokens(const Tensor& t, int64_t n) {
  ASSIGN_OR_RETURN(Tensor a,
                   t.Reshape({t.dim(0), t.dim(1), n, t.dim(2) / n, t.dim(3)}));
  ASSIGN_OR_RETURN(a, ops::Transpose(a, 2, 3));  // [b, kv, s, n, d]
  return ops::Transpose(a, 1, 2);                // [b, s, kv, n, d]
}

absl::StatusOr<ForwardResult> Forward(const Tensor& q5, const Tensor& k5,
                                      const Tensor& v5, const Tensor& past_keys,
                                      const Tensor& past_values) {
  const int64_t b = q5.dim(0), s = q5.dim(1), kv = q5.dim(2), g = q5.dim(3),
                d = q5.dim(4);
  ForwardResult r;
  ASSIGN_OR_RETURN(Tensor q, TokensToHeads(q5));  // [b, kv, g s, d]
  ASSIGN_OR_RETURN(q, ops::Scale(q, 1.0 / std::sqrt(static_cast<double>(d))));
  ASSIGN_OR_RETURN(Tensor k, TokensToHeads(k5));  // [b, kv, s, d]
  ASSIGN_OR_RETURN(Tensor v, TokensToHeads(v5));
  r.keys = k;
  r.values = v;
  if (past_keys.defined() && past_keys.dim(2) > 0) {
    ASSIGN_OR_RETURN(r.keys, ops::Concat({past_keys, k}, 2));
    ASSIGN_OR_RETURN(r.values, ops::Concat({past_values, v}, 2));
  }
  const int64_t total = r.keys.dim(2);
  ASSIGN_OR_RETURN(Tensor scores, ops::BatchMatMul(q, r.keys, false, true));
  // [b, kv, g s, S] -> [b, kv, g, s, S]: the causal mask is per (s, S).
  ASSIGN_OR_RETURN(scores, scores.Reshape({b, kv, g, s, total}));
  ASSIGN_OR_RETURN(Tensor p, ops::Softmax(scores, /*causal=*/true));
  ASSIGN_OR_RETURN(p, p.Reshape({b, kv, g * s, total}));
  ASSIGN_OR_RETURN(Tensor ctx,
                   ops::BatchMatMul(p, r.values));  // [b, kv, g s, d]
  ASSIGN_OR_RETURN(ctx, HeadsToTokens(ctx, g));     // [b, s, kv, g, d]
  ASSIGN_OR_RETURN(r.ctx, ctx.Reshape({b * s, kv * g * d}));
  r.saved = Saved{q, k, v, p};
  return r;
}

absl::StatusOr<Grads> Backward(const Tensor& dctx_in, const Saved& saved) {
  const Tensor& k = saved.k;
  const int64_t b = k.dim(0), kv = k.dim(1), s = k.dim(2), d = k.dim(3);
  const int64_t g = saved.q.dim(2) / s;
  ASSIGN_OR_RETURN(Tensor dctx, dctx_in.Reshape({b, s, kv, g, d}));
  ASSIGN_OR_RETURN(dctx, TokensToHeads(dctx));  // [b, kv, g s, d]
  ASSIGN_OR_RETURN(Tensor dp, ops::BatchMatMul(dctx, saved.v, false, true));
  ASSIGN_OR_RETURN(Tensor dv, ops::BatchMatMul(saved.p, dctx, true, false));
  ASSIGN_OR_RETURN(Tensor ds, ops::SoftmaxBackward(dp, saved.p));
  ASSIGN_OR_RETURN(Tensor dq, ops::BatchMatMul(ds, k));
  ASSIGN_OR_RETURN(dq, ops::Scale(dq, 1.0 / std::sqrt(static_cast<double>(d))));
  ASSIGN_OR_RETURN(Tensor dk, ops::BatchMatMul(ds, saved.q, true, false));
  Grads grads;
  ASSIGN_OR_RETURN(grads.dq, HeadsToTokens(dq, g));  // [b, s, kv, g, d]
  ASSIGN_OR_RETURN(grads.dk, HeadsToTokens(dk, 1));  // [b, s, kv, 1, d]
  ASSIGN_OR_RETURN(grads.dv, HeadsToTokens(dv, 1));
  return grads;
}

}  // namespace attention_core
}  // namespace tp
