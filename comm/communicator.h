// Communicator: one group of ranks on one backend, and the collectives the
// parallel layers call. Layers depend on this interface only; backends
// (backends/gloo, later backends/nccl and plugins) implement it.
//
// Contract (every backend):
//   * Call order. Every rank of the group calls the same collectives in the
//     same order, with tensors of the same shape and dtype (AllGather's
//     output and ReduceScatter's input are size() times the other side along
//     dim 0). A mismatch is reported as an error on every rank (kInvalidArgument
//     naming the rank and the shapes when the backend can detect it, else
//     kDeadlineExceeded); it never hangs past the timeout and never returns a
//     wrong result as OK.
//   * Blocking. On the CPU every call returns when its result is in the output
//     tensor and the input may be reused. (CUDA backends will be stream-ordered;
//     their class comment says so.)
//   * Timeouts. Every call is bounded by the group's timeout
//     (TensorParallelConfig::timeout): kDeadlineExceeded when a peer does not
//     arrive in time, kUnavailable when a peer's connection is lost, kInternal
//     for other backend failures. After an error the group is unusable: tear it
//     down (destroy the communicator) and rebuild it.
//   * Thread safety. One thread at a time per communicator; use one
//     communicator per thread for concurrent collectives.
//   * Buffers. Tensors are borrowed for the duration of the call only. They
//     must be contiguous and on the backend's device.
//
// Example:
//   tp::Communicator& tp_group = manager->tensor_parallel();
//   RETURN_IF_ERROR(tp_group.AllReduce(partial_output));   // sum over ranks
#ifndef TENSOR_PARALLEL_COMM_COMMUNICATOR_H_
#define TENSOR_PARALLEL_COMM_COMMUNICATOR_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "runtime/tensor.h"

namespace tp {

// Reductions. kAvg divides the sum by size(); for integer dtypes the quotient
// is rounded toward zero (C++ integer division), so 5 summed over 2 ranks
// averages to 2 and -5 to -2.
enum class ReduceOp { kSum, kAvg, kMax, kMin, kProduct };

// "sum", "avg", "max", "min", "product".
absl::string_view ReduceOpName(ReduceOp op);

class Communicator {
 public:
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  // This process's rank in the group, in [0, size()).
  virtual int rank() const = 0;
  // Number of ranks in the group.
  virtual int size() const = 0;
  // The registered name of the backend ("gloo", "nccl", ...).
  virtual absl::string_view backend() const = 0;

  // Reduces `t` element-wise over all ranks, in place, on every rank.
  virtual absl::Status AllReduce(Tensor& t, ReduceOp op = ReduceOp::kSum) = 0;
  // Copies `t` of rank `root` into `t` of every other rank.
  virtual absl::Status Broadcast(Tensor& t, int root) = 0;
  // `out` = the `in` of every rank concatenated along dim 0 in rank order;
  // out.dim(0) == size() * in.dim(0).
  virtual absl::Status AllGather(const Tensor& in, Tensor& out) = 0;
  // Reduces `in` over ranks and gives rank r the r-th of size() equal chunks
  // along dim 0; in.dim(0) == size() * out.dim(0).
  virtual absl::Status ReduceScatter(const Tensor& in, Tensor& out,
                                     ReduceOp op = ReduceOp::kSum) = 0;
  // Returns when every rank has entered the barrier.
  virtual absl::Status Barrier() = 0;
  // Point-to-point: sends `t` to rank `dst`, which posts a matching Recv with
  // the same shape and dtype. Messages between a pair arrive in order.
  virtual absl::Status Send(const Tensor& t, int dst) = 0;
  virtual absl::Status Recv(Tensor& t, int src) = 0;

 protected:
  Communicator() = default;
};

// The seed's utilities, as thin functions over a Communicator.
// AllReduceSum(comm, t) == comm.AllReduce(t, ReduceOp::kSum).
absl::Status AllReduceSum(Communicator& comm, Tensor& t);
// BroadcastTensor(comm, t, root) == comm.Broadcast(t, root).
absl::Status BroadcastTensor(Communicator& comm, Tensor& t, int root = 0);
// SynchronizeAcrossRanks(comm) == comm.Barrier().
absl::Status SynchronizeAcrossRanks(Communicator& comm);

}  // namespace tp

#endif  // TENSOR_PARALLEL_COMM_COMMUNICATOR_H_
