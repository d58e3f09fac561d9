// The gloo backend's consistency-check modes (gloo_communicator.h,
// "Consistency check"): which calls exchange the envelope, that calls which
// skip it still give exact results, and that ranks which disagree after
// skipping get kInvalidArgument on every rank after the timeout (never an
// abort inside Gloo, a hang or a wrong result).
#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "backends/gloo/gloo_communicator.h"
#include "gtest/gtest.h"
#include "runtime/status_macros.h"
#include "tests/testing/collective_checks.h"
#include "tests/testing/communicator_testing.h"
#include "tests/testing/run_ranks.h"

namespace tp {
namespace {

TestCommunicatorOptions Mode(ConsistencyCheck check, absl::Duration timeout) {
  TestCommunicatorOptions options;
  options.timeout = timeout;
  options.backend_options["gloo.check_consistency"] =
      std::string(ConsistencyCheckName(check));
  return options;
}

absl::Status ExpectCode(const absl::Status& s, absl::StatusCode code,
                        const std::vector<std::string>& snippets) {
  if (s.code() != code) {
    return absl::InternalError(absl::StrCat(
        "expected ", absl::StatusCodeToString(code), ", got ", s.ToString()));
  }
  for (const std::string& snippet : snippets) {
    if (!absl::StrContains(s.message(), snippet)) {
      return absl::InternalError(
          absl::StrCat("message lacks \"", snippet, "\": ", s.ToString()));
    }
  }
  return absl::OkStatus();
}

// Checks that `comm` has exchanged the envelope `expected` times so far.
absl::Status ExpectExchanges(Communicator& comm, int64_t expected,
                             absl::string_view after) {
  auto* gloo = dynamic_cast<GlooCommunicator*>(&comm);
  if (gloo == nullptr) return absl::InternalError("not a GlooCommunicator");
  if (gloo->envelope_exchanges() != expected) {
    return absl::InternalError(
        absl::StrCat("after ", after, ": ", gloo->envelope_exchanges(),
                     " envelope exchanges, expected ", expected));
  }
  return absl::OkStatus();
}

constexpr int64_t kBig = 5000;  // 20 KB of float32: above the inline payload

// A fixed call sequence with exact results, counting envelope exchanges.
// `per_call`: how many exchanges each call adds (kAlways: every call; kOff:
// none); with kFirstUse, `first_use_counts` gives the running total.
absl::Status RunSequence(int rank, int world, Communicator& c,
                         ConsistencyCheck mode) {
  int64_t expected = 0;
  // kFirstUse: `is_new` says whether this call's signature is new (or small,
  // or a Barrier), i.e. whether it exchanges the envelope.
  auto step = [&](bool is_new) {
    if (mode == ConsistencyCheck::kAlways ||
        (mode == ConsistencyCheck::kFirstUse && is_new)) {
      ++expected;
    }
  };
  auto all_reduce = [&](int64_t n, ReduceOp op, bool is_new) -> absl::Status {
    Tensor t = ReduceInput(op, DType::kFloat32, rank, n);
    RETURN_IF_ERROR(c.AllReduce(t, op));
    step(is_new);
    RETURN_IF_ERROR(CheckValues(t,
                                ExpectedReduce(op, DType::kFloat32, world, n),
                                absl::StrCat("AllReduce of ", n)));
    return ExpectExchanges(c, expected, absl::StrCat("AllReduce of ", n));
  };
  RETURN_IF_ERROR(all_reduce(kBig, ReduceOp::kSum, true));
  RETURN_IF_ERROR(all_reduce(kBig, ReduceOp::kSum, false));
  RETURN_IF_ERROR(all_reduce(kBig, ReduceOp::kSum, false));
  RETURN_IF_ERROR(all_reduce(kBig + 1, ReduceOp::kSum, true));
  RETURN_IF_ERROR(all_reduce(kBig, ReduceOp::kSum, false));  // still known
  RETURN_IF_ERROR(all_reduce(kBig, ReduceOp::kMax, true));   // new op
  RETURN_IF_ERROR(all_reduce(4, ReduceOp::kSum, true));      // inline: always
  RETURN_IF_ERROR(all_reduce(4, ReduceOp::kSum, true));

  auto reduce_scatter = [&](int64_t n, bool is_new) -> absl::Status {
    const Tensor in =
        ReduceInput(ReduceOp::kSum, DType::kFloat32, rank, world * n);
    Tensor out = Tensor::Zeros({n}, DType::kFloat32);
    RETURN_IF_ERROR(c.ReduceScatter(in, out));
    step(is_new);
    RETURN_IF_ERROR(CheckValues(
        out,
        ExpectedReduce(ReduceOp::kSum, DType::kFloat32, world, n, rank * n),
        absl::StrCat("ReduceScatter of ", n)));
    return ExpectExchanges(c, expected, absl::StrCat("ReduceScatter of ", n));
  };
  RETURN_IF_ERROR(reduce_scatter(kBig, true));
  RETURN_IF_ERROR(reduce_scatter(kBig, false));
  RETURN_IF_ERROR(reduce_scatter(kBig + 2, true));
  RETURN_IF_ERROR(reduce_scatter(kBig, false));  // still known

  auto all_gather = [&](int64_t n, bool is_new) -> absl::Status {
    const Tensor in = PatternInput(DType::kFloat32, rank, {n});
    Tensor out = Tensor::Zeros({world * n}, DType::kFloat32);
    RETURN_IF_ERROR(c.AllGather(in, out));
    step(is_new);
    std::vector<double> want;
    for (int r = 0; r < world; ++r) {
      const std::vector<double> part = ExpectedPattern(DType::kFloat32, r, n);
      want.insert(want.end(), part.begin(), part.end());
    }
    RETURN_IF_ERROR(CheckValues(out, want, absl::StrCat("AllGather of ", n)));
    return ExpectExchanges(c, expected, absl::StrCat("AllGather of ", n));
  };
  RETURN_IF_ERROR(all_gather(kBig, true));
  RETURN_IF_ERROR(all_gather(kBig, false));

  auto broadcast = [&](int root, int64_t n, bool is_new) -> absl::Status {
    Tensor t = PatternInput(DType::kFloat32, rank, {n});
    RETURN_IF_ERROR(c.Broadcast(t, root));
    step(is_new);
    RETURN_IF_ERROR(CheckValues(t, ExpectedPattern(DType::kFloat32, root, n),
                                absl::StrCat("Broadcast from ", root)));
    return ExpectExchanges(c, expected, absl::StrCat("Broadcast from ", root));
  };
  RETURN_IF_ERROR(broadcast(0, kBig, true));
  RETURN_IF_ERROR(broadcast(0, kBig, false));
  RETURN_IF_ERROR(broadcast(world - 1, kBig, world > 1));
  RETURN_IF_ERROR(broadcast(0, kBig, false));
  // A small broadcast is carried by its first envelope, then sent by Gloo.
  RETURN_IF_ERROR(broadcast(0, 3, true));
  RETURN_IF_ERROR(broadcast(0, 3, false));

  RETURN_IF_ERROR(c.Barrier());
  step(true);  // a checked Barrier is the envelope all-gather itself
  return ExpectExchanges(c, expected, "Barrier");
}

TEST(GlooConsistencyTest, FirstUseExchangesOnlyForNewSignatures) {
  for (ConsistencyCheck mode :
       {ConsistencyCheck::kFirstUse, ConsistencyCheck::kAlways,
        ConsistencyCheck::kOff}) {
    for (int world : {2, 3, 4}) {
      absl::Status status = AllRanksOk(RunRanks(
          world, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
            ASSIGN_OR_RETURN(
                std::unique_ptr<Communicator> comm,
                CreateTestCommunicator("gloo", rank, world, store,
                                       Mode(mode, absl::Seconds(30))));
            return RunSequence(rank, world, *comm, mode);
          }));
      EXPECT_TRUE(status.ok()) << ConsistencyCheckName(mode) << ", world "
                               << world << ": " << status;
    }
  }
}

TEST(GlooConsistencyTest, DefaultIsFirstUse) {
  EXPECT_EQ(GlooOptions().check_consistency, ConsistencyCheck::kFirstUse);
  absl::StatusOr<GlooOptions> o = ParseGlooOptions({});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->check_consistency, ConsistencyCheck::kFirstUse);
  const std::vector<std::pair<std::string, ConsistencyCheck>> spellings = {
      {"first_use", ConsistencyCheck::kFirstUse},
      {"ALWAYS", ConsistencyCheck::kAlways},
      {"true", ConsistencyCheck::kAlways},
      {"1", ConsistencyCheck::kAlways},
      {"off", ConsistencyCheck::kOff},
      {"False", ConsistencyCheck::kOff},
      {"0", ConsistencyCheck::kOff}};
  for (const auto& [text, mode] : spellings) {
    o = ParseGlooOptions({{"gloo.check_consistency", text}});
    ASSERT_TRUE(o.ok()) << text << ": " << o.status();
    EXPECT_EQ(o->check_consistency, mode) << text;
  }
  o = ParseGlooOptions({{"gloo.check_consistency", "sometimes"}});
  EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(o.status().message(), "sometimes"));
}

