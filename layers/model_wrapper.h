// DistributedModelWrapper: turns a serial module tree (layers/module.h, e.g.
// the decoder of layers/decoder.h) into a tensor-parallel one by a plan.
//
// A plan assigns a ParallelStyle (layers/module.h) to leaf modules:
//   style           on            becomes                    shard
//   colwise         Linear        ColumnParallelLinear       weight rows (out)
//   rowwise         Linear        RowParallelLinear          weight columns
//   (in) vocab_parallel  Embedding     VocabParallelEmbedding     table rows
//   (vocab) vocab_parallel  Linear        ColumnParallelLinear       weight
//   rows (vocab) replicate       any leaf      unchanged (full on every rank)
// Two kinds of plan:
//   * automatic (ParallelPlan::Auto(), as DeepSpeed AutoTP / vLLM): by the
//     leaf's name and type -- Linear q_proj, k_proj, v_proj, gate_proj,
//     up_proj -> colwise; o_proj, down_proj -> rowwise; lm_head and every
//     Embedding -> vocab_parallel; LayerNorm/RMSNorm and other Linear ->
//     replicate. Any other leaf type that has parameters is unsupported
//     (kInvalidArgument naming it: give an explicit plan).
//   * explicit (ParallelPlan::Explicit, as PyTorch's parallelize_module):
//     ordered (pattern, style) rules over module paths; the first rule whose
//     pattern matches a module's full dotted path decides its style. '*'
//     matches any run of characters (dots included), '?' one character, so
//     "*.q_proj" matches "model.layers.3.self_attn.q_proj". Leaves no rule
//     matches are replicated. A pattern must be non-empty, use only
//     [A-Za-z0-9_.*?], and match at least one module.
// ParallelPlan::Llama() is the explicit plan that equals the automatic one
// on the SwiGLU decoder's Hugging Face names (a GeLU decoder has no
// gate_proj: that rule would match nothing, which is an error).
//
// Checks, all before the tree is touched (kInvalidArgument naming the module
// path and the values): a style a leaf type does not support (colwise on an
// Embedding or a norm, any style on a composite), a split dimension not
// divisible by the TP size (out_features for colwise, in_features for
// rowwise, vocab for vocab_parallel), and each composite's
// CheckChildStyles: Attention needs heads and kv_heads divisible by the TP
// size with q/k/v colwise and o rowwise (or all replicated), MLP gate/up
// colwise with down rowwise, the decoder's lm_head colwise/vocab_parallel
// or replicated, and any other parent accepts no sharded Linear child.
//
// Weights. A materialised serial leaf is sliced: each rank copies its rows
// or columns out of the full weight, and the full weight is freed when the
// serial leaf is. A deferred leaf (materialize = false) is never
// materialised: each rank generates only its shard from the leaf's InitSpec
// (runtime/init.h), bit-identical to the slice of the full weight, so a
// model too large for one rank can be built, wrapped and then loaded from a
// sharded checkpoint. Deferred leaves that stay replicated are materialised.
//
// parameters()/grads() are the wrapped tree's NamedParameters()/NamedGrads():
// ParameterShards with Hugging Face names, full shapes, split dims and
// offsets, for checkpoints (layers/checkpoint.h) and optimizers
// (layers/optimizer.h).
//
// Contract: every rank of the group calls Create with equal trees and plans
// (creation itself does not communicate). The communicator is borrowed and
// must outlive the wrapper. Sequence parallelism is not applied by the
// wrapper. Not thread-safe.
//
// Example:
//   ASSIGN_OR_RETURN(std::unique_ptr<tp::Decoder> serial,
//                    tp::Decoder::Create(config, /*materialize=*/false));
//   ASSIGN_OR_RETURN(std::unique_ptr<tp::DistributedModelWrapper> model,
//                    tp::DistributedModelWrapper::Create(
//                        std::move(serial), pg->tensor_parallel(),
//                        tp::ParallelPlan::Auto()));
//   model->LogPlan();                                   // rank 0 prints
//   tp::Decoder& decoder = *model->module_as<tp::Decoder>();
//   ASSIGN_OR_RETURN(double loss, decoder.ForwardLoss(ids, targets));
//   RETURN_IF_ERROR(decoder.BackwardLoss());
//   ASSIGN_OR_RETURN(auto adamw, tp::AdamW::Create(model->parameters(),
//                                                  model->grads(), opt,
//                                                  {&pg->tensor_parallel()}));
#ifndef TENSOR_PARALLEL_LAYERS_MODEL_WRAPPER_H_
#define TENSOR_PARALLEL_LAYERS_MODEL_WRAPPER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "layers/module.h"
#include "layers/parameter.h"
#include "runtime/tensor.h"

