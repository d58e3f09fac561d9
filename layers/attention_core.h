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

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/dtype.h"
#include "runtime/tensor.h"

namespace tp {

// Keys and values of the positions seen so far, for one attention layer on
// one rank (ParallelSelfAttention, the decoder's Attention). Create it
// empty; a Forward with the cache fills it.
//
// Storage: buffers [batch, local kv heads, capacity, head_dim] that grow
// geometrically (capacity doubles, starting at 16 positions), so appending
// a token copies only its own keys and values (amortised), and attention
// reads the cached positions in place (ops::BatchMatMul on views). Appends
// never modify positions already cached, so views returned by keys() and
// values() stay valid and unchanged. Copying a KVCache copies its positions
// (a fork, e.g. for beam search, must not share the space it appends into);
// moving it is free.
class KVCache {
 public:
  KVCache() = default;
  KVCache(const KVCache& other);
  KVCache& operator=(const KVCache& other);
  KVCache(KVCache&&) = default;
  KVCache& operator=(KVCache&&) = default;

  // Positions cached per sequence (0 when empty).
  int64_t length() const { return length_; }
  // Positions that fit before the buffers grow again (0 when empty).
  int64_t capacity() const {
    return key_buffer_.defined() ? key_buffer_.dim(2) : 0;
  }
  // [batch, local kv heads, length, head_dim] views (rope already applied to
  // the keys); undefined when empty.
  Tensor keys() const;
  Tensor values() const;
  // Forgets every position and frees the buffers (start a new batch).
  void Clear() { *this = KVCache(); }

 private:
  friend struct KVCacheAccess;
  Tensor key_buffer_, value_buffer_;
  int64_t length_ = 0;
};

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

// Forward with a KV cache: k and v of this call are appended after the
// cache's positions and every query attends to the cached positions and to
// this call's up to itself. `cache` is not modified: the result's
// `next_cache` holds the appended positions (it may share buffers with
// `cache`, writing only beyond cache.length()); the caller moves it into
// place once the rest of its step has succeeded. `saved` is left empty.
// kInvalidArgument when the cache holds another batch, head count, head dim
// or dtype.
// OK when `cache` is empty or holds [b, kv, length, d] of `dtype`; else
// kInvalidArgument "KV cache holds ..., expected ...".
absl::Status CheckCache(const KVCache& cache, int64_t b, int64_t kv, int64_t d,
                        DType dtype);

struct CachedResult {
  Tensor ctx;  // [b * s, kv * g * d]
  KVCache next_cache;
};
absl::StatusOr<CachedResult> ForwardCached(const Tensor& q, const Tensor& k,
                                           const Tensor& v,
                                           const KVCache& cache);

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