// Every rank runs `setup` (calls all ranks agree on, so that their signatures
// are verified); then rank 1 runs `odd` while the others run `even`. Every
// rank must get kInvalidArgument containing `snippets` between the timeout
// and the timeout + 3 s after the first rank started the call, and the group
// must be unusable afterwards. (A rank that starts late can fail early: the
// first rank to time out closes its connections.)
template <typename Setup, typename Even, typename Odd>
void ExpectLateMismatch(int world, ConsistencyCheck mode, Setup setup,
                        Even even, Odd odd,
                        const std::vector<std::string>& snippets) {
  const absl::Duration timeout = absl::Seconds(2);
  std::atomic<int64_t> first_start_ns{std::numeric_limits<int64_t>::max()};
  absl::Status status = AllRanksOk(RunRanks(
      world, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
        ASSIGN_OR_RETURN(std::unique_ptr<Communicator> comm,
                         CreateTestCommunicator("gloo", rank, world, store,
                                                Mode(mode, timeout)));
        RETURN_IF_ERROR(setup(*comm));
        const int64_t start_ns = absl::ToUnixNanos(absl::Now());
        int64_t seen = first_start_ns.load();
        while (start_ns < seen &&
               !first_start_ns.compare_exchange_weak(seen, start_ns)) {
        }
        const absl::Status s = rank == 1 ? odd(*comm) : even(*comm);
        const absl::Duration took =
            absl::Now() - absl::FromUnixNanos(first_start_ns.load());
        RETURN_IF_ERROR(
            ExpectCode(s, absl::StatusCode::kInvalidArgument, snippets));
        if (took < timeout - absl::Milliseconds(100) ||
            took > timeout + absl::Seconds(3)) {
          return absl::InternalError(absl::StrCat(
              "rank ", rank, " failed after ", absl::FormatDuration(took)));
        }
        return ExpectCode(comm->Barrier(),
                          absl::StatusCode::kFailedPrecondition,
                          {"unusable", "disagree"});
      }));
  EXPECT_TRUE(status.ok()) << ConsistencyCheckName(mode) << ", world " << world
                           << ": " << status;
}

