// Module adapters over the tensor-parallel layers, so that a model tree
// (layers/module.h) can hold them in place of its serial leaves. The model
// wrapper (layers/model_wrapper.h) builds them; composites find them by
// type (dynamic_cast) to learn that an output is a local shard and over
// which communicator.
//
//   type                      wraps                    Forward
//   "ColumnParallelLinear"    ColumnParallelLinear     [..., in] -> [...,
//   out/tp]
//                             (gather_output = false)  (this rank's features)
//   "RowParallelLinear"       RowParallelLinear        [..., in/tp] -> [...,
//   out]
//                             (input_is_parallel)      (all-reduced)
//   "VocabParallelEmbedding"  VocabParallelEmbedding   ids [...] -> [..., H]
//
// LocalParameters()/LocalGrads() are the layers' own ParameterShards ("weight",
// "bias") with full shape, split dim and offset. Calling contract, failure
// atomicity and errors are those of layers/linear.h and
// layers/vocab_parallel.h; the communicator is borrowed and must outlive the
// module.
//
// Example (what the wrapper does for "model.layers.0.mlp.up_proj"):
//   tp::ColumnParallelLinear::Options o;
//   o.in_features = 48;  o.out_features = 96;  o.bias = false;
//   o.gather_output = false;  o.name = "model.layers.0.mlp.up_proj";
//   ASSIGN_OR_RETURN(auto m, tp::ColumnParallelLinearModule::Create(comm, o));
//   ASSIGN_OR_RETURN(auto old, mlp->ReplaceChild("up_proj", std::move(m)));
#ifndef TENSOR_PARALLEL_LAYERS_PARALLEL_MODULES_H_
#define TENSOR_PARALLEL_LAYERS_PARALLEL_MODULES_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "layers/linear.h"
#include "layers/module.h"
#include "layers/parameter.h"
#include "layers/vocab_parallel.h"
#include "runtime/tensor.h"

namespace tp {

class ColumnParallelLinearModule final : public Module {
 public:
  // Builds the layer (see ColumnParallelLinear::Create; its errors).
  // kInvalidArgument when options.gather_output or sequence_parallel is set:
  // modules exchange local shards, their parents gather if they need to.
  static absl::StatusOr<std::unique_ptr<ColumnParallelLinearModule>> Create(
      Communicator& comm, ColumnParallelLinear::Options options);

  absl::StatusOr<Tensor> Forward(const Tensor& x) override;
  absl::StatusOr<Tensor> Backward(const Tensor& grad_out) override;
  // The two-phase backward of ColumnParallelLinear (BackwardPartial,
  // CommitBackward), for composites whose column children share one input:
  // see ColumnSiblingsBackward below.
  absl::StatusOr<Tensor> BackwardPartial(const Tensor& grad_out);
  absl::Status CommitBackward();
  std::vector<ParameterShard> LocalParameters() const override;
  std::vector<ParameterShard> LocalGrads() const override;
  void ZeroLocalGrad() override;
  std::string Describe() const override;

  ColumnParallelLinear& layer() { return *layer_; }
  const ColumnParallelLinear& layer() const { return *layer_; }
  // The group the output features are split over.
  Communicator& communicator() const { return comm_; }

 private:
  ColumnParallelLinearModule(Communicator& comm,
                             std::unique_ptr<ColumnParallelLinear> layer)
      : Module("ColumnParallelLinear"), comm_(comm), layer_(std::move(layer)) {}
  Communicator& comm_;
  std::unique_ptr<ColumnParallelLinear> layer_;
};

class RowParallelLinearModule final : public Module {
 public:
  // See RowParallelLinear::Create. kInvalidArgument unless
  // options.input_is_parallel, or when sequence_parallel is set.
  static absl::StatusOr<std::unique_ptr<RowParallelLinearModule>> Create(
      Communicator& comm, RowParallelLinear::Options options);

  absl::StatusOr<Tensor> Forward(const Tensor& x) override;
  absl::StatusOr<Tensor> Backward(const Tensor& grad_out) override;
  std::vector<ParameterShard> LocalParameters() const override;
  std::vector<ParameterShard> LocalGrads() const override;
  void ZeroLocalGrad() override;
  std::string Describe() const override;

  RowParallelLinear& layer() { return *layer_; }
  const RowParallelLinear& layer() const { return *layer_; }
  Communicator& communicator() const { return comm_; }

 private:
  RowParallelLinearModule(Communicator& comm,
                          std::unique_ptr<RowParallelLinear> layer)
      : Module("RowParallelLinear"), comm_(comm), layer_(std::move(layer)) {}
  Communicator& comm_;
  std::unique_ptr<RowParallelLinear> layer_;
};

class VocabParallelEmbeddingModule final : public Module {
 public:
  // See VocabParallelEmbedding::Create. kInvalidArgument with
  // sequence_parallel.
  static absl::StatusOr<std::unique_ptr<VocabParallelEmbeddingModule>> Create(
      Communicator& comm, VocabParallelEmbedding::Options options);

  // ids -> [..., H], identical on every rank.
  absl::StatusOr<Tensor> Forward(const Tensor& ids) override;
  // Accumulates the local table gradient; returns an undefined tensor.
  absl::StatusOr<Tensor> Backward(const Tensor& grad_out) override;
  std::vector<ParameterShard> LocalParameters() const override;
  std::vector<ParameterShard> LocalGrads() const override;
  void ZeroLocalGrad() override;
  std::string Describe() const override;

  VocabParallelEmbedding& layer() { return *layer_; }
  const VocabParallelEmbedding& layer() const { return *layer_; }
  Communicator& communicator() const { return comm_; }

 private:
  VocabParallelEmbeddingModule(Communicator& comm,
                               std::unique_ptr<VocabParallelEmbedding> layer)
      : Module("VocabParallelEmbedding"),
        comm_(comm),
        layer_(std::move(layer)) {}
  Communicator& comm_;
  std::unique_ptr<VocabParallelEmbedding> layer_;
};

// Backward of sibling modules that all read the SAME input x (q/k/v_proj,
// gate/up_proj): `parts` pairs each module with the gradient of its output,
// and the result is dL/dx, the sum of their input gradients. When every
// module is a ColumnParallelLinearModule over one communicator, each computes
// its partial input gradient locally and the sum is all-reduced ONCE (one
// collective per attention or MLP block backward, as Megatron's fused QKV and
// gate/up GEMMs; separate Backward calls would all-reduce per module); the
// modules commit their gradients only after that all-reduce succeeded.
// Otherwise (serial modules, mixed styles) each module's Backward runs in
// turn and the results are summed. Errors: the modules' and the collective's,
// unchanged; kInvalidArgument for an empty `parts`, a null module or a
// module given twice (checked before anything runs).
//
// Example (what the decoder's attention does):
//   ASSIGN_OR_RETURN(tp::Tensor dx, tp::ColumnSiblingsBackward(
//                                       {{q_proj, dq}, {k_proj, dk},
//                                        {v_proj, dv}}));
absl::StatusOr<Tensor> ColumnSiblingsBackward(
    const std::vector<std::pair<Module*, Tensor>>& parts);

}  // namespace tp

#endif  // TENSOR_PARALLEL_LAYERS_PARALLEL_MODULES_H_
