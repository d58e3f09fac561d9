#include "layers/attention_core.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/ops.h"
#include "runtime/status_macros.h"

namespace tp {

// ForwardCached's view of a KVCache.
struct KVCacheAccess {
  // Shallow: the result shares the buffers.
  static Tensor KeyBuffer(const KVCache& c) { return c.key_buffer_; }
  static Tensor ValueBuffer(const KVCache& c) { return c.value_buffer_; }
  // Whether `c` may append in place: it holds the end of its buffers.
  static bool OwnsEnd(const KVCache& c) {
    return c.end_ != nullptr && *c.end_ == c.length_;
  }
  // `c` takes the buffers of `from` (shared) and `length` positions; the
  // buffers' end moves to `length`.
  static void Extend(KVCache& c, const KVCache& from, int64_t length) {
    c.key_buffer_ = from.key_buffer_;
    c.value_buffer_ = from.value_buffer_;
    c.end_ = from.end_;
    *c.end_ = length;
    c.length_ = length;
  }
  // `c` takes new buffers holding `length` positions.
  static void Adopt(KVCache& c, Tensor keys, Tensor values, int64_t length) {
    c.key_buffer_ = std::move(keys);
    c.value_buffer_ = std::move(values);
    c.end_ = std::make_shared<int64_t>(length);
    c.length_ = length;
  }
};

namespace {

// The first `length` positions of a [b, kv, capacity, d] buffer.
Tensor Prefix(const Tensor& buffer, int64_t length) {
  if (!buffer.defined() || length == 0) return Tensor();
  absl::StatusOr<Tensor> view = buffer.Narrow(2, 0, length);
  return view.ok() ? *std::move(view) : Tensor();
}

}  // namespace

KVCache::KVCache(const KVCache& other) { *this = other; }

KVCache& KVCache::operator=(const KVCache& other) {
  if (this == &other) return *this;
  if (other.length_ == 0) {
    *this = KVCache();
    return *this;
  }
  // Only the cached positions are copied; the copy grows on its own.
  KVCacheAccess::Adopt(*this, other.keys().Clone(), other.values().Clone(),
                       other.length_);
  return *this;
}

KVCache::KVCache(KVCache&& other) noexcept { *this = std::move(other); }

KVCache& KVCache::operator=(KVCache&& other) noexcept {
  if (this == &other) return *this;
  key_buffer_ = std::move(other.key_buffer_);
  value_buffer_ = std::move(other.value_buffer_);
  end_ = std::move(other.end_);
  length_ = std::exchange(other.length_, 0);
  other.key_buffer_ = other.value_buffer_ = Tensor();
  other.end_.reset();
  return *this;
}

Tensor KVCache::keys() const { return Prefix(key_buffer_, length_); }
Tensor KVCache::values() const { return Prefix(value_buffer_, length_); }

absl::Status KVCache::Truncate(int64_t length) {
  if (length < 0 || length > length_) {
    return absl::InvalidArgumentError(absl::StrCat("KVCache::Truncate: length ",
                                                   length, " is outside [0, ",
                                                   length_, "]"));
  }
  if (length == 0) {
    Clear();
    return absl::OkStatus();
  }
  // The positions beyond stay in the buffers (other caches or views may hold
  // them); this cache no longer owns the end, so its next append copies.
  length_ = length;
  return absl::OkStatus();
}

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

namespace {

// q [b, kv, g s, d] (scaled) against keys/values [b, kv, S, d] (views
// allowed): ctx [b * s, kv g d] and the probabilities [b, kv, g s, S].
absl::Status Attend(const Tensor& q, const Tensor& keys, const Tensor& values,
                    int64_t s, int64_t g, Tensor& ctx_out, Tensor& p_out) {
  const int64_t b = q.dim(0), kv = q.dim(1), d = q.dim(3), total = keys.dim(2);
  ASSIGN_OR_RETURN(Tensor scores, ops::BatchMatMul(q, keys, false, true));
  // [b, kv, g s, S] -> [b, kv, g, s, S]: the causal mask is per (s, S).
  ASSIGN_OR_RETURN(scores, scores.Reshape({b, kv, g, s, total}));
  ASSIGN_OR_RETURN(Tensor p, ops::Softmax(scores, /*causal=*/true));
  ASSIGN_OR_RETURN(p, p.Reshape({b, kv, g * s, total}));
  ASSIGN_OR_RETURN(Tensor ctx, ops::BatchMatMul(p, values));  // [b, kv, g s, d]
  ASSIGN_OR_RETURN(ctx, HeadsToTokens(ctx, g));  // [b, s, kv, g, d]
  ASSIGN_OR_RETURN(ctx_out, ctx.Reshape({b * s, kv * g * d}));
  p_out = std::move(p);
  return absl::OkStatus();
}

absl::StatusOr<Tensor> ScaledQueryHeads(const Tensor& q5) {
  ASSIGN_OR_RETURN(Tensor q, TokensToHeads(q5));  // [b, kv, g s, d]
  return ops::Scale(q, 1.0 / std::sqrt(static_cast<double>(q5.dim(4))));
}

}  // namespace

absl::StatusOr<ForwardResult> Forward(const Tensor& q5, const Tensor& k5,
                                      const Tensor& v5) {
  const int64_t s = q5.dim(1), g = q5.dim(3);
  ForwardResult r;
  ASSIGN_OR_RETURN(Tensor q, ScaledQueryHeads(q5));
  ASSIGN_OR_RETURN(Tensor k, TokensToHeads(k5));  // [b, kv, s, d]
  ASSIGN_OR_RETURN(Tensor v, TokensToHeads(v5));
  Tensor p;
  RETURN_IF_ERROR(Attend(q, k, v, s, g, r.ctx, p));
  r.saved = Saved{q, k, v, p};
  return r;
}

absl::Status CheckCache(const KVCache& cache, int64_t b, int64_t kv, int64_t d,
                        DType dtype) {
  if (cache.length() == 0) return absl::OkStatus();
  const Tensor keys = cache.keys();
  if (keys.dim(0) != b || keys.dim(1) != kv || keys.dim(3) != d ||
      keys.dtype() != dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV cache holds ", ShapeToString(keys.shape()), " ",
        DTypeName(keys.dtype()), ", expected [", b, ", ", kv, ", length, ", d,
        "] ", DTypeName(dtype), " for batch ", b));
  }
  return absl::OkStatus();
}

