// ParallelSelfAttention: causal multi-head self-attention with grouped-query
// attention (GQA), split over the tensor-parallel group by heads, with a KV
// cache for generation.
//
// Token layout. Activations are 2-D [tokens, hidden] with tokens ordered
// batch-major: row b * seq + s is position s of sequence b. A TokenLayout
// {batch, seq} says how the rows split; batch * seq must equal the number of
// rows (after the sequence-parallel all-gather, see below).
//
// Weights (names for checkpoints, full shapes as at TP = 1):
//   "qkv_proj.weight" [(heads + 2 kv_heads) * head_dim, hidden] column-parallel
//   "qkv_proj.bias"   [(heads + 2 kv_heads) * head_dim]          (with bias)
//   "o_proj.weight"   [hidden, heads * head_dim]                 row-parallel
//   "o_proj.bias"     [hidden]                                   replicated
// qkv_proj uses Megatron's grouped layout so that a contiguous row split is a
// split by heads: the rows form kv_heads groups of (g + 2) * head_dim rows,
// g = heads / kv_heads; group c holds query heads c*g .. c*g + g - 1, then
// key head c, then value head c. Rank r owns groups
// [r * kv_heads / tp, (r + 1) * kv_heads / tp), i.e. query heads
// [r * heads / tp, ...) and their key/value heads, so attention itself needs
// no communication: without sequence parallelism o_proj's all-reduce is the
// only collective forward and qkv_proj's input-gradient all-reduce the only
// one backward.
// Query head h attends with key/value head h / g (g == 1: multi-head
// attention; kv_heads == 1: multi-query attention).
//
// Computation per sequence and head: p = softmax_causal(q k^T /
// sqrt(head_dim)), o = p v; out = concat_heads(o) Wo^T + bo. There is no
// positional encoding inside the layer (add one to the input, e.g. a learned
// embedding).
//
// Sequence parallelism (options.sequence_parallel): the input and output are
// this rank's chunk of the rows, [tokens / tp, hidden] (rank r holds rows
// [r * tokens / tp, (r + 1) * tokens / tp) of the batch-major layout).
// qkv_proj all-gathers the input rows, o_proj reduce-scatters its output.
// batch * seq must divide by tp.
//
// KV cache (generation). Forward(x, layout, &cache) treats the rows of x as
// the next layout.seq positions of each of layout.batch sequences whose
// earlier cache.length() positions are in the cache: it appends this step's
// keys and values to the cache and lets query i of the step attend to every
// cached key and to the step's keys up to itself (ops::Softmax's causal
// offset convention). Feeding a prompt and then one token at a time gives,
// for every position, the output of one Forward over the whole sequence
// (within rounding). A cache belongs to one layer of one rank; a cached
// Forward does not prepare a Backward (Backward after it is
// kFailedPrecondition). KVCache (layers/attention_core.h) keeps its
// positions in buffers that double when full, so a step copies only its own
// keys and values, and attention reads the cached ones in place.
//
// Calling contract (as layers/linear.h): every rank calls Create, Forward
// and Backward in the same order with the same shapes; Backward needs a
// preceding uncached Forward and consumes its cache; gradients accumulate
// until ZeroGrad(). Not thread-safe; the communicator is borrowed.
// On error the weights are unchanged and so is the KV cache. A failed
// Backward may leave part of the gradients accumulated (o_proj's before
// qkv_proj's): ZeroGrad() before retrying the step. (After a failed
// collective the communicator itself is unusable; see communicator.h.)
//
// Errors (kInvalidArgument naming options.name and the values): heads not
// divisible by kv_heads, kv_heads (hence heads) not divisible by the
// tensor-parallel size, head_dim missing when hidden does not divide by
// heads, a non-positive size, a non-floating dtype; an input that is not
// [rows, hidden] of the layer's dtype, rows that disagree with the layout, a
// cache whose batch, dtype or shape does not fit; grad_out of the wrong shape.
//
// Example (GQA, 32 query heads sharing 8 key/value heads, TP = 4):
//   tp::ParallelSelfAttention::Options o;
//   o.hidden = 4096;  o.num_heads = 32;  o.num_kv_heads = 8;
//   o.name = "layers.0.attention";  o.seed = 1234;
//   ASSIGN_OR_RETURN(auto attn, tp::ParallelSelfAttention::Create(comm, o));
//   ASSIGN_OR_RETURN(tp::Tensor y, attn->Forward(x, {batch, seq}));
//   ASSIGN_OR_RETURN(tp::Tensor dx, attn->Backward(dy));
//   // Generation:
//   tp::KVCache cache;
//   ASSIGN_OR_RETURN(y, attn->Forward(prompt, {batch, prompt_len}, &cache));
//   ASSIGN_OR_RETURN(y, attn->Forward(next_token, {batch, 1}, &cache));
#ifndef TENSOR_PARALLEL_LAYERS_ATTENTION_H_
#define TENSOR_PARALLEL_LAYERS_ATTENTION_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "layers/attention_core.h"
#include "layers/linear.h"
#include "layers/parameter.h"
#include "runtime/dtype.h"
#include "runtime/tensor.h"

