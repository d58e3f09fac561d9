// TimedCommunicator: a Communicator decorator that forwards every call to
// another communicator and accumulates, per kind of call, how many calls were
// made, how many bytes they carried and how long they took.
//
// Use it to split a program's time between compute and communication without
// touching the layers: hand the decorator (instead of the backend's
// communicator) to DistributedModelWrapper or a parallel layer, run, then read
// stats(). The time of a collective is measured on a monotonic clock from the
// call to its return, so it includes waiting for slower peers (load imbalance
// shows up as communication time on the faster ranks).
//
// Bytes per call: AllReduce / Broadcast / Send / Recv: the tensor's bytes;
// AllGather: the input's bytes; ReduceScatter: the output's bytes (each rank's
// share, as nccl-tests counts); Barrier: 0.
//
// Errors: none of its own; every call returns the wrapped communicator's
// status unchanged, and a failed call is counted and timed as well.
//
// Ownership and threading: the wrapped communicator is borrowed and must
// outlive the decorator. Like every Communicator, one thread at a time;
// stats() and Reset() must not run concurrently with a call.
//
// Example:
//   tp::TimedCommunicator timed(pg->tensor_parallel());
//   ASSIGN_OR_RETURN(auto model, tp::DistributedModelWrapper::Create(
//                                    std::move(serial), timed));
//   ... run ...
//   absl::Duration comm = timed.stats().total().time;
//   std::cout << timed.stats().ToString();   // one line per kind of call
#ifndef TENSOR_PARALLEL_COMM_TIMED_COMMUNICATOR_H_
#define TENSOR_PARALLEL_COMM_TIMED_COMMUNICATOR_H_

#include <array>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "comm/communicator.h"
#include "runtime/tensor.h"

namespace tp {

// The kinds of call a TimedCommunicator counts (indices into CommStats).
enum class CommOp {
  kAllReduce,
  kBroadcast,
  kAllGather,
  kReduceScatter,
  kBarrier,
  kSend,
  kRecv,
};
inline constexpr int kNumCommOps = 7;

// "all_reduce", "broadcast", "all_gather", "reduce_scatter", "barrier",
// "send", "recv".
absl::string_view CommOpName(CommOp op);

// Accumulated totals of one kind of call (or of all of them).
struct CommOpStats {
  int64_t calls = 0;
  int64_t bytes = 0;
  absl::Duration time = absl::ZeroDuration();
};

struct CommStats {
  std::array<CommOpStats, kNumCommOps> ops;

  const CommOpStats& op(CommOp o) const { return ops[static_cast<int>(o)]; }
  // The sum over every kind of call.
  CommOpStats total() const;
  // One line per kind of call that was made, e.g.
  // "all_reduce: 120 calls, 1.97 MB, 35.1 ms", then a "total: ..." line.
  std::string ToString() const;
};

class TimedCommunicator final : public Communicator {
 public:
  // `inner` is borrowed and must outlive this object.
  explicit TimedCommunicator(Communicator& inner) : inner_(inner) {}

  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  absl::string_view backend() const override { return inner_.backend(); }

  absl::Status AllReduce(Tensor& t, ReduceOp op = ReduceOp::kSum) override;
  absl::Status Broadcast(Tensor& t, int root) override;
  absl::Status AllGather(const Tensor& in, Tensor& out) override;
  absl::Status ReduceScatter(const Tensor& in, Tensor& out,
                             ReduceOp op = ReduceOp::kSum) override;
  absl::Status Barrier() override;
  absl::Status Send(const Tensor& t, int dst) override;
  absl::Status Recv(Tensor& t, int src) override;

  // The totals since construction or the last Reset().
  const CommStats& stats() const { return stats_; }
  // Zeroes the totals.
  void Reset() { stats_ = CommStats(); }

  Communicator& inner() const { return inner_; }

 private:
  // Runs `call`, adding its duration and `bytes` to the totals of `op`.
  template <typename Call>
  absl::Status Timed(CommOp op, int64_t bytes, Call&& call);

  Communicator& inner_;
  CommStats stats_;
};

}  // namespace tp

#endif  // TENSOR_PARALLEL_COMM_TIMED_COMMUNICATOR_H_
