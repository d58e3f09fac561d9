// The gloo backend through the registry: "gloo" and "auto" on the CPU build a
// GlooCommunicator, and the real plugin //backends/gloo:libtp_gloo_plugin.so,
// loaded by path, registers "gloo_plugin" whose communicators run
// collectives.
#include <cstdlib>
#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "comm/backend_registry.h"
#include "gtest/gtest.h"
#include "runtime/status_macros.h"
#include "tests/testing/collective_checks.h"
#include "tests/testing/communicator_testing.h"
#include "tests/testing/run_ranks.h"

namespace tp {
namespace {

std::string PluginPath() {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  return absl::StrCat(srcdir ? srcdir : ".", "/",
                      workspace ? workspace : "tensor_parallel",
                      "/backends/gloo/libtp_gloo_plugin.so");
}

// A few collectives whose results are checked, for a backend by name.
absl::Status RunSomeCollectives(absl::string_view backend, int world) {
  return AllRanksOk(RunRanks(
      world, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
        ASSIGN_OR_RETURN(std::unique_ptr<Communicator> comm,
                         CreateTestCommunicator(backend, rank, world, store));
        if (comm->backend() != backend) {
          return absl::InternalError(
              absl::StrCat("backend() is ", comm->backend()));
        }
        for (int64_t n : {int64_t{3}, int64_t{20000}}) {
          Tensor t = ReduceInput(ReduceOp::kSum, DType::kFloat32, rank, n);
          RETURN_IF_ERROR(comm->AllReduce(t));
          RETURN_IF_ERROR(CheckValues(
              t, ExpectedReduce(ReduceOp::kSum, DType::kFloat32, world, n),
              "AllReduce"));
          const Tensor in = PatternInput(DType::kInt64, rank, {n});
          Tensor out = Tensor::Zeros({world * n}, DType::kInt64);
          RETURN_IF_ERROR(comm->AllGather(in, out));
          std::vector<double> expected;
          for (int r = 0; r < world; ++r) {
            std::vector<double> part = ExpectedPattern(DType::kInt64, r, n);
            expected.insert(expected.end(), part.begin(), part.end());
          }
          RETURN_IF_ERROR(CheckValues(out, expected, "AllGather"));
        }
        return comm->Barrier();
      }));
}

TEST(GlooRegistrationTest, GlooIsRegisteredAndIsTheCpuDefault) {
  EXPECT_TRUE(BackendRegistry::Global().Contains("gloo"));
  EXPECT_EQ(BackendRegistry::Global().Resolve("auto", Device::Cpu()), "gloo");
  absl::Status s = RunSomeCollectives("gloo", 2);
  EXPECT_TRUE(s.ok()) << s;
  absl::StatusOr<std::unique_ptr<Communicator>> comm =
      CreateCommunicator("auto", BackendContext());
  ASSERT_TRUE(comm.ok()) << comm.status();
  EXPECT_EQ((*comm)->backend(), "gloo");
}

TEST(GlooRegistrationTest, UnknownBackendListsGloo) {
  absl::StatusOr<std::unique_ptr<Communicator>> comm =
      CreateCommunicator("mpi", BackendContext());
  EXPECT_EQ(comm.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(comm.status().message(), "gloo"))
      << comm.status();
}

TEST(GlooRegistrationTest, PluginLoadedByPathRunsCollectives) {
  ASSERT_FALSE(BackendRegistry::Global().Contains("gloo_plugin"));
  absl::Status loaded = LoadBackendPlugins(PluginPath());
  ASSERT_TRUE(loaded.ok()) << loaded;
  EXPECT_TRUE(BackendRegistry::Global().Contains("gloo_plugin"));
  for (int world : {1, 2, 3}) {
    absl::Status s = RunSomeCollectives("gloo_plugin", world);
    EXPECT_TRUE(s.ok()) << "world " << world << ": " << s;
  }
  // Loading it again would register the same name twice.
  EXPECT_EQ(LoadBackendPlugin(PluginPath()).code(),
            absl::StatusCode::kAlreadyExists);
}

}  // namespace
}  // namespace tp
