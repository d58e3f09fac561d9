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

TEST_P(GlooReduceScatterTest, OutputMayBeAViewOfTheInput) {
  const GlooParam p = GetParam();
  absl::Status status = AllRanksOk(RunRanks(
      p.world, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
        ASSIGN_OR_RETURN(std::unique_ptr<Communicator> comm,
                         CreateTestCommunicator("gloo", rank, p.world, store,
                                                GlooTestOptions(p)));
        for (int64_t count : {int64_t{3}, int64_t{3000}}) {
          // `out` is the first chunk of `in` (rank 0 reduces into its own
          // chunk; the others into a chunk they send).
          Tensor in =
              ReduceInput(ReduceOp::kSum, p.dtype, rank, p.world * count);
          ASSIGN_OR_RETURN(Tensor head, in.Narrow(0, 0, count));
          RETURN_IF_ERROR(comm->ReduceScatter(in, head));
          RETURN_IF_ERROR(
              CheckValues(head,
                          ExpectedReduce(ReduceOp::kSum, p.dtype, p.world,
                                         count, rank * count),
                          absl::StrCat("ReduceScatter of ", count,
                                       " into a view of its input")));
        }
        return absl::OkStatus();
      }));
  EXPECT_TRUE(status.ok()) << status;
}

// Tens of MB per call: the sizes at which Gloo's own halving-doubling
// reduce-scatter returned wrong elements (it overwrote data it was still
// sending; BENCHMARKS.md). Each call's values differ, so stale data shows.
TEST(GlooReduceScatterLargeTest, ExactForTensOfMegabytes) {
  for (int world : {2, 4}) {
    const int64_t count = (int64_t{16} << 20) / 4 / world;  // 16 MB in total
    absl::Status status = AllRanksOk(RunRanks(
        world, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
          TestCommunicatorOptions options;
          options.timeout = absl::Seconds(60);
          ASSIGN_OR_RETURN(
              std::unique_ptr<Communicator> comm,
              CreateTestCommunicator("gloo", rank, world, store, options));
          for (int iteration = 0; iteration < 3; ++iteration) {
            Tensor in = Tensor::Empty({world * count}, DType::kFloat32);
            float* p = in.data<float>();
            for (int64_t i = 0; i < world * count; ++i) {
              p[i] =
                  static_cast<float>((i * 7 + rank * 3 + iteration * 5) % 32);
            }
            Tensor out = Tensor::Zeros({count}, DType::kFloat32);
            RETURN_IF_ERROR(comm->ReduceScatter(in, out));
            const float* o = out.data<float>();
            for (int64_t j = 0; j < count; ++j) {
              const int64_t i = rank * count + j;
              double want = 0;
              for (int r = 0; r < world; ++r) {
                want +=
                    static_cast<double>((i * 7 + r * 3 + iteration * 5) % 32);
              }
              if (o[j] != want) {
                return absl::InternalError(absl::StrCat(
                    "world ", world, " iteration ", iteration, ": element ", j,
                    " is ", o[j], ", expected ", want));
              }
            }
          }
          return absl::OkStatus();
        }));
    EXPECT_TRUE(status.ok()) << status;
  }
}

// Repeated calls with new values each time, in every mode: a call that skips
// the envelope must not return anything left over from the previous one (the
// ring keeps its buffers between calls). Counts: one above the inline
// payload, and one of several Gloo segments.
TEST(GlooReduceScatterLargeTest, RepeatedCallsWithNewValuesAreExact) {
  for (ConsistencyCheck mode :
       {ConsistencyCheck::kFirstUse, ConsistencyCheck::kOff}) {
    for (int world : {2, 3, 4}) {
      absl::Status status = AllRanksOk(RunRanks(
          world, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
            TestCommunicatorOptions options;
            options.timeout = absl::Seconds(30);
            options.backend_options["gloo.check_consistency"] =
                std::string(ConsistencyCheckName(mode));
            ASSIGN_OR_RETURN(
                std::unique_ptr<Communicator> comm,
                CreateTestCommunicator("gloo", rank, world, store, options));
            for (int64_t count : {int64_t{1500}, int64_t{70000}}) {
              for (int iteration = 0; iteration < 3; ++iteration) {
                Tensor in = Tensor::Empty({world * count}, DType::kFloat64);
                double* p = in.data<double>();
                for (int64_t i = 0; i < world * count; ++i) {
                  p[i] = static_cast<double>(
                      (i * 7 + rank * 3 + iteration * 5) % 32);
                }
                Tensor out = Tensor::Zeros({count}, DType::kFloat64);
                RETURN_IF_ERROR(comm->ReduceScatter(in, out));
                const double* o = out.data<double>();
                for (int64_t j = 0; j < count; ++j) {
                  const int64_t i = rank * count + j;
                  double want = 0;
                  for (int r = 0; r < world; ++r) {
                    want += static_cast<double>(
                        (i * 7 + r * 3 + iteration * 5) % 32);
                  }
                  if (o[j] != want) {
                    return absl::InternalError(absl::StrCat(
                        "count ", count, " iteration ", iteration, ": element ",
                        j, " is ", o[j], ", expected ", want));
                  }
                }
              }
            }
            return absl::OkStatus();
          }));
      EXPECT_TRUE(status.ok()) << ConsistencyCheckName(mode) << ", world "
                               << world << ": " << status;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(All, GlooReduceScatterTest,
                         ::testing::ValuesIn(AllGlooParams()), GlooParamName);

}  // namespace
}  // namespace tp
