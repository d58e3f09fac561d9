#include "comm/communicator.h"

namespace tp {

absl::string_view ReduceOpName(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kAvg:
      return "avg";
    case ReduceOp::kMax:
      return "max";
    case ReduceOp::kMin:
      return "min";
    case ReduceOp::kProduct:
      return "product";
  }
  return "unknown";
}

absl::Status AllReduceSum(Communicator& comm, Tensor& t) {
  return comm.AllReduce(t, ReduceOp::kSum);
}

absl::Status BroadcastTensor(Communicator& comm, Tensor& t, int root) {
  return comm.Broadcast(t, root);
}

absl::Status SynchronizeAcrossRanks(Communicator& comm) { return comm.Barrier(); }

}  // namespace tp
