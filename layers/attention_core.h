// The attention arithmetic shared by ParallelSelfAttention (attention.h) and
// the decoder's Attention module (decoder.h): grouped-query, causal, scaled
// dot-product attention over one rank's heads, forward and backward, and a
// KV cache for generation.
//
// Layouts: per token [b, s, kv, n, d] (batch, sequence, key/value heads,
// query heads per key/value head, head dim); per head [b, kv, n * s, d]. The
// projections and the cache policy stay with the callers.
#ifndef TENSOR_PARALLEL_LAYERS_ATTENTION_CORE_H_
#define TENSOR_PARALLEL_LAYERS_ATTENTION_CORE_H_

#include <cstdint>
#include <memory>

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
// geometrically (capacity doubles from 16 positions, capped by the caller's
// limit, e.g. max_seq), so appending a token copies only its own keys and
// values (amortised), and attention reads the cached positions in place
// (ops::BatchMatMul on views; fp16/bf16 caches are converted to float32 for
// the product, which copies them per step). Appends never modify positions
// that a cache or a view returned by keys()/values() holds: a cache appends
// in place only while it owns the end of its buffers, otherwise (a second
// step from the same state, a truncated cache) it copies into new ones.
// Copying a KVCache copies its positions (a fork, e.g. for beam search);
// moving it is free and leaves the source empty. Not thread-safe.
//
// Example (one layer, prompt then one token at a time):
//   tp::KVCache cache;
//   ASSIGN_OR_RETURN(y, attn->Forward(prompt, {batch, prompt_len}, &cache));
//   ASSIGN_OR_RETURN(y, attn->Forward(next_token, {batch, 1}, &cache));
//   // cache.length() == prompt_len + 1
//   RETURN_IF_ERROR(cache.Truncate(prompt_len));  // drop the last token
class KVCache {
 public:
  KVCache() = default;
  KVCache(const KVCache& other);
  KVCache& operator=(const KVCache& other);
  KVCache(KVCache&& other) noexcept;
  KVCache& operator=(KVCache&& other) noexcept;

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
  // Keeps the first `length` positions (roll back rejected tokens or a
  // failed step). kInvalidArgument unless 0 <= length <= length().
  absl::Status Truncate(int64_t length);
  // Forgets every position and frees the buffers (start a new batch).
  void Clear() { *this = KVCache(); }

 private:
  friend struct KVCacheAccess;
  Tensor key_buffer_, value_buffer_;
  // Positions written into the buffers by any cache sharing them; a cache
  // may append in place only when *end_ == length_.
  std::shared_ptr<int64_t> end_;
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
  Tensor ctx;  // [b * s, kv * g * d]
  Saved saved;
};

// q: [b, s, kv, g, d]; k, v: [b, s, kv, 1, d]. Query position i attends to
// positions 0..i (causal). kInvalidArgument (from the ops) for inconsistent
// shapes.
absl::StatusOr<ForwardResult> Forward(const Tensor& q, const Tensor& k,
                                      const Tensor& v);

// OK when `cache` is empty or holds [b, kv, length, d] of `dtype`; else
// kInvalidArgument "KV cache holds ..., expected ...".
absl::Status CheckCache(const KVCache& cache, int64_t b, int64_t kv, int64_t d,
                        DType dtype);

// Forward with a KV cache (no Backward): k and v of this call are appended
// after the cache's positions, and query i of the call attends to every
// cached position and to the call's positions up to i. `cache` is not
// modified: the result's next_cache holds the appended positions (sharing
// buffers with `cache` when there is room), and the caller moves it into
// place once the rest of its step has succeeded. `max_positions` > 0 caps
// the buffers' growth (they still hold at least length + s). kInvalidArgument
// from CheckCache.
struct CachedResult {
  Tensor ctx;  // [b * s, kv * g * d]
  KVCache next_cache;
};
absl::StatusOr<CachedResult> ForwardCached(const Tensor& q, const Tensor& k,
                                           const Tensor& v,
                                           const KVCache& cache,
                                           int64_t max_positions = 0);

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
