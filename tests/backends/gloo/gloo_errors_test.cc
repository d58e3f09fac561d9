// Error paths of the gloo backend: mismatched calls between ranks, bad local
// arguments, timeouts, a lost peer, rendezvous failures and bad options.
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "backends/gloo/gloo_communicator.h"
#include "gtest/gtest.h"
#include "runtime/hash_store.h"
#include "runtime/status_macros.h"
#include "tests/testing/collective_checks.h"
#include "tests/testing/communicator_testing.h"
#include "tests/testing/run_ranks.h"

// Gloo's CreateDeviceAttr leaks its getifaddrs/getaddrinfo lists when it
// throws (the unbindable-address cases below). Only LeakSanitizer builds
// (--config=asan) read this hook.
extern "C" const char* __lsan_default_suppressions() {
  return "leak:gloo::transport::tcp::CreateDeviceAttr\n";
}

namespace tp {
namespace {

TestCommunicatorOptions ShortTimeout(
    absl::Duration timeout = absl::Seconds(1)) {
  TestCommunicatorOptions options;
  options.timeout = timeout;
  return options;
}

// Checks that `s` has `code` and that its message contains every snippet.
absl::Status Expect(const absl::Status& s, absl::StatusCode code,
                    std::vector<std::string> snippets) {
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

// Rank 1 of `world` calls `odd` where every other rank calls `even`; every
// rank must get kInvalidArgument mentioning `snippets`, and then a matching
// AllReduce must work (the group stays usable).
template <typename Even, typename Odd>
void ExpectMismatchOnEveryRank(int world, Even even, Odd odd,
                               std::vector<std::string> snippets) {
  absl::Status status = AllRanksOk(RunRanks(
      world, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
        ASSIGN_OR_RETURN(
            std::unique_ptr<Communicator> comm,
            CreateTestCommunicator("gloo", rank, world, store,
                                   ShortTimeout(absl::Seconds(10))));
        const absl::Status s = rank == 1 ? odd(*comm) : even(*comm);
        RETURN_IF_ERROR(
            Expect(s, absl::StatusCode::kInvalidArgument, snippets));
        Tensor t = ReduceInput(ReduceOp::kSum, DType::kFloat32, rank, 3000);
        RETURN_IF_ERROR(comm->AllReduce(t));
        return CheckValues(
            t, ExpectedReduce(ReduceOp::kSum, DType::kFloat32, world, 3000),
            "AllReduce after the mismatch");
      }));
  EXPECT_TRUE(status.ok()) << status;
}

TEST(GlooErrorsTest, MismatchedShapesFailOnEveryRank) {
  for (int world : {2, 3}) {
    // Small (inline) and large tensors: neither may hang or crash.
    for (int64_t n : {int64_t{4}, int64_t{5000}}) {
      ExpectMismatchOnEveryRank(
          world,
          [&](Communicator& c) {
            Tensor t = Tensor::Zeros({n}, DType::kFloat32);
            return c.AllReduce(t);
          },
          [&](Communicator& c) {
            Tensor t = Tensor::Zeros({n + 3}, DType::kFloat32);
            return c.AllReduce(t);
          },
          {"rank 1", absl::StrCat("[", n, "]"), absl::StrCat("[", n + 3, "]"),
           "AllReduce"});
    }
  }
}

TEST(GlooErrorsTest, MismatchedDTypesFailOnEveryRank) {
  ExpectMismatchOnEveryRank(
      2,
      [](Communicator& c) {
        Tensor t = Tensor::Zeros({64}, DType::kFloat32);
        return c.AllReduce(t);
      },
      [](Communicator& c) {
        Tensor t = Tensor::Zeros({64}, DType::kFloat64);
        return c.AllReduce(t);
      },
      {"float32", "float64", "rank 1"});
}

TEST(GlooErrorsTest, MismatchedReduceOpsFailOnEveryRank) {
  ExpectMismatchOnEveryRank(
      2,
      [](Communicator& c) {
        Tensor t = Tensor::Zeros({64}, DType::kFloat32);
        return c.AllReduce(t, ReduceOp::kSum);
      },
      [](Communicator& c) {
        Tensor t = Tensor::Zeros({64}, DType::kFloat32);
        return c.AllReduce(t, ReduceOp::kMax);
      },
      {"sum", "max"});
}

TEST(GlooErrorsTest, DifferentCollectivesFailOnEveryRank) {
  ExpectMismatchOnEveryRank(
      3,
      [](Communicator& c) {
        Tensor t = Tensor::Zeros({10000}, DType::kFloat32);
        return c.AllReduce(t);
      },
      [](Communicator& c) {
        Tensor t = Tensor::Zeros({10000}, DType::kFloat32);
        return c.Broadcast(t, 0);
      },
      {"AllReduce", "Broadcast", "ranks 0, 2", "rank 1"});
  ExpectMismatchOnEveryRank(
      2, [](Communicator& c) { return c.Barrier(); },
      [](Communicator& c) {
        Tensor in = Tensor::Zeros({2}, DType::kInt32);
        Tensor out = Tensor::Zeros({4}, DType::kInt32);
        return c.AllGather(in, out);
      },
      {"Barrier", "AllGather"});
}

TEST(GlooErrorsTest, MismatchedBroadcastRootsFailOnEveryRank) {
  ExpectMismatchOnEveryRank(
      2,
      [](Communicator& c) {
        Tensor t = Tensor::Zeros({9000}, DType::kBFloat16);
        return c.Broadcast(t, 0);
      },
      [](Communicator& c) {
        Tensor t = Tensor::Zeros({9000}, DType::kBFloat16);
        return c.Broadcast(t, 1);
      },
      {"root 0", "root 1"});
}

TEST(GlooErrorsTest, OneRanksBadArgumentsFailEveryRank) {
  // Rank 1's AllGather output is too small: it rejects the call locally and
  // tells the others, who fail at once instead of timing out.
  ExpectMismatchOnEveryRank(
      2,
      [](Communicator& c) {
        Tensor in = Tensor::Zeros({3}, DType::kFloat32);
        Tensor out = Tensor::Zeros({6}, DType::kFloat32);
        return c.AllGather(in, out);
      },
      [](Communicator& c) {
        Tensor in = Tensor::Zeros({3}, DType::kFloat32);
        Tensor out = Tensor::Zeros({5}, DType::kFloat32);
        return c.AllGather(in, out);
      },
      {"rank 1", "[5]", "[6]"});
  // A non-contiguous view on rank 1.
  ExpectMismatchOnEveryRank(
      2,
      [](Communicator& c) {
        Tensor t = Tensor::Zeros({4, 2}, DType::kFloat32);
        return c.AllReduce(t);
      },
      [](Communicator& c) -> absl::Status {
        Tensor m = Tensor::Zeros({4, 4}, DType::kFloat32);
        ASSIGN_OR_RETURN(Tensor view, m.Narrow(1, 0, 2));
        return c.AllReduce(view);
      },
      {"rank 1", "not contiguous"});
  // ReduceScatter whose input is not size() times the output.
  ExpectMismatchOnEveryRank(
      2,
      [](Communicator& c) {
        Tensor in = Tensor::Zeros({8}, DType::kInt64);
        Tensor out = Tensor::Zeros({4}, DType::kInt64);
        return c.ReduceScatter(in, out);
      },
      [](Communicator& c) {
        Tensor in = Tensor::Zeros({8}, DType::kInt64);
        Tensor out = Tensor::Zeros({3}, DType::kInt64);
        return c.ReduceScatter(in, out);
      },
      {"rank 1", "ReduceScatter"});
}

TEST(GlooErrorsTest, BadRootOrPeerIsInvalidArgument) {
  absl::Status status = AllRanksOk(
      RunRanks(2, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
        ASSIGN_OR_RETURN(
            std::unique_ptr<Communicator> comm,
            CreateTestCommunicator("gloo", rank, 2, store,
                                   ShortTimeout(absl::Seconds(10))));
        Tensor t = Tensor::Zeros({4}, DType::kFloat32);
        RETURN_IF_ERROR(Expect(comm->Broadcast(t, 2),
                               absl::StatusCode::kInvalidArgument, {"root 2"}));
        RETURN_IF_ERROR(Expect(comm->Send(t, rank),
                               absl::StatusCode::kInvalidArgument,
                               {"another rank"}));
        RETURN_IF_ERROR(Expect(comm->Recv(t, -1),
                               absl::StatusCode::kInvalidArgument,
                               {"another rank"}));
        RETURN_IF_ERROR(Expect(comm->Send(t, 7),
                               absl::StatusCode::kInvalidArgument,
                               {"another rank"}));
        return comm->Barrier();  // still usable
      }));
  EXPECT_TRUE(status.ok()) << status;
}

TEST(GlooErrorsTest, SendRecvShapeMismatchFailsOnBothSides) {
  for (int64_t n : {int64_t{16}, int64_t{4000}}) {
    absl::Status status = AllRanksOk(RunRanks(
        2, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
          ASSIGN_OR_RETURN(
              std::unique_ptr<Communicator> comm,
              CreateTestCommunicator("gloo", rank, 2, store,
                                     ShortTimeout(absl::Seconds(10))));
          if (rank == 0) {
            Tensor t = Tensor::Zeros({n}, DType::kFloat64);
            RETURN_IF_ERROR(Expect(
                comm->Send(t, 1), absl::StatusCode::kInvalidArgument,
                {absl::StrCat("[", n, "]"), absl::StrCat("[", n + 1, "]")}));
          } else {
            Tensor t = Tensor::Zeros({n + 1}, DType::kFloat64);
            RETURN_IF_ERROR(Expect(
                comm->Recv(t, 0), absl::StatusCode::kInvalidArgument,
                {absl::StrCat("[", n, "]"), absl::StrCat("[", n + 1, "]")}));
          }
          // The pair still works afterwards.
          Tensor t = PatternInput(DType::kFloat64, rank, {n});
          if (rank == 0) return comm->Send(t, 1);
          RETURN_IF_ERROR(comm->Recv(t, 0));
          return CheckValues(t, ExpectedPattern(DType::kFloat64, 0, n),
                             "Recv after the mismatch");
        }));
    EXPECT_TRUE(status.ok()) << status;
  }
}