namespace tp {

struct ParallelPlan {
  // The automatic plan (see the file comment).
  static ParallelPlan Auto();
  // An explicit plan: ordered (pattern, style) rules.
  static ParallelPlan Explicit(
      std::vector<std::pair<std::string, ParallelStyle>> rules);
  // The explicit plan for the decoder's names: "*.embed_tokens",
  // "lm_head" -> vocab_parallel; "*.q_proj", "*.k_proj", "*.v_proj",
  // "*.gate_proj", "*.up_proj" -> colwise; "*.o_proj", "*.down_proj" ->
  // rowwise.
  static ParallelPlan Llama();

  bool automatic = true;
  std::vector<std::pair<std::string, ParallelStyle>> rules;
};

// One leaf of the resolved plan.
struct PlanEntry {
  std::string module;  // full dotted path, e.g. "model.layers.0.mlp.up_proj"
  std::string type;    // type before wrapping ("Linear", "RMSNorm", ...)
  ParallelStyle style = ParallelStyle::kReplicate;
  Shape full_shape;   // of the leaf's "weight"
  Shape shard_shape;  // of this rank's piece of it
  // Elements of all the leaf's parameters (weight and bias) at TP = 1, and
  // of this rank's pieces of them.
  int64_t full_elements = 0;
  int64_t shard_elements = 0;
};

// The plan for `root` at TP size `tp_size` without changing anything (a dry
// run of the wrapper's checks): one entry per leaf that has parameters, in
// pre-order. kInvalidArgument as described in the file comment.
absl::StatusOr<std::vector<PlanEntry>> ResolvePlan(const Module& root,
                                                   int tp_size,
                                                   const ParallelPlan& plan);

// The entries as an aligned text table with the header
// "module | type | style | full shape | shard shape", one row per entry,
// followed by a line "tensor parallel size N: X of Y parameters per rank".
std::string FormatPlanTable(const std::vector<PlanEntry>& entries, int tp_size);

class DistributedModelWrapper {
 public:
  // Takes `model`, resolves `plan` for comm.size() ranks (ResolvePlan's
  // errors; the model is then destroyed untouched), and replaces its leaves
  // by their parallel versions holding this rank's shards. Errors from
  // building a layer (kInvalidArgument, allocation) are returned too.
  static absl::StatusOr<std::unique_ptr<DistributedModelWrapper>> Create(
      std::unique_ptr<Module> model, Communicator& comm,
      ParallelPlan plan = ParallelPlan::Auto());

  DistributedModelWrapper(const DistributedModelWrapper&) = delete;
  DistributedModelWrapper& operator=(const DistributedModelWrapper&) = delete;

  // The wrapped tree (owned by the wrapper).
  Module& module() { return *model_; }
  const Module& module() const { return *model_; }
  // The tree as its concrete type, or null when it is not an M.
  template <typename M>
  M* module_as() {
    return dynamic_cast<M*>(model_.get());
  }

  // This rank's parameters / gradients (see the file comment).
  std::vector<ParameterShard> parameters() const {
    return model_->NamedParameters();
  }
  std::vector<ParameterShard> grads() const { return model_->NamedGrads(); }
  void ZeroGrad() { model_->ZeroGrad(); }

  const std::vector<PlanEntry>& plan() const { return entries_; }
  // FormatPlanTable(plan(), tp size).
  std::string PlanTable() const;
  // LOG(INFO)s PlanTable() on rank 0 of the group; nothing on other ranks.
  void LogPlan() const;

  Communicator& communicator() const { return comm_; }
  int tp_size() const { return comm_.size(); }
  int tp_rank() const { return comm_.rank(); }

 private:
  DistributedModelWrapper(std::unique_ptr<Module> model, Communicator& comm,
                          std::vector<PlanEntry> entries)
      : model_(std::move(model)), comm_(comm), entries_(std::move(entries)) {}

  std::unique_ptr<Module> model_;
  Communicator& comm_;
  std::vector<PlanEntry> entries_;
};

}  // namespace tp

#endif  // TENSOR_PARALLEL_LAYERS_MODEL_WRAPPER_H_
