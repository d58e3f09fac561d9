#include "layers/mappings.h"

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "runtime/ops.h"
#include "runtime/status_macros.h"

namespace tp {
namespace {

absl::Status CheckDefined(absl::string_view fn, const Tensor& t) {
  if (!t.defined()) {
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": the tensor is undefined"));
  }
  return absl::OkStatus();
}

// Checks that dimension `dim` (0 or -1) of `t` exists and divides by the
// group size.
absl::Status CheckSplittable(absl::string_view fn, const Communicator& comm,
                             const Tensor& t, int dim) {
  RETURN_IF_ERROR(CheckDefined(fn, t));
  if (t.ndim() == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": a scalar (shape []) cannot be split"));
  }
  const int64_t n = t.dim(dim);
  if (n % comm.size() != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        fn, ": dimension ", dim, " of shape ", ShapeToString(t.shape()), " is ",
        n, ", not divisible by the group size ", comm.size()));
  }
  return absl::OkStatus();
}

// The sum of x over the group, as a new tensor.
absl::StatusOr<Tensor> AllReduceCopy(absl::string_view fn, Communicator& comm,
                                     const Tensor& x) {
  RETURN_IF_ERROR(CheckDefined(fn, x));
  if (comm.size() == 1) return x;
  Tensor out = x.Clone();
  RETURN_IF_ERROR(comm.AllReduce(out, ReduceOp::kSum));
  return out;
}

// This rank's chunk of `dim` (0 or -1), contiguous.
absl::StatusOr<Tensor> OwnChunk(absl::string_view fn, Communicator& comm,
                                const Tensor& x, int dim) {
  RETURN_IF_ERROR(CheckSplittable(fn, comm, x, dim));
  if (comm.size() == 1) return x;
  const int64_t chunk = x.dim(dim) / comm.size();
  ASSIGN_OR_RETURN(Tensor view, x.Narrow(dim, comm.rank() * chunk, chunk));
  return view.Contiguous();
}

// [n, ...] on every rank -> [size * n, ...].
absl::StatusOr<Tensor> AllGatherDim0(absl::string_view fn, Communicator& comm,
                                     const Tensor& x) {
  RETURN_IF_ERROR(CheckDefined(fn, x));
  if (x.ndim() == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": a scalar (shape []) has no dim 0 to gather"));
  }
  if (comm.size() == 1) return x;
  Shape out_shape = x.shape();
  out_shape[0] *= comm.size();
  Tensor out = Tensor::Empty(out_shape, x.dtype(), x.device());
  RETURN_IF_ERROR(comm.AllGather(x.Contiguous(), out));
  return out;
}

// [size * n, ...] partial sums -> this rank's [n, ...] of the sum.
absl::StatusOr<Tensor> ReduceScatterDim0(absl::string_view fn,
                                         Communicator& comm, const Tensor& x) {
  RETURN_IF_ERROR(CheckSplittable(fn, comm, x, 0));
  if (comm.size() == 1) return x;
  Shape out_shape = x.shape();
  out_shape[0] /= comm.size();
  Tensor out = Tensor::Empty(out_shape, x.dtype(), x.device());
  RETURN_IF_ERROR(comm.ReduceScatter(x.Contiguous(), out, ReduceOp::kSum));
  return out;
}

// [..., m] on every rank -> [..., size * m]. The communicator gathers along
// dim 0, so the pieces arrive as [size * rows, m] and are re-joined along the
// last dim.
absl::StatusOr<Tensor> AllGatherLastDim(absl::string_view fn,
                                        Communicator& comm, const Tensor& x) {
  RETURN_IF_ERROR(CheckDefined(fn, x));
  if (x.ndim() == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": a scalar (shape []) has no last dim to gather"));
  }
  if (comm.size() == 1) return x;
  const int64_t m = x.dim(-1);
  const int64_t rows = m == 0 ? 0 : x.numel() / m;
  ASSIGN_OR_RETURN(Tensor flat, x.Contiguous().Reshape({rows, m}));
  Tensor gathered =
      Tensor::Empty({comm.size() * rows, m}, x.dtype(), x.device());
  RETURN_IF_ERROR(comm.AllGather(flat, gathered));
  ASSIGN_OR_RETURN(std::vector<Tensor> pieces,
                   ops::Split(gathered, comm.size(), 0));
  ASSIGN_OR_RETURN(Tensor joined, ops::Concat(pieces, 1));
  Shape out_shape = x.shape();
  out_shape.back() = comm.size() * m;
  return joined.Reshape(out_shape);
}

}  // namespace

