// Norm: LayerNorm or RMSNorm over the last (hidden) dimension, with
// replicated parameters, forward and backward.
//
// Parameters (replicated: every tensor-parallel rank holds the full [hidden]
// vectors, ParameterShard::split_dim == -1):
//   "weight"  [hidden]  gamma, initialised to 1
//   "bias"    [hidden]  beta, initialised to 0 (LayerNorm only)
//
//   LayerNorm: y = (x - mean) / sqrt(var + eps) * weight + bias (biased var)
//   RMSNorm:   y = x / sqrt(mean(x^2) + eps) * weight
//
// Sequence parallelism. With options.sequence_parallel each rank normalises
// only its own chunk of the tokens, so its parameter gradients are partial
// sums. Backward then all-reduces (sums) this call's weight/bias gradient
// over the tensor-parallel communicator before accumulating it, so grads()
// stay identical on every rank and equal the TP = 1 gradients (Megatron's
// all-reduce of sequence-parallel parameter gradients). Without
// sequence_parallel the norm never communicates.
//
// Calling contract (as layers/linear.h): Forward caches what Backward needs;
// Backward needs a preceding successful Forward and consumes that cache
// (kFailedPrecondition otherwise). Gradients accumulate until ZeroGrad(). Not
// thread-safe; the communicator is borrowed and must outlive the layer.
// Failure atomicity: a failed Forward/Backward leaves parameters and
// gradients unchanged (the collective runs before the accumulation).
//
// Errors: kInvalidArgument naming options.name and the values for
// hidden <= 0, eps < 0, a non-floating dtype, an input whose last dimension
// is not `hidden` or whose dtype is not the layer's, a grad_out whose shape
// differs from the forward output; collective errors are returned unchanged.
//
// Example:
//   tp::Norm::Options o;
//   o.hidden = 1024;
//   o.kind = tp::NormKind::kRMSNorm;
//   o.name = "input_norm";
//   ASSIGN_OR_RETURN(std::unique_ptr<tp::Norm> norm, tp::Norm::Create(comm, o));
//   ASSIGN_OR_RETURN(tp::Tensor y, norm->Forward(x));      // x [T, 1024]
//   ASSIGN_OR_RETURN(tp::Tensor dx, norm->Backward(dy));   // dy [T, 1024]
#ifndef TENSOR_PARALLEL_LAYERS_NORM_H_
#define TENSOR_PARALLEL_LAYERS_NORM_H_

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
#include "runtime/tensor.h"

namespace tp {

enum class NormKind { kLayerNorm, kRMSNorm };

// "layer_norm" / "rms_norm".
absl::string_view NormKindName(NormKind kind);

struct NormOptions {
  // Size of the normalised (last) dimension; > 0.
  int64_t hidden = 0;
  // LayerNorm (weight and bias) or RMSNorm (weight only). Default LayerNorm.
  NormKind kind = NormKind::kLayerNorm;
  // Added to the variance (mean square for RMSNorm); >= 0. Default 1e-5
  // (PyTorch's LayerNorm; Llama's RMSNorm uses 1e-6).
  double eps = 1e-5;
  // Inputs are this rank's chunk of the tokens: all-reduce the parameter
  // gradients over the communicator in Backward (see the file comment).
  bool sequence_parallel = false;
  // Parameter dtype; inputs must have it. Any floating dtype.
  DType dtype = DType::kFloat32;
  // Used in error messages.
  std::string name = "Norm";
};

class Norm {
 public:
  using Options = NormOptions;

  // `comm` (the tensor-parallel group) is borrowed and must outlive the
  // layer; it is used only with sequence_parallel. kInvalidArgument for
  // invalid options (see the file comment). Does not communicate.
  static absl::StatusOr<std::unique_ptr<Norm>> Create(Communicator& comm,
                                                      Options options);

  // x [..., hidden] -> y of the same shape. Caches x and its statistics.
  absl::StatusOr<Tensor> Forward(const Tensor& x);

  // grad_out with Forward's output shape -> dL/dx. Accumulates the weight
  // (and bias) gradients, all-reduced first with sequence_parallel.
  absl::StatusOr<Tensor> Backward(const Tensor& grad_out);

  // "weight" (and "bias"), replicated, sharing storage with the layer.
  std::vector<ParameterShard> parameters() const;
  // The gradients under the same names and metadata.
  std::vector<ParameterShard> grads() const;
  void ZeroGrad();

  const Tensor& weight() const { return weight_; }
  const Tensor& bias() const { return bias_; }  // undefined for RMSNorm
  const Options& options() const { return options_; }

 private:
  Norm(Communicator& comm, Options options)
      : comm_(comm), options_(std::move(options)) {}

  Communicator& comm_;
  Options options_;
  Tensor weight_, bias_, weight_grad_, bias_grad_;
  Tensor cached_x_, cached_mean_, cached_rstd_;
};

}  // namespace tp

#endif  // TENSOR_PARALLEL_LAYERS_NORM_H_
