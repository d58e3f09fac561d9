// Tensor-parallel linear layers with Megatron-LM semantics.
//
// Naming (DESIGN.md, "Naming"): the weight is stored [out, in] and y = x W^T +
// b.
//   * ColumnParallelLinear splits the OUTPUT features: rank r holds rows
//     [r * out/tp, (r + 1) * out/tp) of W and the same slice of b. Forward
//     needs no communication (unless gather_output); its backward all-reduces
//     the input gradient.
//   * RowParallelLinear splits the INPUT features: rank r holds columns
//     [r * in/tp, (r + 1) * in/tp) of W and the full (replicated) b. Forward
//     all-reduces the partial outputs and adds b once, after the reduction
//     (at TP = 1, float32/float64: fused into the GEMM, as the column layer
//     always does for those dtypes).
// A column layer with gather_output = false followed by a row layer with
// input_is_parallel = true (an MLP's up/down projection, attention's QKV/out)
// costs one all-reduce forward and one backward, and equals the serial
// Linear -> Linear within rounding.
//
// Sequence parallelism (Megatron's `sequence_parallel`): the activations
// outside the column/row pair are split along dim 0 of the input (the
// sequence/token dimension: use a [S, B, H] or flattened [T, H] layout).
// The column layer all-gathers its input along dim 0 (and reduce-scatters the
// input gradient); the row layer reduce-scatters its output along dim 0
// instead of all-reducing it (and all-gathers the output gradient). Same
// communication volume, 1/tp of the activation memory outside the pair.
//
// Shards are initialised from runtime/init.h with InitShard on the FULL
// shape: each rank generates only its slice, and that slice is bit-identical
// to the same slice of the TP = 1 weight, so results do not depend on tp.
//
// Inputs are [..., features] of the layer's dtype; leading dimensions are
// flattened into one token dimension for the GEMM and restored in the output.
//
// Calling contract: every rank of the communicator calls Create, Forward and
// Backward in the same order with inputs of the same shape (the collectives
// inside require it). Forward caches its input for Backward (without a copy
// when the input is contiguous: do not modify it in place before Backward);
// Backward needs a preceding successful Forward and consumes that cache (a
// second Backward without a new Forward is kFailedPrecondition). Gradients
// ACCUMULATE into grads() until ZeroGrad(). A layer is not thread-safe; it
// borrows the communicator, which must outlive it.
//
// Failure atomicity: when Forward or Backward returns an error (bad input, a
// failed collective), the layer's weights, biases, gradients and cached input
// are exactly as before the call. Backward runs every collective before it
// touches the gradients.
//
// Errors: kInvalidArgument naming the layer and the values for sizes not
// divisible by the TP size, bad option combinations, input shapes or dtypes
// that do not match; kFailedPrecondition for Backward without Forward;
// collective errors (kDeadlineExceeded, kUnavailable, kInternal, ...) are
// returned unchanged.
//
// Example (a tensor-parallel MLP, x is [tokens, h] on every rank):
//   tp::ColumnParallelLinear::Options up;
//   up.in_features = h;
//   up.out_features = 4 * h;
//   up.gather_output = false;
//   up.weight_init = tp::InitSpec::Normal(0, 0.02, tp::SeedFor(seed, "fc1"));
//   ASSIGN_OR_RETURN(auto fc1, tp::ColumnParallelLinear::Create(comm, up));
//   tp::RowParallelLinear::Options down;
//   down.in_features = 4 * h;
//   down.out_features = h;
//   down.input_is_parallel = true;
//   down.weight_init = tp::InitSpec::Normal(0, 0.02, tp::SeedFor(seed, "fc2"));
//   ASSIGN_OR_RETURN(auto fc2, tp::RowParallelLinear::Create(comm, down));
//   ASSIGN_OR_RETURN(tp::Tensor a, fc1->Forward(x));        // [tokens, 4h/tp]
//   ASSIGN_OR_RETURN(tp::Tensor g, tp::ops::GeLU(a));
//   ASSIGN_OR_RETURN(tp::Tensor y, fc2->Forward(g));        // [tokens, h]
//   ...
//   ASSIGN_OR_RETURN(tp::Tensor dg, fc2->Backward(dy));     // [tokens, 4h/tp]
//   ASSIGN_OR_RETURN(tp::Tensor da, tp::ops::GeLUBackward(dg, a));
//   ASSIGN_OR_RETURN(tp::Tensor dx, fc1->Backward(da));     // [tokens, h]
#ifndef TENSOR_PARALLEL_LAYERS_LINEAR_H_
#define TENSOR_PARALLEL_LAYERS_LINEAR_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "layers/parameter.h"
#include "runtime/dtype.h"
#include "runtime/init.h"
#include "runtime/tensor.h"

