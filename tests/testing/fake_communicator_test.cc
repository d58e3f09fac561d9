// FakeCommunicator: collectives against closed forms for groups of 1..4,
// mismatches, local errors, timeouts, injected failures and delays.
#include "tests/testing/fake_communicator.h"

#include <memory>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "runtime/status_macros.h"
#include "tests/testing/collective_checks.h"

namespace tp {
namespace {

// Runs body(rank, comm) on one thread per communicator; returns statuses.
template <typename Body>
std::vector<absl::Status> OnThreads(
    std::vector<std::unique_ptr<FakeCommunicator>>& comms, Body body) {
  std::vector<absl::Status> statuses(comms.size());
  std::vector<std::thread> threads;
  for (size_t r = 0; r < comms.size(); ++r) {
    threads.emplace_back([&, r] { statuses[r] = body(static_cast<int>(r), *comms[r]); });
  }
  for (auto& t : threads) t.join();
  return statuses;
}

void ExpectAllOk(const std::vector<absl::Status>& statuses) {
  for (size_t r = 0; r < statuses.size(); ++r) {
    EXPECT_TRUE(statuses[r].ok()) << "rank " << r << ": " << statuses[r];
  }
}

class FakeCommunicatorTest : public ::testing::TestWithParam<int> {};

TEST_P(FakeCommunicatorTest, CollectivesMatchClosedForms) {
  const int world = GetParam();
  auto comms = FakeCommunicator::CreateGroup(world);
  ExpectAllOk(OnThreads(comms, [&](int rank, Communicator& comm) -> absl::Status {
    for (DType dtype : kAllDTypes) {
      for (int64_t count : {int64_t{0}, int64_t{1}, int64_t{1021}}) {
        for (ReduceOp op : kAllReduceOps) {
          Tensor t = ReduceInput(op, dtype, rank, count);
          RETURN_IF_ERROR(comm.AllReduce(t, op));
          RETURN_IF_ERROR(CheckValues(t, ExpectedReduce(op, dtype, world, count),
                                      "fake AllReduce"));
          const Tensor in = ReduceInput(op, dtype, rank, world * count);
          Tensor out = Tensor::Zeros({count}, dtype);
          RETURN_IF_ERROR(comm.ReduceScatter(in, out, op));
          RETURN_IF_ERROR(CheckValues(
              out, ExpectedReduce(op, dtype, world, count, rank * count),
              "fake ReduceScatter"));
        }
        const Tensor in = PatternInput(dtype, rank, {count});
        Tensor out = Tensor::Zeros({world * count}, dtype);
        RETURN_IF_ERROR(comm.AllGather(in, out));
        std::vector<double> expected;
        for (int r = 0; r < world; ++r) {
          auto part = ExpectedPattern(dtype, r, count);
          expected.insert(expected.end(), part.begin(), part.end());
        }
        RETURN_IF_ERROR(CheckValues(out, expected, "fake AllGather"));
        const int root = world - 1;
        Tensor b = PatternInput(dtype, rank, {count});
        RETURN_IF_ERROR(comm.Broadcast(b, root));
        RETURN_IF_ERROR(
            CheckValues(b, ExpectedPattern(dtype, root, count), "fake Broadcast"));
      }
    }
    if (world > 1) {
      const int next = (rank + 1) % world, prev = (rank + world - 1) % world;
      RETURN_IF_ERROR(comm.Send(PatternInput(DType::kFloat32, rank, {7}), next));
      Tensor got = Tensor::Zeros({7}, DType::kFloat32);
      RETURN_IF_ERROR(comm.Recv(got, prev));
      RETURN_IF_ERROR(CheckValues(got, ExpectedPattern(DType::kFloat32, prev, 7),
                                  "fake Recv"));
    }
    return comm.Barrier();
  }));
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, FakeCommunicatorTest,
                         ::testing::Values(1, 2, 3, 4));

TEST(FakeCommunicatorSingleTest, GroupOfOneHasNoPeers) {
  FakeCommunicator comm;
  EXPECT_EQ(comm.size(), 1);
  EXPECT_EQ(comm.backend(), "fake");
  Tensor t = Tensor::Full({2}, 3, DType::kInt32);
  EXPECT_TRUE(comm.AllReduce(t, ReduceOp::kAvg).ok());
  EXPECT_EQ(t.ToDoubles(), (std::vector<double>{3, 3}));
  EXPECT_EQ(comm.Send(t, 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(comm.Broadcast(t, 1).code(), absl::StatusCode::kInvalidArgument);
}

TEST(FakeCommunicatorErrorsTest, MismatchedShapesFailOnEveryRank) {
  auto comms = FakeCommunicator::CreateGroup(3);
  auto statuses = OnThreads(comms, [](int rank, Communicator& comm) {
    Tensor t = Tensor::Zeros({rank == 2 ? 5 : 4}, DType::kFloat32);
    return comm.AllReduce(t);
  });
  for (const absl::Status& s : statuses) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "rank 2: AllReduce(float32 [5]"))
        << s;
  }
}

TEST(FakeCommunicatorErrorsTest, LocalErrorFailsEveryRank) {
  auto comms = FakeCommunicator::CreateGroup(2);
  auto statuses = OnThreads(comms, [](int rank, Communicator& comm) {
    Tensor in = Tensor::Zeros({3}, DType::kFloat32);
    Tensor out = Tensor::Zeros({rank == 1 ? 5 : 6}, DType::kFloat32);
    return comm.AllGather(in, out);
  });
  for (const absl::Status& s : statuses) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "rank 1")) << s;
  }
}

