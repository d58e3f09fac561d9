#include "comm/timed_communicator.h"

#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tp {

absl::string_view CommOpName(CommOp op) {
  switch (op) {
    case CommOp::kAllReduce:
      return "all_reduce";
    case CommOp::kBroadcast:
      return "broadcast";
    case CommOp::kAllGather:
      return "all_gather";
    case CommOp::kReduceScatter:
      return "reduce_scatter";
    case CommOp::kBarrier:
      return "barrier";
    case CommOp::kSend:
      return "send";
    case CommOp::kRecv:
      return "recv";
  }
  return "unknown";
}

CommOpStats CommStats::total() const {
  CommOpStats t;
  for (const CommOpStats& s : ops) {
    t.calls += s.calls;
    t.bytes += s.bytes;
    t.time += s.time;
  }
  return t;
}

namespace {

std::string Line(absl::string_view name, const CommOpStats& s) {
  return absl::StrFormat("%s: %d calls, %.3f MB, %.3f ms\n", name, s.calls,
                         s.bytes / 1e6, absl::ToDoubleMilliseconds(s.time));
}

}  // namespace

std::string CommStats::ToString() const {
  std::string out;
  for (int i = 0; i < kNumCommOps; ++i) {
    if (ops[i].calls == 0) continue;
    absl::StrAppend(&out, Line(CommOpName(static_cast<CommOp>(i)), ops[i]));
  }
  absl::StrAppend(&out, Line("total", total()));
  return out;
}

template <typename Call>
absl::Status TimedCommunicator::Timed(CommOp op, int64_t bytes, Call&& call) {
  // steady_clock: the wall clock (absl::Now) may jump.
  const auto start = std::chrono::steady_clock::now();
  absl::Status status = std::forward<Call>(call)();
  const auto end = std::chrono::steady_clock::now();
  CommOpStats& s = stats_.ops[static_cast<int>(op)];
  s.calls += 1;
  s.bytes += bytes;
  s.time += absl::FromChrono(end - start);
  return status;
}

namespace {
int64_t Bytes(const Tensor& t) {
  return t.defined() ? static_cast<int64_t>(t.nbytes()) : 0;
}
}  // namespace

absl::Status TimedCommunicator::AllReduce(Tensor& t, ReduceOp op) {
  return Timed(CommOp::kAllReduce, Bytes(t),
               [&] { return inner_.AllReduce(t, op); });
}

absl::Status TimedCommunicator::Broadcast(Tensor& t, int root) {
  return Timed(CommOp::kBroadcast, Bytes(t),
               [&] { return inner_.Broadcast(t, root); });
}

absl::Status TimedCommunicator::AllGather(const Tensor& in, Tensor& out) {
  return Timed(CommOp::kAllGather, Bytes(in),
               [&] { return inner_.AllGather(in, out); });
}

absl::Status TimedCommunicator::ReduceScatter(const Tensor& in, Tensor& out,
                                              ReduceOp op) {
  return Timed(CommOp::kReduceScatter, Bytes(out),
               [&] { return inner_.ReduceScatter(in, out, op); });
}

absl::Status TimedCommunicator::Barrier() {
  return Timed(CommOp::kBarrier, 0, [&] { return inner_.Barrier(); });
}

absl::Status TimedCommunicator::Send(const Tensor& t, int dst) {
  return Timed(CommOp::kSend, Bytes(t), [&] { return inner_.Send(t, dst); });
}

absl::Status TimedCommunicator::Recv(Tensor& t, int src) {
  return Timed(CommOp::kRecv, Bytes(t), [&] { return inner_.Recv(t, src); });
}

}  // namespace tp