TEST(GlooErrorsTest, RankThatNeverCallsGivesDeadlineExceededWithinTimeout) {
  const absl::Duration timeout = absl::Seconds(1);
  for (int64_t n : {int64_t{4}, int64_t{100000}}) {
    absl::Notification rank0_done;
    absl::Status status = AllRanksOk(RunRanks(
        2, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
          ASSIGN_OR_RETURN(std::unique_ptr<Communicator> comm,
                           CreateTestCommunicator("gloo", rank, 2, store,
                                                  ShortTimeout(timeout)));
          if (rank == 1) {
            // Alive but never calls; keeps its connections open.
            rank0_done.WaitForNotification();
            return absl::OkStatus();
          }
          Tensor t = Tensor::Zeros({n}, DType::kFloat32);
          const absl::Time start = absl::Now();
          absl::Status s = comm->AllReduce(t);
          const absl::Duration took = absl::Now() - start;
          rank0_done.Notify();
          RETURN_IF_ERROR(Expect(s, absl::StatusCode::kDeadlineExceeded,
                                 {"rank 0", "1s", "rank(s) 1 did not reach"}));
          // The timeout, then at most min(timeout, 3 s) waiting for the
          // peer's description of its call (gloo_communicator.h).
          if (took < timeout - absl::Milliseconds(50) ||
              took > 2 * timeout + absl::Seconds(1)) {
            return absl::InternalError(
                absl::StrCat("timed out after ", absl::FormatDuration(took)));
          }
          // The group is broken now, and says so.
          return Expect(comm->Barrier(), absl::StatusCode::kFailedPrecondition,
                        {"unusable", "DEADLINE_EXCEEDED"});
        }));
    EXPECT_TRUE(status.ok()) << status;
  }
}