namespace tp {

struct ColumnParallelLinearOptions {
  // Full (TP = 1) input features; > 0.
  int64_t in_features = 0;
  // Full (TP = 1) output features; > 0 and divisible by the TP size.
  int64_t out_features = 0;
  // Whether the layer has a bias [out_features] (sharded like the rows of W).
  bool bias = true;
  // true: all-gather the output along the last dim, so every rank gets the
  // full [..., out_features]; false: return this rank's [..., out/tp] (the
  // input of a RowParallelLinear with input_is_parallel). Default as Megatron.
  bool gather_output = true;
  // true: Forward returns x W^T WITHOUT the bias, and the caller adds bias()
  // itself (e.g. fused into the next element-wise op). Backward still
  // accumulates the bias gradient from grad_out, which is right whenever the
  // caller's addition is a plain y + b.
  bool skip_bias_add = false;
  // true: the input is split along dim 0 (sequence parallel) and all-gathered
  // along dim 0 before the GEMM; Backward reduce-scatters the input gradient.
  // Requires gather_output = false.
  bool sequence_parallel = false;
  // Parameter dtype; inputs must have it. Any floating dtype.
  DType dtype = DType::kFloat32;
  // Initialisation of the FULL [out, in] weight (each rank generates its
  // rows). Default: Megatron's N(0, 0.02) with seed 0 -- give each layer its
  // own seed (SeedFor) or two layers of one shape start equal.
  InitSpec weight_init = InitSpec::Normal(0.0, 0.02, 0);
  // Initialisation of the FULL [out] bias. Default: zeros.
  InitSpec bias_init = InitSpec::Constant(0.0);
  // Name used in error messages ("fc1: ...").
  std::string name = "ColumnParallelLinear";
};

class ColumnParallelLinear {
 public:
  using Options = ColumnParallelLinearOptions;

  // Builds this rank's shard. `comm` is borrowed and must outlive the layer.
  // kInvalidArgument (naming options.name and the values): features <= 0,
  // out_features not divisible by comm.size(), a non-floating dtype,
  // sequence_parallel with gather_output, an invalid init spec.
  // Creation does not communicate.
  static absl::StatusOr<std::unique_ptr<ColumnParallelLinear>> Create(
      Communicator& comm, Options options);

  // x: [..., in_features] (with sequence_parallel: [n, ..., in] where the
  // gathered dim 0 is tp * n). Returns [..., out_features] when
  // gather_output, else [..., out_features / tp] (leading dims as gathered).
  // Caches the (gathered) input for Backward.
  absl::StatusOr<Tensor> Forward(const Tensor& x);

  // grad_out: the gradient of Forward's result (same shape). Accumulates
  // dW += grad^T x and db += sum(grad) into grads() and returns the input
  // gradient with x's shape (all-reduced over the group, or reduce-scattered
  // along dim 0 with sequence_parallel).
  absl::StatusOr<Tensor> Backward(const Tensor& grad_out);

  // Backward in two phases, for several column layers that read the SAME
  // input (q/k/v or gate/up kept as separate layers): each returns its
  // partial input gradient, the caller sums them and all-reduces the sum once
  // (what Megatron's fused QKV GEMM achieves), then commits each layer.
  //
  // BackwardPartial: grad_out as Backward; returns this rank's UNREDUCED
  // input gradient grad W_local (x's shape) and keeps grad_out pending; it
  // communicates nothing and changes no gradient. kInvalidArgument with
  // sequence_parallel; otherwise Backward's errors.
  // The pending gradient shares grad_out's storage: do not modify grad_out
  // in place before CommitBackward.
  // CommitBackward: accumulates the pending gradients into grads() and
  // consumes the cached input, as the end of Backward does.
  // kFailedPrecondition without a pending BackwardPartial. A successful
  // Forward, or any Backward or BackwardPartial (even one that fails), in
  // between discards the pending gradient; gradients and weights are never
  // touched before CommitBackward, so a caller whose all-reduce fails simply
  // does not commit and the layer's parameters and gradients stay as they
  // were (its cached input too, for another Backward).
  absl::StatusOr<Tensor> BackwardPartial(const Tensor& grad_out);
  absl::Status CommitBackward();

  // "weight" [out, in] split along 0 at offset rank * out/tp, and (with bias)
  // "bias" [out] split along 0. Tensors share storage with the layer.
  std::vector<ParameterShard> parameters() const;
  // The gradients, same names and metadata as parameters().
  std::vector<ParameterShard> grads() const;
  // Sets every gradient to zero.
  void ZeroGrad();

  // Local shards: weight [out/tp, in], bias [out/tp] (undefined without bias).
  const Tensor& weight() const { return weight_; }
  const Tensor& bias() const { return bias_; }
  const Tensor& weight_grad() const { return weight_grad_; }
  const Tensor& bias_grad() const { return bias_grad_; }
  const Options& options() const { return options_; }
  int64_t local_out_features() const { return local_out_; }
  // Start of this rank's rows in the full weight.
  int64_t out_offset() const { return out_offset_; }