TEST(FakeCommunicatorErrorsTest, MissingRankTimesOutNamingIt) {
  auto comms = FakeCommunicator::CreateGroup(3, absl::Milliseconds(200));
  auto statuses = OnThreads(comms, [](int rank, Communicator& comm) {
    return rank == 1 ? absl::OkStatus() : comm.Barrier();
  });
  for (int r : {0, 2}) {
    EXPECT_EQ(statuses[r].code(), absl::StatusCode::kDeadlineExceeded);
    EXPECT_TRUE(absl::StrContains(statuses[r].message(), "rank(s) 1"))
        << statuses[r];
  }
  Tensor t = Tensor::Zeros({1}, DType::kFloat32);
  const absl::Time start = absl::Now();
  EXPECT_EQ(comms[0]->Recv(t, 1).code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(190));
}

TEST(FakeCommunicatorErrorsTest, InjectedFailureOnTheKthCall) {
  std::vector<FakeCommunicatorOptions> options(2);
  options[1].fail_on_call = 2;
  options[1].failure = absl::InternalError("boom");
  auto comms = FakeCommunicator::CreateGroup(2, absl::Seconds(5), options);
  auto statuses = OnThreads(comms, [](int rank, Communicator& comm) -> absl::Status {
    Tensor t = Tensor::Full({4}, 1, DType::kFloat32);
    RETURN_IF_ERROR(comm.AllReduce(t));   // call 0
    RETURN_IF_ERROR(comm.Barrier());      // call 1
    absl::Status third = comm.AllReduce(t);  // call 2: rank 1 fails
    if (rank == 1) {
      if (third.code() != absl::StatusCode::kInternal) {
        return absl::InternalError(absl::StrCat("rank 1 got ", third.ToString()));
      }
    } else if (third.code() != absl::StatusCode::kUnavailable ||
               !absl::StrContains(third.message(), "rank 1 failed")) {
      return absl::InternalError(absl::StrCat("rank 0 got ", third.ToString()));
    }
    // Later calls work again.
    Tensor u = Tensor::Full({4}, 2, DType::kFloat32);
    RETURN_IF_ERROR(comm.AllReduce(u));
    return CheckValues(u, {4, 4, 4, 4}, "AllReduce after the failure");
  });
  ExpectAllOk(statuses);
  EXPECT_EQ(comms[1]->calls(), 4);
}

TEST(FakeCommunicatorErrorsTest, DelaySlowsEveryCall) {
  FakeCommunicatorOptions options;
  options.delay = absl::Milliseconds(30);
  FakeCommunicator comm(options);
  const absl::Time start = absl::Now();
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(comm.Barrier().ok());
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(90));
}

TEST(FakeCommunicatorErrorsTest, RecvChecksShapeAndDType) {
  auto comms = FakeCommunicator::CreateGroup(2);
  auto statuses = OnThreads(comms, [](int rank, Communicator& comm) {
    if (rank == 0) return comm.Send(Tensor::Zeros({3}, DType::kFloat32), 1);
    Tensor t = Tensor::Zeros({4}, DType::kFloat32);
    return comm.Recv(t, 0);
  });
  EXPECT_TRUE(statuses[0].ok());
  EXPECT_EQ(statuses[1].code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(statuses[1].message(), "[3]")) << statuses[1];
}

}  // namespace
}  // namespace tp
