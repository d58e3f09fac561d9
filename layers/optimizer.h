// Optimizers over sharded parameters: SGD with momentum and AdamW, with
// data-parallel gradient averaging and gradient clipping by the global norm.
//
// An optimizer is built over the ParameterShard lists of a model (its
// parameters() and grads(), same order and names) and the model's process
// groups. Step() then, on every rank of the job:
//
//   1. Data parallelism: averages every gradient over the data-parallel
//      communicator (one all-reduce with ReduceOp::kAvg per dtype, on a flat
//      buffer holding all gradients of that dtype), so data-parallel replicas
//      apply the same update.
//   2. Global gradient norm, ||g|| over the WHOLE model (every TP shard of
//      every parameter, counted once):
//        sq_sharded  = sum of g^2 over this rank's shards of split parameters
//                      (ParameterShard::split_dim >= 0), all-reduced (summed)
//                      over the tensor-parallel communicator, so each shard
//                      is counted once across the group;
//        sq_replicated = sum of g^2 over replicated parameters (split_dim ==
//                      -1: norm weights, row-parallel biases), NOT reduced:
//                      every TP rank holds the same full gradient, so adding
//                      the local value counts each replicated parameter once;
//        ||g|| = sqrt(sq_sharded + sq_replicated), accumulated in float64.
//      Step 1 made gradients identical across data-parallel replicas, so the
//      norm is the same on every rank of the job without a DP reduction.
//      (This relies on replicated gradients being identical across the TP
//      group, which the layers guarantee: see layers/norm.h for the
//      sequence-parallel case.)
//   3. Clipping (max_grad_norm > 0): when ||g|| > max_grad_norm every
//      gradient is scaled by max_grad_norm / (||g|| + 1e-6), as PyTorch's
//      clip_grad_norm_.
//   4. The update of each shard, element-wise (so sharding does not change
//      it): computed in float64 from the parameter, the (averaged, clipped)
//      gradient and the state, rounded once to the parameter's dtype. State
//      is float64 for float64 parameters, else float32.
//
// After Step() the gradient tensors hold the averaged and clipped gradients
// that were applied; call ZeroGrad() (here or on the model) before the next
// accumulation.
//
// Failure atomicity: every collective (steps 1 and 2) runs before anything
// is written; when one fails Step() returns its error and the parameters,
// gradients and optimizer state are unchanged (the step counter too).
//
// Thread safety: none; one optimizer per rank. The communicators are
// borrowed and must outlive the optimizer; every rank of a group calls
// Step() the same number of times (it is a collective).
//
// Example (DP x TP training step):
//   tp::AdamWOptions opt;
//   opt.lr = 3e-4;  opt.weight_decay = 0.1;  opt.max_grad_norm = 1.0;
//   ASSIGN_OR_RETURN(auto adamw,
//       tp::AdamW::Create(model.parameters(), model.grads(), opt,
//                         {&pg->tensor_parallel(), &pg->data_parallel()}));
//   model.ZeroGrad();
//   ... forward, loss, backward ...
//   RETURN_IF_ERROR(adamw->Step());
//   LOG(INFO) << "grad norm " << adamw->last_grad_norm();
#ifndef TENSOR_PARALLEL_LAYERS_OPTIMIZER_H_
#define TENSOR_PARALLEL_LAYERS_OPTIMIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "layers/parameter.h"
#include "runtime/tensor.h"