absl::Status AllReduceOf(Communicator& c, int64_t n,
                         DType dtype = DType::kFloat32) {
  Tensor t = Tensor::Zeros({n}, dtype);
  return c.AllReduce(t);
}

TEST(GlooConsistencyTest, AllReduceShapesThatDisagreeAfterVerification) {
  // Both shapes are verified, so every rank skips the envelope: the
  // fingerprint tags keep the two calls apart, and the timeout is diagnosed.
  for (int world : {2, 3}) {
    ExpectLateMismatch(
        world, ConsistencyCheck::kFirstUse,
        [](Communicator& c) -> absl::Status {
          RETURN_IF_ERROR(AllReduceOf(c, kBig));
          return AllReduceOf(c, kBig + 3);
        },
        [](Communicator& c) { return AllReduceOf(c, kBig); },
        [](Communicator& c) { return AllReduceOf(c, kBig + 3); },
        {"disagree", "[5000]", "[5003]", "rank 1", "timed out"});
  }
}

TEST(GlooConsistencyTest, SkippingAndCheckingRanksDisagree) {
  // Rank 1's shape is new (it exchanges the envelope), rank 0's is verified
  // (it sends data): neither protocol can complete, so both time out.
  ExpectLateMismatch(
      2, ConsistencyCheck::kFirstUse,
      [](Communicator& c) { return AllReduceOf(c, kBig); },
      [](Communicator& c) { return AllReduceOf(c, kBig); },
      [](Communicator& c) { return AllReduceOf(c, kBig + 7); },
      {"disagree", "[5000]", "[5007]"});
}