absl::StatusOr<Tensor> CopyToTensorParallel::Forward(Communicator& comm,
                                                     const Tensor& x) {
  RETURN_IF_ERROR(CheckDefined("CopyToTensorParallel::Forward", x));
  return x;
}

absl::StatusOr<Tensor> CopyToTensorParallel::Backward(Communicator& comm,
                                                      const Tensor& grad) {
  return AllReduceCopy("CopyToTensorParallel::Backward", comm, grad);
}

absl::StatusOr<Tensor> ReduceFromTensorParallel::Forward(Communicator& comm,
                                                         const Tensor& x) {
  return AllReduceCopy("ReduceFromTensorParallel::Forward", comm, x);
}

absl::StatusOr<Tensor> ReduceFromTensorParallel::Backward(Communicator& comm,
                                                          const Tensor& grad) {
  RETURN_IF_ERROR(CheckDefined("ReduceFromTensorParallel::Backward", grad));
  return grad;
}

absl::StatusOr<Tensor> ScatterToTensorParallel::Forward(Communicator& comm,
                                                        const Tensor& x) {
  return OwnChunk("ScatterToTensorParallel::Forward", comm, x, -1);
}

absl::StatusOr<Tensor> ScatterToTensorParallel::Backward(Communicator& comm,
                                                         const Tensor& grad) {
  return AllGatherLastDim("ScatterToTensorParallel::Backward", comm, grad);
}

absl::StatusOr<Tensor> GatherFromTensorParallel::Forward(Communicator& comm,
                                                         const Tensor& x) {
  return AllGatherLastDim("GatherFromTensorParallel::Forward", comm, x);
}

absl::StatusOr<Tensor> GatherFromTensorParallel::Backward(Communicator& comm,
                                                          const Tensor& grad) {
  return OwnChunk("GatherFromTensorParallel::Backward", comm, grad, -1);
}

absl::StatusOr<Tensor> ScatterToSequenceParallel::Forward(Communicator& comm,
                                                          const Tensor& x) {
  return OwnChunk("ScatterToSequenceParallel::Forward", comm, x, 0);
}

absl::StatusOr<Tensor> ScatterToSequenceParallel::Backward(Communicator& comm,
                                                           const Tensor& grad) {
  return AllGatherDim0("ScatterToSequenceParallel::Backward", comm, grad);
}

absl::StatusOr<Tensor> GatherFromSequenceParallel::Forward(Communicator& comm,
                                                           const Tensor& x) {
  return AllGatherDim0("GatherFromSequenceParallel::Forward", comm, x);
}

absl::StatusOr<Tensor> GatherFromSequenceParallel::Backward(
    Communicator& comm, const Tensor& grad) {
  return ReduceScatterDim0("GatherFromSequenceParallel::Backward", comm, grad);
}

absl::StatusOr<Tensor> ReduceScatterToSequenceParallel::Forward(
    Communicator& comm, const Tensor& x) {
  return ReduceScatterDim0("ReduceScatterToSequenceParallel::Forward", comm, x);
}

absl::StatusOr<Tensor> ReduceScatterToSequenceParallel::Backward(
    Communicator& comm, const Tensor& grad) {
  return AllGatherDim0("ReduceScatterToSequenceParallel::Backward", comm, grad);
}

}  // namespace tp
