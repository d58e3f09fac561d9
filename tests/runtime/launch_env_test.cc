#include "runtime/launch_env.h"

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tp {
namespace {

using ::testing::HasSubstr;

using Env = std::map<std::string, std::string>;

struct Expected {
  int rank, world_size, local_rank, local_world_size;
  std::string master_addr;
  int master_port;
  LaunchSource source;
};

struct GoodCase {
  std::string name;
  Env env;
  LaunchOverrides overrides;
  Expected want;
};

LaunchOverrides Explicit(int rank, int world) {
  LaunchOverrides o;
  o.rank = rank;
  o.world_size = world;
  return o;
}

std::vector<GoodCase> GoodCases() {
  const Env torchrun = {{"RANK", "5"},
                        {"WORLD_SIZE", "8"},
                        {"LOCAL_RANK", "1"},
                        {"LOCAL_WORLD_SIZE", "4"},
                        {"MASTER_ADDR", "node0"},
                        {"MASTER_PORT", "1234"}};
  const Env ompi = {{"OMPI_COMM_WORLD_RANK", "3"},
                    {"OMPI_COMM_WORLD_SIZE", "6"},
                    {"OMPI_COMM_WORLD_LOCAL_RANK", "0"},
                    {"OMPI_COMM_WORLD_LOCAL_SIZE", "3"}};
  const Env slurm = {{"SLURM_PROCID", "7"},
                     {"SLURM_NTASKS", "8"},
                     {"SLURM_LOCALID", "3"},
                     {"SLURM_NTASKS_PER_NODE", "4"}};
  const Env pmi = {{"PMI_RANK", "2"},
                   {"PMI_SIZE", "4"},
                   {"MPI_LOCALRANKID", "0"},
                   {"MPI_LOCALNRANKS", "2"}};
  auto merge = [](std::vector<Env> envs) {
    Env out;
    for (const Env& e : envs) out.insert(e.begin(), e.end());
    return out;
  };
  LaunchOverrides explicit_all = Explicit(2, 4);
  explicit_all.local_rank = 0;
  explicit_all.local_world_size = 2;
  explicit_all.master_addr = "10.1.2.3";
  explicit_all.master_port = 4000;
  LaunchOverrides master_only;
  master_only.master_addr = "override-host";
  master_only.master_port = 65535;
  LaunchOverrides local_only;
  local_only.local_rank = 1;
  local_only.local_world_size = 2;

  const LaunchSource kE = LaunchSource::kExplicit, kT = LaunchSource::kTorchrun,
                     kO = LaunchSource::kOpenMpi, kS = LaunchSource::kSlurm,
                     kP = LaunchSource::kPmi, k1 = LaunchSource::kSingleProcess;
  return {
      {"Empty", {}, {}, {0, 1, 0, 1, "127.0.0.1", 29500, k1}},
      {"Torchrun", torchrun, {}, {5, 8, 1, 4, "node0", 1234, kT}},
      {"TorchrunWithoutLocalAssumesOneNode",
       {{"RANK", "2"}, {"WORLD_SIZE", "3"}},
       {},
       {2, 3, 2, 3, "127.0.0.1", 29500, kT}},
      {"TorchrunLocalSizeOnlyDerivesLocalRank",
       {{"RANK", "5"}, {"WORLD_SIZE", "8"}, {"LOCAL_WORLD_SIZE", "4"}},
       {},
       {5, 8, 1, 4, "127.0.0.1", 29500, kT}},
      {"TorchrunLocalRankOnlyUsesWorldAsLocalSize",
       {{"RANK", "5"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}},
       {},
       {5, 8, 1, 8, "127.0.0.1", 29500, kT}},
      {"WhitespaceAroundIntegers",
       {{"RANK", " 1 "}, {"WORLD_SIZE", "2\n"}, {"MASTER_PORT", " 80"}},
       {},
       {1, 2, 1, 2, "127.0.0.1", 80, kT}},
      {"EmptyStringCountsAsUnset",
       {{"RANK", ""}, {"WORLD_SIZE", ""}, {"MASTER_ADDR", ""}},
       {},
       {0, 1, 0, 1, "127.0.0.1", 29500, k1}},
      {"OpenMpi", ompi, {}, {3, 6, 0, 3, "127.0.0.1", 29500, kO}},
      {"OpenMpiWithMasterFromEnv",
       merge({ompi, {{"MASTER_ADDR", "h0"}, {"MASTER_PORT", "7000"}}}),
       {},
       {3, 6, 0, 3, "h0", 7000, kO}},
      {"Slurm", slurm, {}, {7, 8, 3, 4, "127.0.0.1", 29500, kS}},
      {"SlurmNprocsFallback",
       {{"SLURM_PROCID", "1"}, {"SLURM_NPROCS", "2"}},
       {},
       {1, 2, 1, 2, "127.0.0.1", 29500, kS}},
      {"SlurmLocalSizeFromStepTasksPerNode",
       {{"SLURM_PROCID", "5"},
        {"SLURM_NTASKS", "7"},
        {"SLURM_LOCALID", "1"},
        {"SLURM_NODEID", "2"},
        {"SLURM_STEP_TASKS_PER_NODE", "2(x2),3"},
        {"SLURM_TASKS_PER_NODE", "7"}},
       {},
       {5, 7, 1, 3, "127.0.0.1", 29500, kS}},
      {"SlurmLocalSizeFromJobTasksPerNode",
       {{"SLURM_PROCID", "3"},
        {"SLURM_NTASKS", "4"},
        {"SLURM_LOCALID", "1"},
        {"SLURM_NODEID", "1"},
        {"SLURM_TASKS_PER_NODE", "2(x2)"}},
       {},
       {3, 4, 1, 2, "127.0.0.1", 29500, kS}},
      {"SlurmUniformListWithoutNodeId",
       {{"SLURM_PROCID", "3"},
        {"SLURM_NTASKS", "4"},
        {"SLURM_TASKS_PER_NODE", "2(x2)"}},
       {},
       {3, 4, 1, 2, "127.0.0.1", 29500, kS}},
      {"SlurmNonUniformListWithoutNodeIdIsIgnored",
       {{"SLURM_PROCID", "3"},
        {"SLURM_NTASKS", "4"},
        {"SLURM_LOCALID", "0"},
        {"SLURM_TASKS_PER_NODE", "3,1"}},
       {},
       {3, 4, 0, 4, "127.0.0.1", 29500, kS}},
      {"Pmi", pmi, {}, {2, 4, 0, 2, "127.0.0.1", 29500, kP}},
      {"PmiWithoutLocal",
       {{"PMI_RANK", "0"}, {"PMI_SIZE", "1"}},
       {},
       {0, 1, 0, 1, "127.0.0.1", 29500, kP}},
      // Precedence: each source wins over every later one.
      {"TorchrunBeatsEverything",
       merge({torchrun, ompi, slurm, pmi}),
       {},
       {5, 8, 1, 4, "node0", 1234, kT}},
      {"OpenMpiBeatsSlurmAndPmi",
       merge({ompi, slurm, pmi}),
       {},
       {3, 6, 0, 3, "127.0.0.1", 29500, kO}},
      {"SlurmBeatsPmi",
       merge({slurm, pmi}),
       {},
       {7, 8, 3, 4, "127.0.0.1", 29500, kS}},
      {"ExplicitBeatsEverything",
       merge({torchrun, ompi, slurm, pmi}),
       Explicit(1, 2),
       {1, 2, 1, 2, "node0", 1234, kE}},
      {"ExplicitAll",
       torchrun,
       explicit_all,
       {2, 4, 0, 2, "10.1.2.3", 4000, kE}},
      // A lower-priority source is not read at all once a higher one is chosen.
      {"MalformedLowerSourceIgnored",
       merge({torchrun,
              {{"OMPI_COMM_WORLD_RANK", "x"},
               {"SLURM_PROCID", "-1"},
               {"PMI_SIZE", "zero"}}}),
       {},
       {5, 8, 1, 4, "node0", 1234, kT}},
      {"MasterOverridesRefineEnvSource",
       torchrun,
       master_only,
       {5, 8, 1, 4, "override-host", 65535, kT}},
      {"LocalOverridesRefineEnvSource",
       {{"OMPI_COMM_WORLD_RANK", "3"}, {"OMPI_COMM_WORLD_SIZE", "4"}},
       local_only,
       {3, 4, 1, 2, "127.0.0.1", 29500, kO}},
      {"MasterAddrTrimmed",
       {{"MASTER_ADDR", "  host1 \n"}},
       {},
       {0, 1, 0, 1, "host1", 29500, k1}},
  };
}

class DiscoverGoodTest : public ::testing::TestWithParam<GoodCase> {};

TEST_P(DiscoverGoodTest, MatchesExpectedValues) {
  const GoodCase& c = GetParam();
  absl::StatusOr<LaunchEnv> got =
      DiscoverLaunchEnv(c.overrides, MapEnvLookup(c.env));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->rank, c.want.rank);
  EXPECT_EQ(got->world_size, c.want.world_size);
  EXPECT_EQ(got->local_rank, c.want.local_rank);
  EXPECT_EQ(got->local_world_size, c.want.local_world_size);
  EXPECT_EQ(got->master_addr, c.want.master_addr);
  EXPECT_EQ(got->master_port, c.want.master_port);
  EXPECT_EQ(got->source, c.want.source)
      << LaunchSourceName(got->source) << " vs "
      << LaunchSourceName(c.want.source);
}

INSTANTIATE_TEST_SUITE_P(Table, DiscoverGoodTest,
                         ::testing::ValuesIn(GoodCases()),
                         [](const ::testing::TestParamInfo<GoodCase>& info) {
                           return info.param.name;
                         });

struct BadCase {
  std::string name;
  Env env;
  LaunchOverrides overrides;
  // Every substring must occur in the error message.
  std::vector<std::string> mentions;
};

std::vector<BadCase> BadCases() {
  LaunchOverrides only_rank;
  only_rank.rank = 0;
  LaunchOverrides only_world;
  only_world.world_size = 2;
  LaunchOverrides bad_port;
  bad_port.master_port = 0;
  LaunchOverrides empty_addr;
  empty_addr.master_addr = "";
  LaunchOverrides explicit_rank_too_big = Explicit(2, 2);
  LaunchOverrides bad_local = Explicit(0, 4);
  bad_local.local_rank = 2;
  bad_local.local_world_size = 2;
  return {
      {"RankNotInteger",
       {{"RANK", "one"}, {"WORLD_SIZE", "2"}},
       {},
       {"RANK='one'", "not an integer"}},
      {"RankOverflow",
       {{"RANK", "99999999999"}, {"WORLD_SIZE", "2"}},
       {},
       {"RANK='99999999999'"}},
      {"RankTrailingGarbage",
       {{"RANK", "1x"}, {"WORLD_SIZE", "2"}},
       {},
       {"RANK='1x'"}},
      {"RankNegative",
       {{"RANK", "-1"}, {"WORLD_SIZE", "2"}},
       {},
       {"RANK=-1", "out of range", "WORLD_SIZE=2"}},
      {"RankEqualsWorldSize",
       {{"RANK", "4"}, {"WORLD_SIZE", "4"}},
       {},
       {"RANK=4", "WORLD_SIZE=4"}},
      {"WorldSizeZero",
       {{"RANK", "0"}, {"WORLD_SIZE", "0"}},
       {},
       {"WORLD_SIZE=0", ">= 1"}},
      {"OnlyRank", {{"RANK", "0"}}, {}, {"RANK=0", "WORLD_SIZE is not"}},
      {"OnlyWorldSize",
       {{"WORLD_SIZE", "2"}},
       {},
       {"WORLD_SIZE=2", "RANK is not"}},
      {"LocalRankNotLessThanLocalSize",
       {{"RANK", "3"},
        {"WORLD_SIZE", "4"},
        {"LOCAL_RANK", "2"},
        {"LOCAL_WORLD_SIZE", "2"}},
       {},
       {"LOCAL_RANK=2", "LOCAL_WORLD_SIZE=2"}},
      {"LocalRankNegative",
       {{"RANK", "0"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "-2"}},
       {},
       {"LOCAL_RANK=-2"}},
      {"LocalRankBeyondWorldWhenLocalSizeUnset",
       {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "2"}},
       {},
       {"LOCAL_RANK=2", "derived from WORLD_SIZE"}},
      {"LocalWorldSizeLargerThanWorld",
       {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_WORLD_SIZE", "3"}},
       {},
       {"LOCAL_WORLD_SIZE=3", "WORLD_SIZE=2"}},
      {"LocalWorldSizeZero",
       {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_WORLD_SIZE", "0"}},
       {},
       {"LOCAL_WORLD_SIZE=0"}},
      {"LocalWorldSizeNotInteger",
       {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_WORLD_SIZE", "2.0"}},
       {},
       {"LOCAL_WORLD_SIZE='2.0'"}},
      {"MasterPortZero", {{"MASTER_PORT", "0"}}, {}, {"MASTER_PORT=0"}},
      {"MasterPortTooLarge",
       {{"MASTER_PORT", "65536"}},
       {},
       {"MASTER_PORT=65536", "65535"}},
      {"MasterPortNotInteger",
       {{"MASTER_PORT", "http"}},
       {},
       {"MASTER_PORT='http'"}},
      {"MasterAddrBlank", {{"MASTER_ADDR", "   "}}, {}, {"MASTER_ADDR"}},
      {"OmpiOnlyRank",
       {{"OMPI_COMM_WORLD_RANK", "1"}},
       {},
       {"OMPI_COMM_WORLD_RANK=1", "OMPI_COMM_WORLD_SIZE is not"}},
      {"OmpiRankTooBig",
       {{"OMPI_COMM_WORLD_RANK", "2"}, {"OMPI_COMM_WORLD_SIZE", "2"}},
       {},
       {"OMPI_COMM_WORLD_RANK=2", "OMPI_COMM_WORLD_SIZE=2"}},
      {"OmpiLocalRankTooBig",
       {{"OMPI_COMM_WORLD_RANK", "1"},
        {"OMPI_COMM_WORLD_SIZE", "2"},
        {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
        {"OMPI_COMM_WORLD_LOCAL_SIZE", "1"}},
       {},
       {"OMPI_COMM_WORLD_LOCAL_RANK=1", "OMPI_COMM_WORLD_LOCAL_SIZE=1"}},
      {"SlurmWithoutNtasks",
       {{"SLURM_PROCID", "0"}},
       {},
       {"SLURM_PROCID=0", "SLURM_NTASKS"}},
      {"SlurmProcidNotInteger",
       {{"SLURM_PROCID", "a"}, {"SLURM_NTASKS", "2"}},
       {},
       {"SLURM_PROCID='a'"}},
      {"SlurmLocalIdTooBig",
       {{"SLURM_PROCID", "0"},
        {"SLURM_NTASKS", "4"},
        {"SLURM_LOCALID", "2"},
        {"SLURM_NTASKS_PER_NODE", "2"}},
       {},
       {"SLURM_LOCALID=2", "SLURM_NTASKS_PER_NODE=2"}},
      {"SlurmMalformedTasksPerNode",
       {{"SLURM_PROCID", "0"},
        {"SLURM_NTASKS", "4"},
        {"SLURM_NODEID", "0"},
        {"SLURM_TASKS_PER_NODE", "2(3)"}},
       {},
       {"SLURM_TASKS_PER_NODE='2(3)'", "malformed"}},
      {"SlurmNodeIdBeyondList",
       {{"SLURM_PROCID", "0"},
        {"SLURM_NTASKS", "4"},
        {"SLURM_NODEID", "3"},
        {"SLURM_TASKS_PER_NODE", "2,2"}},
       {},
       {"SLURM_NODEID=3", "2 nodes"}},
      {"PmiOnlySize", {{"PMI_SIZE", "4"}}, {}, {"PMI_SIZE=4", "PMI_RANK"}},
      {"PmiLocalTooBig",
       {{"PMI_RANK", "0"},
        {"PMI_SIZE", "4"},
        {"MPI_LOCALRANKID", "3"},
        {"MPI_LOCALNRANKS", "2"}},
       {},
       {"MPI_LOCALRANKID=3", "MPI_LOCALNRANKS=2"}},
      // A malformed higher-priority source is an error, not skipped.
      {"HalfSetTorchrunNotSkippedForOmpi",
       {{"RANK", "0"},
        {"OMPI_COMM_WORLD_RANK", "0"},
        {"OMPI_COMM_WORLD_SIZE", "1"}},
       {},
       {"WORLD_SIZE is not"}},
      {"ExplicitOnlyRank",
       {{"RANK", "0"}, {"WORLD_SIZE", "1"}},
       only_rank,
       {"explicit rank=0", "explicit world_size is not"}},
      {"ExplicitOnlyWorld",
       {},
       only_world,
       {"explicit world_size=2", "explicit rank is not"}},
      {"ExplicitRankTooBig",
       {},
       explicit_rank_too_big,
       {"explicit rank=2", "explicit world_size=2"}},
      {"ExplicitLocalRankTooBig",
       {},
       bad_local,
       {"explicit local_rank=2", "explicit local_world_size=2"}},
      {"ExplicitPortZero", {}, bad_port, {"explicit master_port=0"}},
      {"ExplicitEmptyAddr", {}, empty_addr, {"explicit master_addr"}},
  };
}

class DiscoverBadTest : public ::testing::TestWithParam<BadCase> {};

TEST_P(DiscoverBadTest, InvalidArgumentNamingTheVariable) {
  const BadCase& c = GetParam();
  absl::StatusOr<LaunchEnv> got =
      DiscoverLaunchEnv(c.overrides, MapEnvLookup(c.env));
  ASSERT_FALSE(got.ok()) << got->DebugString();
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument)
      << got.status();
  for (const std::string& m : c.mentions) {
    EXPECT_THAT(std::string(got.status().message()), HasSubstr(m));
  }
}

INSTANTIATE_TEST_SUITE_P(Table, DiscoverBadTest,
                         ::testing::ValuesIn(BadCases()),
                         [](const ::testing::TestParamInfo<BadCase>& info) {
                           return info.param.name;
                         });

TEST(SlurmTasksOnNode, ExpandsCompressedLists) {
  // "2(x3),1,4(x2)" = nodes [2, 2, 2, 1, 4, 4].
  const std::vector<int> want = {2, 2, 2, 1, 4, 4};
  for (int node = 0; node < static_cast<int>(want.size()); ++node) {
    absl::StatusOr<int> n = SlurmTasksOnNode("V", "2(x3),1,4(x2)", node);
    ASSERT_TRUE(n.ok()) << n.status();
    EXPECT_EQ(*n, want[node]) << "node " << node;
  }
  absl::StatusOr<int> beyond = SlurmTasksOnNode("V", "2(x3),1,4(x2)", 6);
  EXPECT_EQ(beyond.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SlurmTasksOnNode("V", "2", -1).status().code(),
            absl::StatusCode::kInvalidArgument);
  for (const char* bad :
       {"", "x", "0", "2(x0)", "2(x)", "2(y3)", "2(x3", "-1", "2,,1"}) {
    absl::StatusOr<int> n = SlurmTasksOnNode("V", bad, 0);
    // "2,,1" fails only when the empty item is reached.
    if (std::string(bad) == "2,,1") n = SlurmTasksOnNode("V", bad, 1);
    EXPECT_EQ(n.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(n.status().message()), HasSubstr("V='")) << bad;
  }
}

TEST(LaunchEnv, NamesAndDebugString) {
  EXPECT_EQ(LaunchSourceName(LaunchSource::kExplicit), "explicit");
  EXPECT_EQ(LaunchSourceName(LaunchSource::kTorchrun), "torchrun");
  EXPECT_EQ(LaunchSourceName(LaunchSource::kOpenMpi), "openmpi");
  EXPECT_EQ(LaunchSourceName(LaunchSource::kSlurm), "slurm");
  EXPECT_EQ(LaunchSourceName(LaunchSource::kPmi), "pmi");
  EXPECT_EQ(LaunchSourceName(LaunchSource::kSingleProcess), "single_process");
  absl::StatusOr<LaunchEnv> env =
      DiscoverLaunchEnv({}, MapEnvLookup({{"RANK", "1"}, {"WORLD_SIZE", "4"}}));
  ASSERT_TRUE(env.ok()) << env.status();
  EXPECT_EQ(env->DebugString(),
            "rank 1/4 (local 1/4) master 127.0.0.1:29500 via torchrun");
}

TEST(LaunchEnv, ProcessEnvLookupReadsTheEnvironment) {
  ASSERT_EQ(setenv("TP_LAUNCH_ENV_TEST_VAR", "abc", 1), 0);
  EnvLookup env = ProcessEnvLookup();
  EXPECT_EQ(env("TP_LAUNCH_ENV_TEST_VAR"), std::optional<std::string>("abc"));
  ASSERT_EQ(unsetenv("TP_LAUNCH_ENV_TEST_VAR"), 0);
  EXPECT_EQ(env("TP_LAUNCH_ENV_TEST_VAR"), std::nullopt);
}

// Open MPI's mpirun exports these for `mpirun -np 2` on one host; the same
// program must see its rank without any torchrun variable.
TEST(LaunchEnv, DiscoversMpirunStyleProcessEnvironment) {
  for (const char* v : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                        "MASTER_ADDR", "MASTER_PORT"}) {
    ASSERT_EQ(unsetenv(v), 0);
  }
  ASSERT_EQ(setenv("OMPI_COMM_WORLD_RANK", "1", 1), 0);
  ASSERT_EQ(setenv("OMPI_COMM_WORLD_SIZE", "2", 1), 0);
  ASSERT_EQ(setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1", 1), 0);
  ASSERT_EQ(setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2", 1), 0);
  absl::StatusOr<LaunchEnv> env = DiscoverLaunchEnv();
  for (const char* v :
       {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"}) {
    unsetenv(v);
  }
  ASSERT_TRUE(env.ok()) << env.status();
  EXPECT_EQ(env->source, LaunchSource::kOpenMpi);
  EXPECT_EQ(env->rank, 1);
  EXPECT_EQ(env->world_size, 2);
  EXPECT_EQ(env->local_rank, 1);
  EXPECT_EQ(env->local_world_size, 2);
}

}  // namespace
}  // namespace tp
