// ReduceScatter over the gloo backend: every ReduceOp x dtype x world size
// 1..4 x element count per rank, against closed-form results.
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

class GlooReduceScatterTest : public ::testing::TestWithParam<GlooParam> {};

TEST_P(GlooReduceScatterTest, EveryOpAndCountMatchesClosedForm) {
  const GlooParam p = GetParam();
  absl::Status status = AllRanksOk(RunRanks(
      p.world, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
        ASSIGN_OR_RETURN(std::unique_ptr<Communicator> comm,
                         CreateTestCommunicator("gloo", rank, p.world, store,
                                                GlooTestOptions(p)));
        for (ReduceOp op : kAllReduceOps) {
          for (int64_t count : kCounts) {
            for (int pass = 0; pass < kPasses; ++pass) {
              // Rank r's input is f(r, j) for j in [0, world * count); it keeps
              // the reduction of elements [rank * count, (rank + 1) * count).
              const Tensor in = ReduceInput(op, p.dtype, rank, p.world * count);
              Tensor out = Tensor::Full({count}, -99, p.dtype);
              RETURN_IF_ERROR(comm->ReduceScatter(in, out, op));
              RETURN_IF_ERROR(CheckValues(
                  out,
                  ExpectedReduce(op, p.dtype, p.world, count, rank * count),
                  absl::StrCat("ReduceScatter ", ReduceOpName(op), " of ",
                               count, " per rank")));
              // The input is left as it was.
              RETURN_IF_ERROR(CheckValues(
                  in,
                  [&] {
                    std::vector<double> v(p.world * count);
                    for (int64_t i = 0; i < p.world * count; ++i) {
                      v[i] = ReduceValue(op, rank, i);
                    }
                    return v;
                  }(),
                  "ReduceScatter input after the call"));
            }
          }
        }
        return absl::OkStatus();
      }));
  EXPECT_TRUE(status.ok()) << status;
}

TEST_P(GlooReduceScatterTest, SplitsAlongDimZeroOfAMatrix) {
  const GlooParam p = GetParam();
  absl::Status status = AllRanksOk(RunRanks(
      p.world, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
        ASSIGN_OR_RETURN(std::unique_ptr<Communicator> comm,
                         CreateTestCommunicator("gloo", rank, p.world, store,
                                                GlooTestOptions(p)));
        constexpr int64_t kRows = 2, kCols = 700;  // 1400 elements per rank
        ASSIGN_OR_RETURN(
            const Tensor in,
            ReduceInput(ReduceOp::kSum, p.dtype, rank, p.world * kRows * kCols)
                .Reshape({p.world * kRows, kCols}));
        Tensor out = Tensor::Zeros({kRows, kCols}, p.dtype);
        RETURN_IF_ERROR(comm->ReduceScatter(in, out));
        return CheckValues(out,
                           ExpectedReduce(ReduceOp::kSum, p.dtype, p.world,
                                          kRows * kCols, rank * kRows * kCols),
                           "ReduceScatter of a matrix");
      }));
  EXPECT_TRUE(status.ok()) << status;
}

TEST_P(GlooReduceScatterTest, OverwritingInputGivesTheSameResult) {
  // The input is Gloo's working buffer here: only `out` is checked, for
  // every op and count, twice (the second call skips the envelope), and with
  // `out` a view of the start of `in`.
  const GlooParam p = GetParam();
  absl::Status status = AllRanksOk(RunRanks(
      p.world, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
        ASSIGN_OR_RETURN(std::unique_ptr<Communicator> comm,
                         CreateTestCommunicator("gloo", rank, p.world, store,
                                                GlooTestOptions(p)));
        for (ReduceOp op : kAllReduceOps) {
          for (int64_t count : kCounts) {
            for (int pass = 0; pass < kPasses; ++pass) {
              Tensor in = ReduceInput(op, p.dtype, rank, p.world * count);
              Tensor out = Tensor::Full({count}, -99, p.dtype);
              RETURN_IF_ERROR(comm->ReduceScatterOverwritingInput(in, out, op));
              RETURN_IF_ERROR(CheckValues(
                  out,
                  ExpectedReduce(op, p.dtype, p.world, count, rank * count),
                  absl::StrCat("ReduceScatterOverwritingInput ",
                               ReduceOpName(op), " of ", count, " per rank")));
            }
          }
        }
        Tensor in = ReduceInput(ReduceOp::kSum, p.dtype, rank, p.world * 3000);
        ASSIGN_OR_RETURN(Tensor head, in.Narrow(0, 0, 3000));
        RETURN_IF_ERROR(comm->ReduceScatterOverwritingInput(in, head));
        return CheckValues(
            head,
            ExpectedReduce(ReduceOp::kSum, p.dtype, p.world, 3000, rank * 3000),
            "ReduceScatterOverwritingInput into a view of its input");
      }));
  EXPECT_TRUE(status.ok()) << status;
}

INSTANTIATE_TEST_SUITE_P(All, GlooReduceScatterTest,
                         ::testing::ValuesIn(AllGlooParams()), GlooParamName);

}  // namespace
}  // namespace tp