TEST(GlooConsistencyTest, SameBytesDifferentDTypeIsNotAWrongResult) {
  // float32 and int32 tensors of one shape have the same bytes; without the
  // fingerprint, Gloo would reduce one as the other.
  ExpectLateMismatch(
      2, ConsistencyCheck::kFirstUse,
      [](Communicator& c) -> absl::Status {
        RETURN_IF_ERROR(AllReduceOf(c, kBig, DType::kFloat32));
        return AllReduceOf(c, kBig, DType::kInt32);
      },
      [](Communicator& c) { return AllReduceOf(c, kBig, DType::kFloat32); },
      [](Communicator& c) { return AllReduceOf(c, kBig, DType::kInt32); },
      {"float32", "int32"});
}

TEST(GlooConsistencyTest, AllGatherAndBroadcastDisagreeAfterVerification) {
  auto gather = [](Communicator& c, int64_t n) {
    Tensor in = Tensor::Zeros({n}, DType::kFloat32);
    Tensor out = Tensor::Zeros({c.size() * n}, DType::kFloat32);
    return c.AllGather(in, out);
  };
  ExpectLateMismatch(
      3, ConsistencyCheck::kFirstUse,
      [&](Communicator& c) -> absl::Status {
        RETURN_IF_ERROR(gather(c, kBig));
        return gather(c, kBig * 2);
      },
      [&](Communicator& c) { return gather(c, kBig); },
      [&](Communicator& c) { return gather(c, kBig * 2); },
      {"AllGather", "[5000]", "[10000]", "ranks 0, 2"});
  for (int64_t n : {int64_t{3}, kBig}) {  // small broadcasts skip too
    auto broadcast = [n](Communicator& c, int root) {
      Tensor t = Tensor::Zeros({n}, DType::kFloat32);
      return c.Broadcast(t, root);
    };
    ExpectLateMismatch(
        2, ConsistencyCheck::kFirstUse,
        [&](Communicator& c) -> absl::Status {
          RETURN_IF_ERROR(broadcast(c, 0));
          return broadcast(c, 1);
        },
        [&](Communicator& c) { return broadcast(c, 0); },
        [&](Communicator& c) { return broadcast(c, 1); }, {"root 0", "root 1"});
  }
}

TEST(GlooConsistencyTest, ReduceScatterDisagreesAfterVerification) {
  auto reduce_scatter = [](Communicator& c, int64_t n) {
    Tensor in = Tensor::Zeros({c.size() * n}, DType::kFloat32);
    Tensor out = Tensor::Zeros({n}, DType::kFloat32);
    return c.ReduceScatter(in, out);
  };
  // Both shapes verified: both ranks skip the envelope and their ring slots
  // differ. Then a new shape on rank 1: it exchanges the envelope while rank
  // 0 sends data.
  ExpectLateMismatch(
      3, ConsistencyCheck::kFirstUse,
      [&](Communicator& c) -> absl::Status {
        RETURN_IF_ERROR(reduce_scatter(c, kBig));
        return reduce_scatter(c, kBig + 1);
      },
      [&](Communicator& c) { return reduce_scatter(c, kBig); },
      [&](Communicator& c) { return reduce_scatter(c, kBig + 1); },
      {"ReduceScatter", "[15000]", "[15003]", "ranks 0, 2"});
  ExpectLateMismatch(
      2, ConsistencyCheck::kFirstUse,
      [&](Communicator& c) { return reduce_scatter(c, kBig); },
      [&](Communicator& c) { return reduce_scatter(c, kBig); },
      [&](Communicator& c) { return reduce_scatter(c, kBig + 1); },
      {"ReduceScatter", "[10000]", "[10002]"});
}

