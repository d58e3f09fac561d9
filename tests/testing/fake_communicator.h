// FakeCommunicator: a deterministic, in-process Communicator for testing
// layers without a backend ("fake"). It can fail chosen calls and delay every
// call.
//
// Two ways to use it:
//   * A group of one: FakeCommunicator() behaves as every backend does with
//     size() == 1 (collectives copy or leave the tensor; Send/Recv have no
//     peer and return kInvalidArgument).
//   * A simulated group of N ranks over shared memory: FakeCommunicator::
//     CreateGroup(N) returns N communicators over one FakeGroup; drive each
//     from its own thread (RunRanks, or std::thread). A collective waits for
//     the N contributions of the same call number, then every rank computes
//     its result from all of them in rank order (reductions: each step in
//     the element type, fp16/bf16 through float32 and rounded to nearest
//     even, kAvg = sum then divide, truncating for integers -- the rules of
//     comm/communicator.h), so results are identical on every rank and from
//     run to run.
//
// Errors, as a real backend reports them: arguments that differ between ranks
// (collective, dtype, shape, root, op) -> kInvalidArgument on every rank,
// naming the ranks; bad local arguments -> kInvalidArgument on every rank; a
// rank that does not arrive within the group's timeout -> kDeadlineExceeded
// naming it. Injected failures (FakeCommunicatorOptions::fail_on_call): that
// rank's call returns `failure` without doing anything; its peers in that
// collective get kUnavailable naming the rank (like a peer that died). Send
// is buffered: it returns as soon as the tensor is queued (Recv checks the
// shape and dtype and reports a mismatch on the receiver only).
//
// Thread safety: one thread per communicator, like every Communicator; the
// group is shared safely.
//
// Example:
//   auto comms = tp::FakeCommunicator::CreateGroup(2);
//   std::thread t1([&] { CHECK(comms[1]->AllReduce(b).ok()); });
//   CHECK(comms[0]->AllReduce(a).ok());   // a == b == a0 + b0
//   t1.join();
#ifndef TENSOR_PARALLEL_TESTS_TESTING_FAKE_COMMUNICATOR_H_
#define TENSOR_PARALLEL_TESTS_TESTING_FAKE_COMMUNICATOR_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "comm/communicator.h"
#include "runtime/tensor.h"

namespace tp {

// The shared state of a simulated group (opaque; see fake_communicator.cc).
class FakeGroup;

struct FakeCommunicatorOptions {
  // 0-based index, in this rank's call order (collectives, Send and Recv
  // together), of the call that fails with `failure`. -1: none.
  int64_t fail_on_call = -1;
  // The status the failing call returns. Default kUnavailable.
  absl::Status failure = absl::UnavailableError("injected failure");
  // Slept at the start of every call (simulates a slow rank). Default none.
  absl::Duration delay = absl::ZeroDuration();
};

class FakeCommunicator final : public Communicator {
 public:
  // A group of one.
  explicit FakeCommunicator(FakeCommunicatorOptions options = {});

  // `size` communicators over a new group whose waits end after `timeout`
  // (kDeadlineExceeded). options[r] applies to rank r (missing: defaults).
  static std::vector<std::unique_ptr<FakeCommunicator>> CreateGroup(
      int size, absl::Duration timeout = absl::Seconds(10),
      std::vector<FakeCommunicatorOptions> options = {});

  ~FakeCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  absl::string_view backend() const override { return "fake"; }

  absl::Status AllReduce(Tensor& t, ReduceOp op = ReduceOp::kSum) override;
  absl::Status Broadcast(Tensor& t, int root) override;
  absl::Status AllGather(const Tensor& in, Tensor& out) override;
  absl::Status ReduceScatter(const Tensor& in, Tensor& out,
                             ReduceOp op = ReduceOp::kSum) override;
  absl::Status Barrier() override;
  absl::Status Send(const Tensor& t, int dst) override;
  absl::Status Recv(Tensor& t, int src) override;

  // Calls made so far by this rank (including failed ones).
  int64_t calls() const { return calls_; }

 private:
  FakeCommunicator(std::shared_ptr<FakeGroup> group, int rank,
                   FakeCommunicatorOptions options);
  // Counts the call, sleeps the delay; the injected failure if it is due.
  absl::Status BeginCall();

  std::shared_ptr<FakeGroup> group_;
  int rank_;
  int size_;
  FakeCommunicatorOptions options_;
  int64_t calls_ = 0;
  int64_t collectives_ = 0;
};

}  // namespace tp

#endif  // TENSOR_PARALLEL_TESTS_TESTING_FAKE_COMMUNICATOR_H_
