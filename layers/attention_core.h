// The attention arithmetic shared by ParallelSelfAttention (attention.h) and
// the decoder's Attention module (decoder.h): grouped-query, causal, scaled
// dot-product attention over one rank's heads, forward and backward, with
// keys and values of earlier positions (a KV cache) prepended.
//
// Layouts: per token [b, s, kv, n, d] (batch, sequence, key/value heads,
// query heads per key/value head, head dim); per head [b, kv, n * s, d]. The
// projections and the cache policy stay with the callers.
#ifndef TENSOR_PARALLEL_LAYERS_ATTENTION_CORE_H_
#define TENSOR_PARALLEL_LAYERS_ATTENTION_CORE_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "runtime/tensor.h"

namespace tp {
namespace attention_core {

// [b, s, kv, n, d] (any strides) -> contiguous [b, kv, n * s, d].
absl::StatusOr<Tensor> TokensToHeads(const Tensor& t);
// [b, kv, n * s, d] -> contiguous [b, s, kv, n, d].
absl::StatusOr<Tensor> HeadsToTokens(const Tensor& t, int64_t n);

// What Forward keeps for Backward (per-head layouts; q already scaled by
// 1 / sqrt(d); k and v of this call's tokens only; p the probabilities).
struct Saved {
  Tensor q, k, v, p;
};

struct ForwardResult {
  Tensor ctx;           // [b * s, kv * g * d]
  Tensor keys, values;  // [b, kv, past + s, d]: the past and this call's
  Saved saved;
};

// q: [b, s, kv, g, d]; k, v: [b, s, kv, 1, d]. past_keys / past_values:
// [b, kv, past, d], or undefined for none. Query position i (of s) attends to
// the past and to this call's positions up to i. kInvalidArgument (from the
// ops) for inconsistent shapes.
absl::StatusOr<ForwardResult> Forward(const Tensor& q, const Tensor& k,
                                      const Tensor& v, const Tensor& past_keys,
                                      const Tensor& past_values);

struct Grads {
  Tensor dq;      // [b, s, kv, g, d]
  Tensor dk, dv;  // [b, s, kv, 1, d]
};

// The gradients of a Forward without past keys, from the gradient of its ctx
// ([b * s, kv * g * d] or any shape with those elements).
absl::StatusOr<Grads> Backward(const Tensor& dctx, const Saved& saved);

}  // namespace attention_core
}  // namespace tp

#endif  // TENSOR_PARALLEL_LAYERS_ATTENTION_CORE_H_