TEST(GlooConsistencyTest, BadArgumentsOnAVerifiedSignatureAreNamed) {
  // Rank 1's output is one element short on a call its peers have verified:
  // it exchanges the envelope (its error is not part of the signature), they
  // send data; all time out and the diagnosis names rank 1's error.
  auto gather = [](Communicator& c, int64_t out_elements) {
    Tensor in = Tensor::Zeros({kBig}, DType::kFloat32);
    Tensor out = Tensor::Zeros({out_elements}, DType::kFloat32);
    return c.AllGather(in, out);
  };
  ExpectLateMismatch(
      3, ConsistencyCheck::kFirstUse,
      [&](Communicator& c) { return gather(c, c.size() * kBig); },
      [&](Communicator& c) { return gather(c, c.size() * kBig); },
      [&](Communicator& c) { return gather(c, c.size() * kBig - 1); },
      {"rejected there", "[14999]", "rank 1", "ranks 0, 2"});
}

TEST(GlooConsistencyTest, OffModeBadArgumentsAreNamedAfterTheTimeout) {
  // Without a check the rank with bad arguments fails at once; its peers
  // wait for it until the timeout, then find its error in the store.
  const absl::Duration timeout = absl::Seconds(1);
  absl::Status status = AllRanksOk(
      RunRanks(2, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
        ASSIGN_OR_RETURN(
            std::unique_ptr<Communicator> comm,
            CreateTestCommunicator("gloo", rank, 2, store,
                                   Mode(ConsistencyCheck::kOff, timeout)));
        Tensor in = Tensor::Zeros({kBig}, DType::kFloat32);
        Tensor out =
            Tensor::Zeros({2 * kBig - (rank == 1 ? 1 : 0)}, DType::kFloat32);
        const absl::Status s = comm->AllGather(in, out);
        if (rank == 1) {
          return ExpectCode(s, absl::StatusCode::kInvalidArgument, {"[9999]"});
        }
        return ExpectCode(s, absl::StatusCode::kInvalidArgument,
                          {"rejected there", "[9999]", "rank 1"});
      }));
  EXPECT_TRUE(status.ok()) << status;
}

TEST(GlooConsistencyTest, OffModeMismatchIsAnErrorNotAnAbort) {
  // Without any envelope, the fingerprint tags alone keep mismatched
  // AllReduce calls apart (Gloo would otherwise abort the process).
  ExpectLateMismatch(
      2, ConsistencyCheck::kOff, [](Communicator&) { return absl::OkStatus(); },
      [](Communicator& c) { return AllReduceOf(c, kBig); },
      [](Communicator& c) { return AllReduceOf(c, kBig + 3); },
      {"disagree", "[5000]", "[5003]"});
  // Small tensors take Gloo's own algorithms too when nothing is checked.
  ExpectLateMismatch(
      2, ConsistencyCheck::kOff, [](Communicator&) { return absl::OkStatus(); },
      [](Communicator& c) { return AllReduceOf(c, 4); },
      [](Communicator& c) { return AllReduceOf(c, 5); },
      {"disagree", "[4]", "[5]"});
  auto reduce_scatter = [](Communicator& c, int64_t n) {
    Tensor in = Tensor::Zeros({c.size() * n}, DType::kFloat32);
    Tensor out = Tensor::Zeros({n}, DType::kFloat32);
    return c.ReduceScatter(in, out);
  };
  ExpectLateMismatch(
      2, ConsistencyCheck::kOff, [](Communicator&) { return absl::OkStatus(); },
      [&](Communicator& c) { return reduce_scatter(c, kBig); },
      [&](Communicator& c) { return reduce_scatter(c, kBig + 1); },
      {"disagree", "[10000]", "[10002]"});
}