namespace tp {

// The groups an optimizer reduces over; null (or a group of size 1) means
// no such parallelism.
struct ParallelGroups {
  // The group the split parameters are sharded over (gradient norm).
  Communicator* tensor_parallel = nullptr;
  // The group whose replicas' gradients are averaged.
  Communicator* data_parallel = nullptr;
};

struct SGDOptions {
  // Learning rate; >= 0. Default 0.01.
  double lr = 0.01;
  // Momentum factor mu in [0, 1): buf = mu * buf + g; p -= lr * buf
  // (PyTorch's SGD without dampening; the first step sets buf = g).
  // 0 (default): plain SGD, no state.
  double momentum = 0.0;
  // L2 penalty added to the gradient (g += weight_decay * p) before the
  // momentum, as PyTorch's SGD; >= 0. Default 0.
  double weight_decay = 0.0;
  // Clip the global gradient norm to this value; <= 0 (default): no clipping.
  double max_grad_norm = 0.0;
};

struct AdamWOptions {
  // Learning rate; >= 0. Default 1e-3.
  double lr = 1e-3;
  // Exponential decay rates of the first and second moment, in [0, 1).
  double beta1 = 0.9;
  double beta2 = 0.999;
  // Added to sqrt(v_hat); > 0. Default 1e-8.
  double eps = 1e-8;
  // Decoupled weight decay (Loshchilov & Hutter): p -= lr * weight_decay * p
  // before the Adam update, independent of the gradient; >= 0. Default 0.01
  // (PyTorch's AdamW). Apply it to every parameter given; build a second
  // optimizer for parameters (norms, biases) that should not decay.
  double weight_decay = 0.01;
  // Clip the global gradient norm to this value; <= 0 (default): no clipping.
  double max_grad_norm = 0.0;
};

// The common part: gradient averaging, norm, clipping, bookkeeping.
class Optimizer {
 public:
  virtual ~Optimizer() = default;
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // One optimisation step (see the file comment). Collective over both
  // groups. Errors: the communicators' (nothing is modified then).
  absl::Status Step();

  // Sets every gradient given at construction to zero.
  void ZeroGrad();

  // The global gradient norm measured by the last Step() (after DP
  // averaging, before clipping); 0 before the first step.
  double last_grad_norm() const { return last_grad_norm_; }
  // Completed steps.
  int64_t step_count() const { return step_; }
  double lr() const { return lr_; }
  // For schedules; takes effect at the next Step(). kInvalidArgument when
  // lr < 0 or not finite.
  absl::Status set_lr(double lr);

  // Optimizer state for checkpoints: one entry per state tensor, named
  // "<parameter>.<state>" ("momentum_buffer"; "exp_avg", "exp_avg_sq") with
  // the parameter's shard metadata. Tensors share storage with the optimizer.
  virtual std::vector<ParameterShard> state() const = 0;

 protected:
  // Validates params/grads (same length, names, shapes, dtypes, metadata,
  // contiguous floating tensors). kInvalidArgument naming `who` and the
  // offending parameter.
  static absl::Status Validate(absl::string_view who,
                               const std::vector<ParameterShard>& params,
                               const std::vector<ParameterShard>& grads);

  Optimizer(std::vector<ParameterShard> params,
            std::vector<ParameterShard> grads, ParallelGroups groups,
            double lr, double max_grad_norm);

  // Updates parameter i from its final gradient; `step` counts from 1.
  virtual void Update(size_t i, int64_t step) = 0;

  std::vector<ParameterShard> params_;
  std::vector<ParameterShard> grads_;

 private:
  ParallelGroups groups_;
  double lr_;
  double max_grad_norm_;
  double last_grad_norm_ = 0.0;
  int64_t step_ = 0;
};

class SGD : public Optimizer {
 public:
  // kInvalidArgument for invalid options or params/grads that do not match.
  static absl::StatusOr<std::unique_ptr<SGD>> Create(
      std::vector<ParameterShard> params, std::vector<ParameterShard> grads,
      SGDOptions options, ParallelGroups groups = {});

  // "<name>.momentum_buffer" per parameter (empty without momentum).
  std::vector<ParameterShard> state() const override;
  const SGDOptions& options() const { return options_; }

 private:
  SGD(std::vector<ParameterShard> params, std::vector<ParameterShard> grads,
      SGDOptions options, ParallelGroups groups);
  void Update(size_t i, int64_t step) override;

  SGDOptions options_;
  std::vector<Tensor> momentum_;
};

class AdamW : public Optimizer {
 public:
  // kInvalidArgument for invalid options or params/grads that do not match.
  static absl::StatusOr<std::unique_ptr<AdamW>> Create(
      std::vector<ParameterShard> params, std::vector<ParameterShard> grads,
      AdamWOptions options, ParallelGroups groups = {});

  // "<name>.exp_avg" and "<name>.exp_avg_sq" per parameter.
  std::vector<ParameterShard> state() const override;
  const AdamWOptions& options() const { return options_; }

 private:
  AdamW(std::vector<ParameterShard> params, std::vector<ParameterShard> grads,
        AdamWOptions options, ParallelGroups groups);
  void Update(size_t i, int64_t step) override;

  AdamWOptions options_;
  std::vector<Tensor> exp_avg_, exp_avg_sq_;
};

}  // namespace tp

#endif  // TENSOR_PARALLEL_LAYERS_OPTIMIZER_H_
