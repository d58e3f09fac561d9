// AllGather, Broadcast (every root), Send/Recv around a ring and Barrier over
// the gloo backend: every dtype x world size 1..4 x element count.
#include <memory>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "runtime/status_macros.h"
#include "tests/backends/gloo/gloo_test_params.h"
#include "tests/testing/collective_checks.h"
#include "tests/testing/communicator_testing.h"
#include "tests/testing/run_ranks.h"

namespace tp {
namespace {

class GlooGatherBroadcastP2PTest : public ::testing::TestWithParam<GlooParam> {
 protected:
  // Runs body(rank, comm) on every rank of a fresh group.
  template <typename Body>
  absl::Status OnEveryRank(Body body) {
    const GlooParam p = GetParam();
    return AllRanksOk(RunRanks(
        p.world, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
          ASSIGN_OR_RETURN(std::unique_ptr<Communicator> comm,
                           CreateTestCommunicator("gloo", rank, p.world, store,
                                                  GlooTestOptions(p)));
          return body(rank, *comm);
        }));
  }
};

TEST_P(GlooGatherBroadcastP2PTest, AllGatherConcatenatesInRankOrder) {
  const GlooParam p = GetParam();
  absl::Status status = OnEveryRank([&](int rank, Communicator& comm) {
    for (int64_t count : kCounts) {
      for (int pass = 0; pass < kPasses; ++pass) {
        const Tensor in = PatternInput(p.dtype, rank, {count});
        Tensor out = Tensor::Full({p.world * count}, -1, p.dtype);
        RETURN_IF_ERROR(comm.AllGather(in, out));
        std::vector<double> expected;
        for (int r = 0; r < p.world; ++r) {
          std::vector<double> part = ExpectedPattern(p.dtype, r, count);
          expected.insert(expected.end(), part.begin(), part.end());
        }
        RETURN_IF_ERROR(
            CheckValues(out, expected, absl::StrCat("AllGather of ", count)));
      }
    }
    // A matrix gathers along dim 0.
    const Tensor in = PatternInput(p.dtype, rank, {3, 5});
    Tensor out = Tensor::Zeros({3 * p.world, 5}, p.dtype);
    RETURN_IF_ERROR(comm.AllGather(in, out));
    std::vector<double> expected;
    for (int r = 0; r < p.world; ++r) {
      std::vector<double> part = ExpectedPattern(p.dtype, r, 15);
      expected.insert(expected.end(), part.begin(), part.end());
    }
    return CheckValues(out, expected, "AllGather of [3, 5]");
  });
  EXPECT_TRUE(status.ok()) << status;
}

TEST_P(GlooGatherBroadcastP2PTest, AllGatherIntoItsOwnOutputSlot) {
  // `in` may be this rank's slice of `out` (a view of the same storage).
  const GlooParam p = GetParam();
  absl::Status status = OnEveryRank([&](int rank, Communicator& comm) {
    for (int64_t count : {int64_t{7}, int64_t{5000}}) {
      Tensor out = Tensor::Zeros({p.world * count}, p.dtype);
      ASSIGN_OR_RETURN(Tensor mine, out.Narrow(0, rank * count, count));
      RETURN_IF_ERROR(mine.CopyFrom(PatternInput(p.dtype, rank, {count})));
      RETURN_IF_ERROR(comm.AllGather(mine, out));
      std::vector<double> expected;
      for (int r = 0; r < p.world; ++r) {
        std::vector<double> part = ExpectedPattern(p.dtype, r, count);
        expected.insert(expected.end(), part.begin(), part.end());
      }
      RETURN_IF_ERROR(CheckValues(out, expected, "in-place AllGather"));
    }
    return absl::OkStatus();
  });
  EXPECT_TRUE(status.ok()) << status;
}

TEST_P(GlooGatherBroadcastP2PTest, BroadcastFromEveryRoot) {
  const GlooParam p = GetParam();
  absl::Status status = OnEveryRank([&](int rank, Communicator& comm) {
    for (int root = 0; root < p.world; ++root) {
      for (int64_t count : kCounts) {
        for (int pass = 0; pass < kPasses; ++pass) {
          Tensor t = PatternInput(p.dtype, rank, {count});
          RETURN_IF_ERROR(comm.Broadcast(t, root));
          RETURN_IF_ERROR(CheckValues(
              t, ExpectedPattern(p.dtype, root, count),
              absl::StrCat("Broadcast of ", count, " from ", root)));
        }
      }
    }
    return absl::OkStatus();
  });
  EXPECT_TRUE(status.ok()) << status;
}

TEST_P(GlooGatherBroadcastP2PTest, SendRecvAroundARing) {
  const GlooParam p = GetParam();
  if (p.world == 1) GTEST_SKIP() << "a ring needs two ranks";
  absl::Status status = OnEveryRank([&](int rank, Communicator& comm) {
    const int next = (rank + 1) % p.world;
    const int prev = (rank + p.world - 1) % p.world;
    for (int64_t count : kCounts) {
      // Rank 0 sends first; every other rank receives, then passes on its own.
      const Tensor mine = PatternInput(p.dtype, rank, {count});
      Tensor got = Tensor::Full({count}, -1, p.dtype);
      if (rank == 0) {
        RETURN_IF_ERROR(comm.Send(mine, next));
        RETURN_IF_ERROR(comm.Recv(got, prev));
      } else {
        RETURN_IF_ERROR(comm.Recv(got, prev));
        RETURN_IF_ERROR(comm.Send(mine, next));
      }
      RETURN_IF_ERROR(CheckValues(got, ExpectedPattern(p.dtype, prev, count),
                                  absl::StrCat("Recv of ", count)));
    }
    // Several messages in a row between one pair arrive in order.
    if (rank == 0) {
      for (int k = 0; k < 3; ++k) {
        RETURN_IF_ERROR(comm.Send(PatternInput(p.dtype, k, {5000}), 1));
      }
    } else if (rank == 1) {
      for (int k = 0; k < 3; ++k) {
        Tensor t = Tensor::Zeros({5000}, p.dtype);
        RETURN_IF_ERROR(comm.Recv(t, 0));
        RETURN_IF_ERROR(CheckValues(t, ExpectedPattern(p.dtype, k, 5000),
                                    absl::StrCat("message ", k)));
      }
    }
    return comm.Barrier();
  });
  EXPECT_TRUE(status.ok()) << status;
}

TEST_P(GlooGatherBroadcastP2PTest, BarrierWaitsForEveryRank) {
  const GlooParam p = GetParam();
  std::atomic<int> entered{0};
  absl::Status status = OnEveryRank([&](int rank, Communicator& comm) {
    for (int round = 1; round <= 3; ++round) {
      if (rank == p.world - 1) absl::SleepFor(absl::Milliseconds(20));
      entered.fetch_add(1);
      RETURN_IF_ERROR(comm.Barrier());
      // Nobody leaves round k before everyone has entered it.
      if (entered.load() < round * p.world) {
        return absl::InternalError(absl::StrCat(
            "left barrier ", round, " with only ", entered.load(), " entries"));
      }
      RETURN_IF_ERROR(comm.Barrier());
    }
    return absl::OkStatus();
  });
  EXPECT_TRUE(status.ok()) << status;
}

TEST_P(GlooGatherBroadcastP2PTest, ReportsItsShape) {
  const GlooParam p = GetParam();
  absl::Status status = OnEveryRank([&](int rank, Communicator& comm) {
    if (comm.rank() != rank || comm.size() != p.world ||
        comm.backend() != "gloo") {
      return absl::InternalError(absl::StrCat("rank ", comm.rank(), " size ",
                                              comm.size(), " backend ",
                                              comm.backend()));
    }
    return absl::OkStatus();
  });
  EXPECT_TRUE(status.ok()) << status;
}

INSTANTIATE_TEST_SUITE_P(All, GlooGatherBroadcastP2PTest,
                         ::testing::ValuesIn(AllGlooParams()), GlooParamName);

}  // namespace
}  // namespace tp