 private:
  ColumnParallelLinear(Communicator& comm, Options options);

  Communicator& comm_;
  Options options_;
  int64_t local_out_ = 0;
  int64_t out_offset_ = 0;
  Tensor weight_, bias_, weight_grad_, bias_grad_;
  // grad_out [tokens, local out] -> (the same, reshaped; the unreduced input
  // gradient with the gathered input's shape). Checks the call order and shape.
  absl::StatusOr<std::pair<Tensor, Tensor>> LocalInputGrad(
      const Tensor& grad_out);

  Tensor cached_input_;    // [tokens, in], gathered when sequence parallel
  Shape cached_in_shape_;  // x's shape as given to Forward
  Tensor pending_grad_;    // [tokens, local out] between the two phases
};

struct RowParallelLinearOptions {
  // Full (TP = 1) input features; > 0 and divisible by the TP size.
  int64_t in_features = 0;
  // Full (TP = 1) output features; > 0.
  int64_t out_features = 0;
  // Whether the layer has a bias [out_features] (replicated on every rank,
  // added once after the reduction).
  bool bias = true;
  // true: the input is already split along its last dim ([..., in/tp], e.g.
  // the output of a ColumnParallelLinear without gather_output); false: the
  // input is the full [..., in] and each rank takes its slice (Backward then
  // all-gathers the input gradient). Default as Megatron.
  bool input_is_parallel = false;
  // true: Forward returns the reduced x W^T without the bias and the caller
  // adds bias() (see ColumnParallelLinearOptions::skip_bias_add).
  bool skip_bias_add = false;
  // true: reduce-scatter the output along dim 0 instead of all-reducing it
  // (the output is [n / tp, ..., out]); Backward all-gathers grad_out along
  // dim 0. Requires input_is_parallel.
  bool sequence_parallel = false;
  // Parameter dtype; inputs must have it. Any floating dtype.
  DType dtype = DType::kFloat32;
  // Initialisation of the FULL [out, in] weight (each rank generates its
  // columns). Default: N(0, 0.02), seed 0 (see the column layer).
  InitSpec weight_init = InitSpec::Normal(0.0, 0.02, 0);
  // Initialisation of the [out] bias. Default: zeros.
  InitSpec bias_init = InitSpec::Constant(0.0);
  // Name used in error messages.
  std::string name = "RowParallelLinear";
};

class RowParallelLinear {
 public:
  using Options = RowParallelLinearOptions;

  // Builds this rank's shard; `comm` is borrowed and must outlive the layer.
  // kInvalidArgument (naming options.name and the values): features <= 0,
  // in_features not divisible by comm.size(), a non-floating dtype,
  // sequence_parallel without input_is_parallel, an invalid init spec.
  static absl::StatusOr<std::unique_ptr<RowParallelLinear>> Create(
      Communicator& comm, Options options);

  // x: [..., in/tp] with input_is_parallel, else [..., in]. Returns
  // [..., out_features], identical on every rank (with sequence_parallel:
  // dim 0 divided by tp, this rank's chunk). Caches its input for Backward.
  absl::StatusOr<Tensor> Forward(const Tensor& x);

  // grad_out: gradient of Forward's result (same shape). Accumulates
  // dW_local += grad^T x_local and db += sum(grad) (db over the full token
  // set, identical on every rank) and returns the input gradient with x's
  // shape ([..., in/tp] with input_is_parallel, else the full [..., in]
  // all-gathered along the last dim).
  absl::StatusOr<Tensor> Backward(const Tensor& grad_out);

  // "weight" [out, in] split along 1 at offset rank * in/tp, and (with bias)
  // "bias" [out] replicated (split_dim -1).
  std::vector<ParameterShard> parameters() const;
  std::vector<ParameterShard> grads() const;
  void ZeroGrad();

  // Local shards: weight [out, in/tp], bias [out] (undefined without bias).
  const Tensor& weight() const { return weight_; }
  const Tensor& bias() const { return bias_; }
  const Tensor& weight_grad() const { return weight_grad_; }
  const Tensor& bias_grad() const { return bias_grad_; }
  const Options& options() const { return options_; }
  int64_t local_in_features() const { return local_in_; }
  // Start of this rank's columns in the full weight.
  int64_t in_offset() const { return in_offset_; }

 private:
  RowParallelLinear(Communicator& comm, Options options);

  Communicator& comm_;
  Options options_;
  int64_t local_in_ = 0;
  int64_t in_offset_ = 0;
  Tensor weight_, bias_, weight_grad_, bias_grad_;
  Tensor cached_input_;    // [tokens, in/tp]
  Shape cached_in_shape_;  // x's shape as given to Forward
};

}  // namespace tp

#endif  // TENSOR_PARALLEL_LAYERS_LINEAR_H_