// Without the header exchange, a Recv of another size or dtype than its Send
// (same byte count for float32 vs int32) fails on both ranks within the
// timeout + 1 s (kDeadlineExceeded, or kUnavailable on the side whose peer
// timed out first and closed the connection), with a hint, instead of
// "succeeding" with wrong data; a matching pair just before it works (after the
// timeout the communicator is unusable, as after any timeout).
TEST(GlooConsistencyTest, OffModeSendRecvMismatchTimesOutInsteadOfAborting) {
  const absl::Duration timeout = absl::Seconds(1);
  struct Case {
    DType recv_dtype;
    int64_t recv_elements;
  };
  for (const Case& c :
       {Case{DType::kFloat32, kBig + 3}, Case{DType::kInt32, kBig}}) {
    SCOPED_TRACE(DTypeName(c.recv_dtype));
    absl::Status status = AllRanksOk(RunRanks(
        2, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
          ASSIGN_OR_RETURN(
              std::unique_ptr<Communicator> comm,
              CreateTestCommunicator("gloo", rank, 2, store,
                                     Mode(ConsistencyCheck::kOff, timeout)));
          // A matching pair first: the slots of a good pair still meet.
          Tensor good = Tensor::Full({kBig}, 7.0, DType::kFloat32);
          if (rank == 0) {
            RETURN_IF_ERROR(comm->Send(good, 1));
          } else {
            Tensor in = Tensor::Zeros({kBig}, DType::kFloat32);
            RETURN_IF_ERROR(comm->Recv(in, 0));
            RETURN_IF_ERROR(CheckValues(in, std::vector<double>(kBig, 7.0),
                                        "matching Recv"));
          }
          const absl::Time start = absl::Now();
          absl::Status s;
          if (rank == 0) {
            s = comm->Send(good, 1);
          } else {
            Tensor in = Tensor::Zeros({c.recv_elements}, c.recv_dtype);
            s = comm->Recv(in, 0);
          }
          const absl::Duration took = absl::Now() - start;
          if (took > timeout + absl::Seconds(1)) {
            return absl::InternalError(
                absl::StrCat("returned after ", absl::FormatDuration(took)));
          }
          // The side that times out first closes the connection; the other
          // may see that (kUnavailable) before its own deadline.
          const absl::StatusCode code =
              s.code() == absl::StatusCode::kUnavailable
                  ? absl::StatusCode::kUnavailable
                  : absl::StatusCode::kDeadlineExceeded;
          return ExpectCode(
              s, code, {rank == 0 ? "Send" : "Recv", "check_consistency=off"});
        }));
    EXPECT_TRUE(status.ok()) << status;
  }
}

TEST(GlooConsistencyTest, TimeoutNamesTheRankThatNeverArrived) {
  const absl::Duration timeout = absl::Seconds(1);
  for (ConsistencyCheck mode :
       {ConsistencyCheck::kFirstUse, ConsistencyCheck::kOff}) {
    absl::Status status = AllRanksOk(RunRanks(
        3, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
          ASSIGN_OR_RETURN(std::unique_ptr<Communicator> comm,
                           CreateTestCommunicator("gloo", rank, 3, store,
                                                  Mode(mode, timeout)));
          RETURN_IF_ERROR(AllReduceOf(*comm, kBig));
          if (rank == 2) {
            // Alive but late: arrives after the others gave up.
            absl::SleepFor(timeout * 3);
            return absl::OkStatus();
          }
          return ExpectCode(AllReduceOf(*comm, kBig),
                            absl::StatusCode::kDeadlineExceeded,
                            {"rank(s) 2 did not reach", "AllReduce"});
        }));
    EXPECT_TRUE(status.ok()) << ConsistencyCheckName(mode) << ": " << status;
  }
}

}  // namespace
}  // namespace tp
