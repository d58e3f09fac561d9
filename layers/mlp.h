// ParallelMLP: the transformer feed-forward block, column-parallel up
// projection -> activation -> row-parallel down projection (Megatron-LM's
// ParallelMLP). One all-reduce forward (in down_proj) and one backward (in
// the up projection's input gradient).
//
// Activations:
//   kGeLU    y = down_proj(gelu(up_proj(x)))              (tanh GeLU)
//   kSwiGLU  y = down_proj(silu(gate(x)) * up(x))         (Llama)
//
// Weights (checkpoint names, full shapes as at TP = 1):
//   GeLU:    "up_proj.weight"      [ffn, hidden]      column-parallel
//            "up_proj.bias"        [ffn]
//   SwiGLU:  "gate_up_proj.weight" [2 ffn, hidden]    column-parallel; row
//                                   2i is gate row i, row 2i + 1 up row i
//            "gate_up_proj.bias"   [2 ffn]
//   both:    "down_proj.weight"    [hidden, ffn]      row-parallel
//            "down_proj.bias"      [hidden]           replicated
// The SwiGLU gate and up projections are one column-parallel layer with
// interleaved rows, so each rank's contiguous row slice holds the matching
// gate and up rows for ffn / tp units whatever the TP size (one GEMM and one
// input-gradient all-reduce instead of two). To load separate gate [ffn, h]
// and up [ffn, h] matrices, interleave their rows.
//
// Shapes: x [tokens, hidden] -> [tokens, hidden]; with sequence_parallel x
// and y are this rank's [tokens / tp, hidden] chunk (the up projection
// all-gathers the rows, the down projection reduce-scatters them). Inputs of
// rank > 2 ([..., hidden]) are accepted without sequence parallelism.
//
// Calling contract, errors and failure behaviour as layers/attention.h:
// kInvalidArgument naming options.name for ffn not divisible by the TP size,
// non-positive sizes, a non-floating dtype, a wrong input shape or dtype.
//
// Example:
//   tp::ParallelMLP::Options o;
//   o.hidden = 4096;  o.ffn = 11008;  o.activation =
//   tp::MlpActivation::kSwiGLU; o.name = "layers.0.mlp"; ASSIGN_OR_RETURN(auto
//   mlp, tp::ParallelMLP::Create(comm, o)); ASSIGN_OR_RETURN(tp::Tensor y,
//   mlp->Forward(x)); ASSIGN_OR_RETURN(tp::Tensor dx, mlp->Backward(dy));
#ifndef TENSOR_PARALLEL_LAYERS_MLP_H_
#define TENSOR_PARALLEL_LAYERS_MLP_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "layers/linear.h"
#include "layers/parameter.h"
#include "runtime/dtype.h"
#include "runtime/tensor.h"

namespace tp {

enum class MlpActivation { kGeLU, kSwiGLU };

// "gelu" / "swiglu".
absl::string_view MlpActivationName(MlpActivation a);

struct ParallelMLPOptions {
  // Model width; > 0.
  int64_t hidden = 0;
  // Intermediate width (per branch for SwiGLU); > 0, divisible by the TP size.
  int64_t ffn = 0;
  MlpActivation activation = MlpActivation::kGeLU;
  // Biases on both projections.
  bool bias = true;
  // Input/output split along the rows (see the file comment).
  bool sequence_parallel = false;
  // Parameter dtype; inputs must have it. Any floating dtype.
  DType dtype = DType::kFloat32;
  // Weights N(0, init_std^2) from SeedFor(seed, name + ".up_proj.weight")
  // etc. (TP-size independent); biases 0.
  double init_std = 0.02;
  uint64_t seed = 0;
  // Prefix of error messages and of the init seeds.
  std::string name = "mlp";
};

class ParallelMLP {
 public:
  using Options = ParallelMLPOptions;

  // `comm` (the TP group) is borrowed and must outlive the layer.
  // kInvalidArgument for invalid options. Does not communicate.
  static absl::StatusOr<std::unique_ptr<ParallelMLP>> Create(Communicator& comm,
                                                             Options options);

  // x [..., hidden] -> [..., hidden] (rows split with sequence_parallel).
  absl::StatusOr<Tensor> Forward(const Tensor& x);
  // grad_out with Forward's output shape -> dL/dx; accumulates the weight
  // and bias gradients.
  absl::StatusOr<Tensor> Backward(const Tensor& grad_out);

  // "up_proj.*" or "gate_up_proj.*", then "down_proj.*".
  std::vector<ParameterShard> parameters() const;
  std::vector<ParameterShard> grads() const;
  void ZeroGrad();

  const Options& options() const { return options_; }
  ColumnParallelLinear& up_proj() { return *up_proj_; }
  RowParallelLinear& down_proj() { return *down_proj_; }

 private:
  explicit ParallelMLP(Options options) : options_(std::move(options)) {}

  Options options_;
  std::unique_ptr<ColumnParallelLinear> up_proj_;  // up_proj or gate_up_proj
  std::unique_ptr<RowParallelLinear> down_proj_;
  Tensor pre_act_;  // up projection output, [..., ffn/tp] or [..., ffn/tp, 2]
  Tensor silu_;     // SwiGLU: silu(gate), [..., ffn/tp, 1]
};

}  // namespace tp

#endif  // TENSOR_PARALLEL_LAYERS_MLP_H_
