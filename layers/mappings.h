// Communication mappings between replicated, tensor-parallel and
// sequence-parallel activations, each as a (Forward, Backward) pair with
// Megatron-LM's semantics (megatron/core/tensor_parallel/mappings.py), but
// without autograd: the caller runs Backward with the gradient of Forward's
// result, in reverse order of the forwards.
//
//   pair                          Forward                 Backward
//   CopyToTensorParallel          identity                all-reduce (sum)
//   ReduceFromTensorParallel      all-reduce (sum)        identity
//   ScatterToTensorParallel       keep own last-dim slice all-gather last dim
//   GatherFromTensorParallel      all-gather last dim     keep own slice
//   ScatterToSequenceParallel     keep own dim-0 chunk    all-gather dim 0
//   GatherFromSequenceParallel    all-gather dim 0        reduce-scatter dim 0
//   ReduceScatterToSequenceParallel reduce-scatter dim 0  all-gather dim 0
//
// "Last dim" is the hidden/feature dimension; "dim 0" is the sequence or
// token dimension of a [S, B, H] or [T, H] activation. Splits are in rank
// order: rank r owns the r-th of size() equal pieces.
//
// Conventions:
//  - Every rank of `comm` calls the same function with tensors of the same
//    shape and dtype (the shapes below give each side's relation).
//  - Inputs are borrowed and never modified (views are accepted). Results are
//    new contiguous tensors, except the identities, which return the input
//    handle itself (it shares storage with the argument).
//  - With comm.size() == 1 every function is the identity and communicates
//    nothing.
//  - Errors: kInvalidArgument naming the function and the values when a
//    split dimension is not divisible by comm.size() or the tensor has rank
//    0 (or, for the sequence functions, dim 0 is missing); collective errors
//    are returned unchanged.
//
// Example (a column-parallel GEMM on a replicated input x):
//   ASSIGN_OR_RETURN(Tensor xp, CopyToTensorParallel::Forward(comm, x));
//   ASSIGN_OR_RETURN(Tensor y, ops::MatMul(xp, w_shard, false, true));
//   ...
//   ASSIGN_OR_RETURN(Tensor dxp, ops::MatMul(dy, w_shard));
//   ASSIGN_OR_RETURN(Tensor dx, CopyToTensorParallel::Backward(comm, dxp));
#ifndef TENSOR_PARALLEL_LAYERS_MAPPINGS_H_
#define TENSOR_PARALLEL_LAYERS_MAPPINGS_H_

#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "runtime/tensor.h"

namespace tp {

// Enter a tensor-parallel region with a replicated activation.
struct CopyToTensorParallel {
  // Returns x (same handle).
  static absl::StatusOr<Tensor> Forward(Communicator& comm, const Tensor& x);
  // Returns the sum of `grad` over the group.
  static absl::StatusOr<Tensor> Backward(Communicator& comm,
                                         const Tensor& grad);
};

// Leave a tensor-parallel region by summing partial results.
struct ReduceFromTensorParallel {
  // Returns the sum of x over the group.
  static absl::StatusOr<Tensor> Forward(Communicator& comm, const Tensor& x);
  // Returns grad (same handle).
  static absl::StatusOr<Tensor> Backward(Communicator& comm,
                                         const Tensor& grad);
};

// Split a replicated [..., n] activation along its last dim.
struct ScatterToTensorParallel {
  // [..., n] -> this rank's [..., n / size] slice.
  static absl::StatusOr<Tensor> Forward(Communicator& comm, const Tensor& x);
  // [..., n / size] -> [..., n], every rank's slice in rank order.
  static absl::StatusOr<Tensor> Backward(Communicator& comm,
                                         const Tensor& grad);
};

// Join a last-dim-split activation into the replicated full tensor.
struct GatherFromTensorParallel {
  // [..., m] -> [..., size * m], every rank's piece in rank order.
  static absl::StatusOr<Tensor> Forward(Communicator& comm, const Tensor& x);
  // [..., size * m] -> this rank's [..., m] slice.
  static absl::StatusOr<Tensor> Backward(Communicator& comm,
                                         const Tensor& grad);
};

// Split a replicated activation along dim 0 (enter a sequence-parallel
// region without communication).
struct ScatterToSequenceParallel {
  // [n, ...] -> this rank's [n / size, ...] chunk.
  static absl::StatusOr<Tensor> Forward(Communicator& comm, const Tensor& x);
  // [n / size, ...] -> [n, ...] (all-gather along dim 0).
  static absl::StatusOr<Tensor> Backward(Communicator& comm,
                                         const Tensor& grad);
};

// Sequence-parallel -> tensor-parallel region (before a column layer).
struct GatherFromSequenceParallel {
  // [n, ...] -> [size * n, ...] (all-gather along dim 0).
  static absl::StatusOr<Tensor> Forward(Communicator& comm, const Tensor& x);
  // [size * n, ...] -> [n, ...]: sum over the group, this rank's chunk
  // (reduce-scatter along dim 0).
  static absl::StatusOr<Tensor> Backward(Communicator& comm,
                                         const Tensor& grad);
};

// Tensor-parallel -> sequence-parallel region (after a row layer).
struct ReduceScatterToSequenceParallel {
  // [n, ...] partial sums -> [n / size, ...]: sum over the group, this
  // rank's chunk (reduce-scatter along dim 0).
  static absl::StatusOr<Tensor> Forward(Communicator& comm, const Tensor& x);
  // [n / size, ...] -> [n, ...] (all-gather along dim 0).
  static absl::StatusOr<Tensor> Backward(Communicator& comm,
                                         const Tensor& grad);
};

}  // namespace tp

#endif  // TENSOR_PARALLEL_LAYERS_MAPPINGS_H_