absl::StatusOr<CachedResult> ForwardCached(const Tensor& q5, const Tensor& k5,
                                           const Tensor& v5,
                                           const KVCache& cache,
                                           int64_t max_positions) {
  const int64_t b = q5.dim(0), s = q5.dim(1), kv = q5.dim(2), g = q5.dim(3),
                d = q5.dim(4);
  const int64_t past = cache.length(), total = past + s;
  RETURN_IF_ERROR(CheckCache(cache, b, kv, d, q5.dtype()));
  ASSIGN_OR_RETURN(Tensor q, ScaledQueryHeads(q5));
  ASSIGN_OR_RETURN(Tensor k, TokensToHeads(k5));  // [b, kv, s, d]
  ASSIGN_OR_RETURN(Tensor v, TokensToHeads(v5));
  CachedResult r;
  if (total <= cache.capacity() && KVCacheAccess::OwnsEnd(cache)) {
    // Room at the end, and nobody else holds positions there.
    KVCacheAccess::Extend(r.next_cache, cache, total);
  } else {
    int64_t capacity = std::max<int64_t>(16, 2 * cache.capacity());
    while (capacity < total) capacity *= 2;
    if (max_positions > 0) {
      capacity = std::max(total, std::min(capacity, max_positions));
    }
    Tensor kb = Tensor::Empty({b, kv, capacity, d}, q5.dtype());
    Tensor vb = Tensor::Empty({b, kv, capacity, d}, q5.dtype());
    if (past > 0) {
      ASSIGN_OR_RETURN(Tensor kp, kb.Narrow(2, 0, past));
      ASSIGN_OR_RETURN(Tensor vp, vb.Narrow(2, 0, past));
      RETURN_IF_ERROR(kp.CopyFrom(cache.keys()));
      RETURN_IF_ERROR(vp.CopyFrom(cache.values()));
    }
    KVCacheAccess::Adopt(r.next_cache, std::move(kb), std::move(vb), total);
  }
  ASSIGN_OR_RETURN(Tensor knew,
                   KVCacheAccess::KeyBuffer(r.next_cache).Narrow(2, past, s));
  ASSIGN_OR_RETURN(Tensor vnew,
                   KVCacheAccess::ValueBuffer(r.next_cache).Narrow(2, past, s));
  RETURN_IF_ERROR(knew.CopyFrom(k));
  RETURN_IF_ERROR(vnew.CopyFrom(v));
  Tensor p;
  RETURN_IF_ERROR(
      Attend(q, r.next_cache.keys(), r.next_cache.values(), s, g, r.ctx, p));
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
