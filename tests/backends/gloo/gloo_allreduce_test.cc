// AllReduce over the gloo backend: every ReduceOp x dtype x world size
// 1..4 x element count, against closed-form results (collective_checks.h).
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

class GlooAllReduceTest : public ::testing::TestWithParam<GlooParam> {};

TEST_P(GlooAllReduceTest, EveryOpAndCountMatchesClosedForm) {
  const GlooParam p = GetParam();
  absl::Status status = AllRanksOk(RunRanks(
      p.world, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
        ASSIGN_OR_RETURN(std::unique_ptr<Communicator> comm,
                         CreateTestCommunicator("gloo", rank, p.world, store,
                                                GlooTestOptions(p)));
        for (ReduceOp op : kAllReduceOps) {
          for (int64_t count : kCounts) {
            for (int pass = 0; pass < kPasses; ++pass) {
              Tensor t = ReduceInput(op, p.dtype, rank, count);
              RETURN_IF_ERROR(comm->AllReduce(t, op));
              RETURN_IF_ERROR(
                  CheckValues(t, ExpectedReduce(op, p.dtype, p.world, count),
                              absl::StrCat("AllReduce ", ReduceOpName(op),
                                           " of ", count, ", pass ", pass)));
            }
          }
        }
        return absl::OkStatus();
      }));
  EXPECT_TRUE(status.ok()) << status;
}

TEST_P(GlooAllReduceTest, MultiDimensionalTensorKeepsItsShape) {
  const GlooParam p = GetParam();
  absl::Status status = AllRanksOk(RunRanks(
      p.world, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
        ASSIGN_OR_RETURN(std::unique_ptr<Communicator> comm,
                         CreateTestCommunicator("gloo", rank, p.world, store,
                                                GlooTestOptions(p)));
        ASSIGN_OR_RETURN(Tensor t,
                         ReduceInput(ReduceOp::kSum, p.dtype, rank, 2 * 3 * 5)
                             .Reshape({2, 3, 5}));
        RETURN_IF_ERROR(comm->AllReduce(t));
        RETURN_IF_ERROR(CheckShape(t, {2, 3, 5}, "AllReduce output"));
        return CheckValues(t,
                           ExpectedReduce(ReduceOp::kSum, p.dtype, p.world, 30),
                           "AllReduce [2, 3, 5]");
      }));
  EXPECT_TRUE(status.ok()) << status;
}

INSTANTIATE_TEST_SUITE_P(All, GlooAllReduceTest,
                         ::testing::ValuesIn(AllGlooParams()), GlooParamName);

}  // namespace
}  // namespace tp