namespace tp {

// How the rows of a [tokens, hidden] activation split into sequences:
// row b * seq + s is position s of sequence b.
struct TokenLayout {
  int64_t batch = 1;  // sequences, >= 1
  int64_t seq = 1;    // positions per sequence (this step's, with a cache)
  int64_t tokens() const { return batch * seq; }
};

struct ParallelSelfAttentionOptions {
  // Model width (input and output features); > 0.
  int64_t hidden = 0;
  // Query heads; > 0, divisible by num_kv_heads and by the TP size.
  int64_t num_heads = 0;
  // Key/value heads (GQA); 0 means num_heads (multi-head attention). Must
  // divide num_heads and be divisible by the TP size.
  int64_t num_kv_heads = 0;
  // Features per head; 0 means hidden / num_heads (which must then divide).
  int64_t head_dim = 0;
  // Biases on qkv_proj and o_proj.
  bool bias = true;
  // Input and output are split along the rows (see the file comment).
  bool sequence_parallel = false;
  // Parameter dtype; inputs must have it. Any floating dtype.
  DType dtype = DType::kFloat32;
  // Weights are N(0, init_std^2), each full weight from its own seed
  // SeedFor(seed, name + ".qkv_proj.weight") etc., so the model does not
  // depend on the TP size. Biases start at 0.
  double init_std = 0.02;
  uint64_t seed = 0;
  // Prefix of error messages and of the init seeds.
  std::string name = "attention";
};

class ParallelSelfAttention {
 public:
  using Options = ParallelSelfAttentionOptions;

  // Builds this rank's heads; `comm` (the TP group) is borrowed and must
  // outlive the layer. kInvalidArgument for invalid options (file comment).
  // Does not communicate.
  static absl::StatusOr<std::unique_ptr<ParallelSelfAttention>> Create(
      Communicator& comm, Options options);

  // x: [layout.tokens(), hidden], or [layout.tokens() / tp, hidden] with
  // sequence_parallel. Returns the same shape. With `cache` (not owned),
  // attends to the cached positions too and appends this step's keys and
  // values (see the file comment); without, caches activations for Backward.
  absl::StatusOr<Tensor> Forward(const Tensor& x, const TokenLayout& layout,
                                 KVCache* cache = nullptr);

  // grad_out with Forward's output shape -> dL/dx (same shape as x).
  // Accumulates the gradients of all four parameters.
  absl::StatusOr<Tensor> Backward(const Tensor& grad_out);

  // "qkv_proj.weight", "qkv_proj.bias", "o_proj.weight", "o_proj.bias".
  std::vector<ParameterShard> parameters() const;
  std::vector<ParameterShard> grads() const;
  void ZeroGrad();

  const Options& options() const { return options_; }
  int64_t head_dim() const { return head_dim_; }
  int64_t local_heads() const { return local_heads_; }
  int64_t local_kv_heads() const { return local_kv_heads_; }
  ColumnParallelLinear& qkv_proj() { return *qkv_proj_; }
  RowParallelLinear& o_proj() { return *o_proj_; }

 private:
  ParallelSelfAttention(Communicator& comm, Options options)
      : comm_(comm), options_(std::move(options)) {}

  Communicator& comm_;
  Options options_;
  int64_t head_dim_ = 0;
  int64_t local_heads_ = 0;
  int64_t local_kv_heads_ = 0;
  std::unique_ptr<ColumnParallelLinear> qkv_proj_;
  std::unique_ptr<RowParallelLinear> o_proj_;
  // Saved by an uncached Forward for Backward.
  TokenLayout layout_;
  attention_core::Saved saved_;
  bool has_forward_ = false;
};

}  // namespace tp

#endif  // TENSOR_PARALLEL_LAYERS_ATTENTION_H_