TEST(GlooErrorsTest, LostPeerGivesAnErrorWithinTimeout) {
  // Rank 1 leaves (destroys its communicator, closing its sockets) while
  // rank 0 starts collectives: rank 0 must fail, not hang.
  const absl::Duration timeout = absl::Seconds(1);
  for (int64_t n : {int64_t{4}, int64_t{1} << 20}) {
    absl::Status status = AllRanksOk(RunRanks(
        2, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
          ASSIGN_OR_RETURN(std::unique_ptr<Communicator> comm,
                           CreateTestCommunicator("gloo", rank, 2, store,
                                                  ShortTimeout(timeout)));
          RETURN_IF_ERROR(comm->Barrier());
          if (rank == 1) {
            comm.reset();
            return absl::OkStatus();
          }
          absl::SleepFor(absl::Milliseconds(50));
          Tensor t = Tensor::Zeros({n}, DType::kFloat32);
          const absl::Time start = absl::Now();
          absl::Status s = comm->AllReduce(t);
          const absl::Duration took = absl::Now() - start;
          if (s.code() != absl::StatusCode::kUnavailable &&
              s.code() != absl::StatusCode::kDeadlineExceeded) {
            return absl::InternalError(
                absl::StrCat("expected UNAVAILABLE or DEADLINE_EXCEEDED, got ",
                             s.ToString()));
          }
          if (took > timeout + absl::Seconds(1)) {
            return absl::InternalError(
                absl::StrCat("failed only after ", absl::FormatDuration(took)));
          }
          return absl::OkStatus();
        }));
    EXPECT_TRUE(status.ok()) << status;
  }
}

TEST(GlooErrorsTest, RendezvousNamesTheRankThatNeverJoined) {
  auto store = std::make_shared<HashStore>();
  const absl::Time start = absl::Now();
  absl::StatusOr<std::unique_ptr<Communicator>> comm =
      CreateTestCommunicator("gloo", 0, 3, store, ShortTimeout());
  const absl::Duration took = absl::Now() - start;
  ASSERT_FALSE(comm.ok());
  EXPECT_EQ(comm.status().code(), absl::StatusCode::kDeadlineExceeded)
      << comm.status();
  EXPECT_TRUE(absl::StrContains(comm.status().message(), "rank 1"))
      << comm.status();
  EXPECT_LT(took, absl::Seconds(2));
}

