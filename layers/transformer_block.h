// TransformerBlock: a pre-norm decoder block with tensor-parallel attention
// and MLP, and optional sequence parallelism.
//
//   h = x + attention(input_norm(x))
//   y = h + mlp(post_attention_norm(h))
//
// Sub-layers and parameter names (prefixes of their own parameters()):
//   "input_norm."           Norm (replicated)
//   "attention."            ParallelSelfAttention (qkv_proj, o_proj)
//   "post_attention_norm."  Norm (replicated)
//   "mlp."                  ParallelMLP (up_proj or gate_up_proj, down_proj)
//
// Activations are [tokens, hidden] in the batch-major TokenLayout of
// layers/attention.h. Communication per block: two all-reduces forward (one
// in each row-parallel layer) and two backward (in each column-parallel
// layer's input gradient).
//
// Sequence parallelism (options.sequence_parallel, Megatron-LM's): between
// blocks, and through the norms and residual additions, each rank holds only
// its [tokens / tp, hidden] chunk of the rows (rank r: rows
// [r * tokens / tp, (r + 1) * tokens / tp)). Before each column-parallel
// layer the rows are all-gathered, after each row-parallel layer they are
// reduce-scattered instead of all-reduced; backward does the reverse. The
// communication volume is the same as without it, and norm/residual
// activation memory drops by tp. The norms' parameter gradients are
// all-reduced over the group so that every rank holds the full gradient. To
// enter and leave a sequence-parallel stack use the mappings of
// layers/mappings.h (e.g. ScatterToSequenceParallel after a replicated
// embedding, and a column-parallel head with sequence_parallel, or
// GatherFromSequenceParallel, at the end). Results equal the non-sequence-
// parallel block within rounding. tokens must divide by tp.
//
// Calling contract and errors: as layers/attention.h (every rank calls in
// the same order with the same shapes; Backward needs a preceding uncached
// Forward; gradients accumulate until ZeroGrad; not thread-safe;
// kInvalidArgument naming options.name and the values for sizes that do not
// divide by the TP size, a wrong input shape or dtype, a layout that does
// not match the rows). A failed Backward may leave part of the gradients
// accumulated; weights never change in Forward/Backward.
//
// Example (two blocks, TP group `comm`, x [batch * seq, 1024]):
//   tp::TransformerBlock::Options o;
//   o.hidden = 1024;  o.num_heads = 16;  o.ffn = 4096;
//   std::vector<std::unique_ptr<tp::TransformerBlock>> blocks;
//   for (int i = 0; i < 2; ++i) {
//     o.name = absl::StrCat("layers.", i);
//     ASSIGN_OR_RETURN(auto blk, tp::TransformerBlock::Create(comm, o));
//     blocks.push_back(std::move(blk));
//   }
//   tp::TokenLayout layout{batch, seq};
//   for (auto& blk : blocks) { ASSIGN_OR_RETURN(x, blk->Forward(x, layout)); }
//   ... loss, dx ...
//   for (int i = 1; i >= 0; --i) { ASSIGN_OR_RETURN(dx, blocks[i]->Backward(dx)); }
#ifndef TENSOR_PARALLEL_LAYERS_TRANSFORMER_BLOCK_H_
#define TENSOR_PARALLEL_LAYERS_TRANSFORMER_BLOCK_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "layers/attention.h"
#include "layers/mlp.h"
#include "layers/norm.h"
#include "layers/parameter.h"
#include "runtime/dtype.h"
#include "runtime/tensor.h"

namespace tp {

struct TransformerBlockOptions {
  // Model width; > 0.
  int64_t hidden = 0;
  // Attention heads (see ParallelSelfAttentionOptions): query heads, key/value
  // heads (0 = num_heads) and features per head (0 = hidden / num_heads).
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  // MLP intermediate width and activation.
  int64_t ffn = 0;
  MlpActivation activation = MlpActivation::kGeLU;
  // Norm kind and epsilon for both norms.
  NormKind norm = NormKind::kLayerNorm;
  double norm_eps = 1e-5;
  // Biases on every linear layer.
  bool bias = true;
  // Rows split over the TP group between and around the sub-layers.
  bool sequence_parallel = false;
  // Parameter dtype; inputs must have it.
  DType dtype = DType::kFloat32;
  // Linear weights N(0, init_std^2) seeded by name (SeedFor(seed, name +
  // ".attention.qkv_proj.weight"), ...); norms start at weight 1, bias 0.
  double init_std = 0.02;
  uint64_t seed = 0;
  // Prefix of error messages and init seeds, e.g. "layers.3".
  std::string name = "block";
};

class TransformerBlock {
 public:
  using Options = TransformerBlockOptions;

  // `comm` (the TP group) is borrowed and must outlive the block.
  // kInvalidArgument for invalid options of any sub-layer. No communication.
  static absl::StatusOr<std::unique_ptr<TransformerBlock>> Create(
      Communicator& comm, Options options);

  // x [layout.tokens(), hidden] ([layout.tokens() / tp, hidden] with
  // sequence_parallel) -> same shape. With `cache` (this block's attention
  // cache, not owned) attends to earlier positions as in
  // ParallelSelfAttention::Forward and prepares no Backward.
  absl::StatusOr<Tensor> Forward(const Tensor& x, const TokenLayout& layout,
                                 KVCache* cache = nullptr);
  // grad_out with Forward's output shape -> dL/dx; accumulates every
  // parameter's gradient.
  absl::StatusOr<Tensor> Backward(const Tensor& grad_out);

  std::vector<ParameterShard> parameters() const;
  std::vector<ParameterShard> grads() const;
  void ZeroGrad();

  const Options& options() const { return options_; }
  Norm& input_norm() { return *input_norm_; }
  ParallelSelfAttention& attention() { return *attention_; }
  Norm& post_attention_norm() { return *post_attention_norm_; }
  ParallelMLP& mlp() { return *mlp_; }

 private:
  explicit TransformerBlock(Options options) : options_(std::move(options)) {}

  Options options_;
  std::unique_ptr<Norm> input_norm_;
  std::unique_ptr<ParallelSelfAttention> attention_;
  std::unique_ptr<Norm> post_attention_norm_;
  std::unique_ptr<ParallelMLP> mlp_;
  bool has_forward_ = false;
};

}  // namespace tp

#endif  // TENSOR_PARALLEL_LAYERS_TRANSFORMER_BLOCK_H_
