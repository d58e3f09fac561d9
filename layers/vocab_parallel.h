// Vocabulary-parallel embedding and cross-entropy (Megatron-LM's
// VocabParallelEmbedding and vocab_parallel_cross_entropy).
//
// The vocabulary of V tokens is split in rank order: rank r owns token ids
// [r * V/tp, (r + 1) * V/tp).
//   * VocabParallelEmbedding holds rows [r * V/tp, ...) of the [V, H] table.
//     Forward looks up the ids this rank owns, writes zeros for the others
//     and all-reduces, so every rank gets the full [..., H] embedding.
//     Backward scatter-adds the gradient rows of the owned ids into the
//     local table gradient (no communication).
//   * VocabParallelCrossEntropy takes each rank's logits [T, V/tp] (e.g. the
//     output of a ColumnParallelLinear LM head without gather_output) and the
//     targets [T], and returns the mean loss over the T tokens, identical on
//     every rank. The row max and the sum of exponentials are all-reduced
//     (max, then one sum for the exp-sum and the target logit together); the
//     full [T, V] logits are never gathered. Backward returns the gradient of
//     the local logits, softmax - onehot(target), scaled by 1/T.
//
// Token ids are int32 or int64. An id outside [0, V) is kInvalidArgument
// naming the id and its position, detected on every rank before any
// communication (every rank sees the same ids, so all fail together).
//
// Calling contract, failure atomicity and errors as in layers/linear.h:
// every rank calls in the same order with the same shapes; Forward caches
// what Backward needs; on error nothing (table, gradient, cache) changes.
//
// Example (input embedding and LM loss, tokens [T] int64, targets [T]):
//   tp::VocabParallelEmbedding::Options eo;
//   eo.vocab_size = 32000;  eo.hidden_size = 1024;
//   eo.init = tp::InitSpec::Normal(0, 0.02, tp::SeedFor(seed, "embed"));
//   ASSIGN_OR_RETURN(auto embed, tp::VocabParallelEmbedding::Create(comm, eo));
//   ASSIGN_OR_RETURN(tp::Tensor h, embed->Forward(tokens));   // [T, 1024]
//   ... logits_local [T, 32000 / tp] from a column-parallel head ...
//   tp::VocabParallelCrossEntropy loss_fn(comm);
//   ASSIGN_OR_RETURN(double loss, loss_fn.Forward(logits_local, targets));
//   ASSIGN_OR_RETURN(tp::Tensor dlogits, loss_fn.Backward());
#ifndef TENSOR_PARALLEL_LAYERS_VOCAB_PARALLEL_H_
#define TENSOR_PARALLEL_LAYERS_VOCAB_PARALLEL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "layers/parameter.h"
#include "runtime/dtype.h"
#include "runtime/init.h"
#include "runtime/tensor.h"

namespace tp {

struct VocabParallelEmbeddingOptions {
  // Full vocabulary size V; > 0 and divisible by the TP size.
  int64_t vocab_size = 0;
  // Embedding width H; > 0.
  int64_t hidden_size = 0;
  // Table dtype (any floating dtype); the output has it.
  DType dtype = DType::kFloat32;
  // true: reduce-scatter the output along dim 0 of ids instead of
  // all-reducing it (output [n / tp, ..., H], sequence parallel); Backward
  // then all-gathers grad_out along dim 0.
  bool sequence_parallel = false;
  // Initialisation of the FULL [V, H] table. Default N(0, 0.02), seed 0.
  InitSpec init = InitSpec::Normal(0.0, 0.02, 0);
  // Name used in error messages.
  std::string name = "VocabParallelEmbedding";
};

class VocabParallelEmbedding {
 public:
  using Options = VocabParallelEmbeddingOptions;

  // Builds this rank's [V/tp, H] shard; `comm` is borrowed and must outlive
  // the layer. kInvalidArgument (naming the layer and values): sizes <= 0,
  // vocab_size not divisible by comm.size(), a non-floating dtype, an
  // invalid init spec.
  static absl::StatusOr<std::unique_ptr<VocabParallelEmbedding>> Create(
      Communicator& comm, Options options);

  // ids: int32/int64 of any shape [...] (rank >= 1 with sequence_parallel);
  // returns [..., H] (dim 0 divided by tp with sequence_parallel).
  // kInvalidArgument: a non-integer dtype, an id outside [0, V).
  absl::StatusOr<Tensor> Forward(const Tensor& ids);

  // grad_out: gradient of Forward's result (same shape). Accumulates into
  // the local table gradient; returns OK. No input gradient (ids are
  // discrete).
  absl::Status Backward(const Tensor& grad_out);

  // "weight" [V, H] split along 0 at offset rank * V/tp.
  std::vector<ParameterShard> parameters() const;
  std::vector<ParameterShard> grads() const;
  void ZeroGrad();

  const Tensor& weight() const { return weight_; }  // [V/tp, H]
  const Tensor& weight_grad() const { return weight_grad_; }
  const Options& options() const { return options_; }
  int64_t vocab_start() const { return vocab_start_; }
  int64_t local_vocab_size() const { return local_vocab_; }

 private:
  VocabParallelEmbedding(Communicator& comm, Options options);

  Communicator& comm_;
  Options options_;
  int64_t local_vocab_ = 0;
  int64_t vocab_start_ = 0;
  Tensor weight_, weight_grad_;
  Tensor cached_ids_;  // int64, flattened, remapped to local rows; masked
                       // ids point at row local_vocab_ (dropped in Backward)
  Shape cached_ids_shape_;
};

// Cross-entropy over vocabulary-sharded logits. Stateless apart from the
// cache between Forward and Backward.
class VocabParallelCrossEntropy {
 public:
  // `comm` is borrowed and must outlive the object.
  explicit VocabParallelCrossEntropy(
      Communicator& comm, std::string name = "VocabParallelCrossEntropy");

  // logits: [T, V/tp] (or [..., V/tp], leading dims flattened into T) of a
  // floating dtype; targets: int32/int64 with T elements (any shape), ids in
  // [0, V) with V = tp * logits.dim(-1). Returns mean_t(logsumexp(z_t) -
  // z_t[target_t]) over the T tokens, the same on every rank. Computed in
  // float64 for float64 logits, else float32. T == 0 gives kInvalidArgument.
  absl::StatusOr<double> Forward(const Tensor& logits, const Tensor& targets);

  // Gradient of (grad_loss * Forward's loss) with respect to this rank's
  // logits: grad_loss / T * (softmax(z) - onehot(target)) restricted to the
  // local vocabulary slice, with the logits' shape and dtype. Needs a
  // preceding Forward (kFailedPrecondition otherwise); no communication.
  absl::StatusOr<Tensor> Backward(double grad_loss = 1.0);

  // Per-token losses [T] (float64) of the last Forward; undefined before.
  const Tensor& token_losses() const { return token_losses_; }

 private:
  Communicator& comm_;
  std::string name_;
  // Saved by Forward: exp(z - max) / sum (the local softmax slice) in the
  // compute dtype, [T, V/tp]; local target column or -1 per token.
  Tensor softmax_;
  std::vector<int64_t> local_target_;
  Shape logits_shape_;
  DType logits_dtype_ = DType::kFloat32;
  Tensor token_losses_;
};

}  // namespace tp

#endif  // TENSOR_PARALLEL_LAYERS_VOCAB_PARALLEL_H_