TEST(GlooErrorsTest, BadContextOrOptionsAreInvalidArgument) {
  auto store = std::make_shared<HashStore>();
  BackendContext ctx;
  ctx.rank = 0;
  ctx.size = 2;
  ctx.store = store;
  ctx.timeout = absl::Seconds(1);

  ctx.options = {{"gloo.nonsense", "1"}};
  EXPECT_EQ(CreateGlooCommunicator(ctx).status().code(),
            absl::StatusCode::kInvalidArgument);
  ctx.options = {{"gloo.check_consistency", "maybe"}};
  EXPECT_EQ(CreateGlooCommunicator(ctx).status().code(),
            absl::StatusCode::kInvalidArgument);
  ctx.options = {{"other.key", "ignored"}, {"gloo.hostname", "203.0.113.7"}};
  absl::StatusOr<std::unique_ptr<Communicator>> unbindable =
      CreateGlooCommunicator(ctx);
  EXPECT_EQ(unbindable.status().code(), absl::StatusCode::kInvalidArgument)
      << unbindable.status();
  EXPECT_TRUE(absl::StrContains(unbindable.status().message(), "203.0.113.7"))
      << unbindable.status();
  ctx.options = {{"gloo.iface", "no_such_interface0"}};
  EXPECT_EQ(CreateGlooCommunicator(ctx).status().code(),
            absl::StatusCode::kInvalidArgument);

  ctx.options.clear();
  ctx.device = Device::Cuda(0);
  EXPECT_EQ(CreateGlooCommunicator(ctx).status().code(),
            absl::StatusCode::kInvalidArgument);
  ctx.device = Device::Cpu();
  ctx.store = nullptr;
  EXPECT_EQ(CreateGlooCommunicator(ctx).status().code(),
            absl::StatusCode::kInvalidArgument);
  ctx.rank = 2;
  EXPECT_EQ(CreateGlooCommunicator(ctx).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(GlooErrorsTest, RanksMustAgreeOnTheConsistencyCheck) {
  absl::Status status = AllRanksOk(
      RunRanks(2, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
        TestCommunicatorOptions options = ShortTimeout(absl::Seconds(10));
        options.backend_options["gloo.check_consistency"] =
            rank == 0 ? "always" : "first_use";
        return Expect(
            CreateTestCommunicator("gloo", rank, 2, store, options).status(),
            absl::StatusCode::kInvalidArgument,
            {"check_consistency", "always", "first_use",
             rank == 0 ? "rank 1" : "rank 0"});
      }));
  EXPECT_TRUE(status.ok()) << status;
}

TEST(GlooErrorsTest, ParsesOptions) {
  absl::StatusOr<GlooOptions> o =
      ParseGlooOptions({{"gloo.hostname", "10.1.2.3"},
                        {"gloo.check_consistency", "FALSE"},
                        {"nccl.whatever", "x"}});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->hostname, "10.1.2.3");
  EXPECT_EQ(o->check_consistency, ConsistencyCheck::kOff);
  EXPECT_TRUE(o->iface.empty());
}

TEST(GlooErrorsTest, BindsToLoopbackForOneHost) {
  for (const char* master : {"", "localhost", "127.0.0.1"}) {
    absl::Status status = AllRanksOk(RunRanks(
        2, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
          BackendContext ctx;
          ctx.rank = rank;
          ctx.size = 2;
          ctx.store = store;
          ctx.timeout = absl::Seconds(10);
          ctx.master_addr = master;
          ASSIGN_OR_RETURN(std::unique_ptr<GlooCommunicator> comm,
                           GlooCommunicator::Create(ctx, GlooOptions()));
          if (comm->bound_address() != "127.0.0.1") {
            return absl::InternalError(
                absl::StrCat("bound to ", comm->bound_address()));
          }
          return comm->Barrier();
        }));
    EXPECT_TRUE(status.ok()) << "master_addr \"" << master << "\": " << status;
  }
}

TEST(GlooErrorsTest, GroupOfOneNeedsNoStoreAndHasNoPeers) {
  BackendContext ctx;  // rank 0 of 1, no store
  absl::StatusOr<std::unique_ptr<Communicator>> comm =
      CreateGlooCommunicator(ctx);
  ASSERT_TRUE(comm.ok()) << comm.status();
  Tensor t = Tensor::Full({3}, 2.5, DType::kFloat32);
  EXPECT_TRUE((*comm)->AllReduce(t, ReduceOp::kAvg).ok());
  EXPECT_EQ(t.ToDoubles(), (std::vector<double>{2.5, 2.5, 2.5}));
  EXPECT_EQ((*comm)->Send(t, 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*comm)->Broadcast(t, 1).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE((*comm)->Barrier().ok());
}

}  // namespace
}  // namespace tp
