#include "comm/process_group.h"

#include <signal.h>
#include <unistd.h>

#include <cstdlib>

#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/multiprocess.h"
#include "tests/testing/run_ranks.h"

// Gloo's CreateDeviceAttr leaks its getifaddrs list when it throws (the
// "no-such-iface0" case of BackendOptionsReachTheBackend), as in
// tests/backends/gloo/gloo_errors_test.cc. Only LeakSanitizer builds
// (--config=asan) read this hook.
extern "C" const char* __lsan_default_suppressions() {
  return "leak:gloo::transport::tcp::CreateDeviceAttr\n";
}

namespace tp {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

TensorParallelConfig Config(int rank, int world, int tp) {
  TensorParallelConfig config;
  config.tensor_parallel_size = tp;
  config.backend = "gloo";
  config.timeout = absl::Seconds(10);
  config.launch.rank = rank;
  config.launch.world_size = world;
  config.launch.local_rank = rank;
  config.launch.local_world_size = world;
  return config;
}

// Runs Init + body for `world` ranks on threads over one in-process store.
std::vector<absl::Status> RunThreads(
    int world, const std::function<TensorParallelConfig(int)>& config_for,
    const std::function<absl::Status(int, ProcessGroupManager&)>& body) {
  return RunRanks(world, [&](int rank, std::shared_ptr<Store> store) {
    TensorParallelConfig config = config_for(rank);
    config.store = std::move(store);
    absl::StatusOr<std::unique_ptr<ProcessGroupManager>> pg =
        ProcessGroupManager::Init(config);
    if (!pg.ok()) return pg.status();
    return body(rank, **pg);
  });
}

absl::Status ExpectAllReduce(Communicator& comm, const std::vector<int>& members,
                             int world_rank) {
  // Each member contributes (world rank + 1) at every element; the sum is
  // the closed form sum over members.
  Tensor t = Tensor::Full({7}, world_rank + 1, DType::kFloat32);
  absl::Status s = comm.AllReduce(t);
  if (!s.ok()) return s;
  double expected = 0;
  for (int m : members) expected += m + 1;
  for (double v : t.ToDoubles()) {
    if (v != expected) {
      return absl::InternalError(
          absl::StrCat("rank ", world_rank, ": got ", v, " want ", expected));
    }
  }
  return absl::OkStatus();
}

TEST(ProcessGroupManagerTest, GroupLayoutIsMegatrons) {
  auto tp = ProcessGroupManager::TensorParallelGroups(4, 2);
  ASSERT_TRUE(tp.ok());
  EXPECT_THAT(*tp, ElementsAre(ElementsAre(0, 1), ElementsAre(2, 3)));
  auto dp = ProcessGroupManager::DataParallelGroups(4, 2);
  ASSERT_TRUE(dp.ok());
  EXPECT_THAT(*dp, ElementsAre(ElementsAre(0, 2), ElementsAre(1, 3)));
  auto dp8 = ProcessGroupManager::DataParallelGroups(8, 4);
  ASSERT_TRUE(dp8.ok());
  EXPECT_THAT((*dp8)[3], ElementsAre(3, 7));
  auto bad = ProcessGroupManager::TensorParallelGroups(6, 4);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("does not divide world size 6"));
}

TEST(TensorParallelConfigTest, FromEnvReadsTheDocumentedVariables) {
  auto config = TensorParallelConfig::FromEnv(MapEnvLookup({
      {"TP_SIZE", "2"},
      {"TP_BACKEND", "gloo"},
      {"TP_TIMEOUT_SECONDS", "1.5"},
      {"TP_STORE_PATH", "/shared/job"},
      {"TP_BACKEND_PLUGINS", "/a.so:/b.so"},
      {"TP_GLOO_INTERFACE", "lo"},
      {"TP_GLOO_CHECK_CONSISTENCY", "false"},
  }));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->tensor_parallel_size, 2);
  EXPECT_EQ(config->backend, "gloo");
  EXPECT_EQ(config->timeout, absl::Milliseconds(1500));
  EXPECT_EQ(config->store_path, "/shared/job");
  EXPECT_EQ(config->backend_plugins, "/a.so:/b.so");
  EXPECT_EQ(config->backend_options.at("gloo.iface"), "lo");
  EXPECT_EQ(config->backend_options.at("gloo.check_consistency"), "false");

  auto defaults = TensorParallelConfig::FromEnv(MapEnvLookup({}));
  ASSERT_TRUE(defaults.ok());
  EXPECT_EQ(defaults->tensor_parallel_size, 0);
  EXPECT_EQ(defaults->backend, "auto");
  EXPECT_EQ(defaults->timeout, absl::Seconds(300));
}

TEST(TensorParallelConfigTest, FromEnvRejectsBadValuesNamingTheVariable) {
  for (const auto& [var, value] : std::vector<std::pair<std::string, std::string>>{
           {"TP_SIZE", "two"}, {"TP_SIZE", "-1"}, {"TP_TIMEOUT_SECONDS", "0"},
           {"TP_TIMEOUT_SECONDS", "soon"}, {"TP_BACKEND", ""}}) {
    auto config = TensorParallelConfig::FromEnv(MapEnvLookup({{var, value}}));
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument) << var;
    EXPECT_THAT(config.status().message(), HasSubstr(var));
  }
}

class ProcessGroupWorldTest : public ::testing::TestWithParam<int> {};

TEST_P(ProcessGroupWorldTest, WorldTensorAndDataParallelGroupsReduce) {
  const int world = GetParam();
  for (int tp : {1, world == 4 ? 2 : world, world}) {
    auto statuses = RunThreads(
        world, [&](int r) { return Config(r, world, tp); },
        [&](int r, ProcessGroupManager& pg) -> absl::Status {
          if (pg.world_size() != world || pg.rank() != r ||
              pg.tensor_parallel_size() != tp ||
              pg.tensor_parallel().size() != tp ||
              pg.data_parallel().size() != world / tp ||
              pg.tensor_parallel().rank() != r % tp ||
              pg.data_parallel().rank() != r / tp || pg.backend() != "gloo") {
            return absl::InternalError(absl::StrCat("bad layout on rank ", r));
          }
          std::vector<int> all(world);
          for (int i = 0; i < world; ++i) all[i] = i;
          absl::Status s = ExpectAllReduce(pg.world(), all, r);
          if (!s.ok()) return s;
          std::vector<int> tp_members, dp_members;
          for (int i = 0; i < world; ++i) {
            if (i / tp == r / tp) tp_members.push_back(i);
            if (i % tp == r % tp) dp_members.push_back(i);
          }
          s = ExpectAllReduce(pg.tensor_parallel(), tp_members, r);
          if (!s.ok()) return s;
          return ExpectAllReduce(pg.data_parallel(), dp_members, r);
        });
    for (int r = 0; r < world; ++r) {
      EXPECT_TRUE(statuses[r].ok()) << "tp " << tp << " rank " << r << ": "
                                    << statuses[r];
    }
  }
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, ProcessGroupWorldTest,
                         ::testing::Values(1, 2, 3, 4));

TEST(ProcessGroupManagerTest, FileStoreRendezvous) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = absl::StrCat(tmp ? tmp : "/tmp", "/pg_file_store_",
                                       getpid());
  auto statuses = RunRanks(3, [&](int rank, std::shared_ptr<Store>) {
    TensorParallelConfig config = Config(rank, 3, 0);
    config.store_path = dir;
    auto pg = ProcessGroupManager::Init(config);
    if (!pg.ok()) return pg.status();
    return ExpectAllReduce((*pg)->world(), {0, 1, 2}, rank);
  });
  for (const absl::Status& s : statuses) EXPECT_TRUE(s.ok()) << s;
}

TEST(ProcessGroupManagerTest, BackendOptionsReachTheBackend) {
  // Binding the loopback interface by name works; a missing interface fails
  // (so the option is not silently dropped).
  for (const std::string iface : {"lo", "no-such-iface0"}) {
    auto statuses = RunThreads(
        2,
        [&](int r) {
          TensorParallelConfig config = Config(r, 2, 0);
          config.timeout = absl::Seconds(3);
          config.backend_options["gloo.iface"] = iface;
          return config;
        },
        [&](int r, ProcessGroupManager& pg) {
          return ExpectAllReduce(pg.world(), {0, 1}, r);
        });
    for (const absl::Status& s : statuses) {
      EXPECT_EQ(s.ok(), iface == "lo") << iface << ": " << s;
    }
  }
}

TEST(ProcessGroupManagerTest, NewGroupOfOddRanks) {
  auto statuses = RunThreads(
      4, [&](int r) { return Config(r, 4, 2); },
      [&](int r, ProcessGroupManager& pg) -> absl::Status {
        if (r % 2 == 0) {
          auto g = pg.NewGroup({1, 3});
          if (g.status().code() != absl::StatusCode::kInvalidArgument) {
            return absl::InternalError("non-member NewGroup must fail");
          }
          return absl::OkStatus();
        }
        auto group = pg.NewGroup({1, 3});
        if (!group.ok()) return group.status();
        if ((*group)->size() != 2 || (*group)->rank() != r / 2) {
          return absl::InternalError("bad NewGroup rank/size");
        }
        return ExpectAllReduce(**group, {1, 3}, r);
      });
  for (int r = 0; r < 4; ++r) EXPECT_TRUE(statuses[r].ok()) << statuses[r];
}

TEST(ProcessGroupManagerTest, NewGroupRejectsBadRankLists) {
  auto pg = ProcessGroupManager::Init(Config(0, 1, 0));
  ASSERT_TRUE(pg.ok()) << pg.status();
  for (const std::vector<int>& ranks :
       std::vector<std::vector<int>>{{}, {0, 0}, {0, 1}, {-1}}) {
    EXPECT_EQ((*pg)->NewGroup(ranks).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
}

TEST(ProcessGroupManagerTest, IndivisibleTensorParallelSizeIsInvalidArgument) {
  auto pg = ProcessGroupManager::Init(Config(0, 3, 2));
  EXPECT_EQ(pg.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(pg.status().message(),
              HasSubstr("tensor-parallel size 2 does not divide world size 3"));
}

TEST(ProcessGroupManagerTest, UnknownBackendIsNotFoundListingNames) {
  TensorParallelConfig config = Config(0, 1, 0);
  config.backend = "carrier-pigeon";
  auto pg = ProcessGroupManager::Init(config);
  EXPECT_EQ(pg.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(pg.status().message(), HasSubstr("carrier-pigeon"));
  EXPECT_THAT(pg.status().message(), HasSubstr("gloo"));
}

TEST(ProcessGroupManagerTest, MissingRankIsDeadlineExceededNamingIt) {
  const absl::Time start = absl::Now();
  // World of 3, but rank 2 never starts.
  auto statuses = RunThreads(
      2,
      [&](int r) {
        TensorParallelConfig config = Config(r, 3, 0);
        config.timeout = absl::Seconds(1);
        return config;
      },
      [](int, ProcessGroupManager&) { return absl::OkStatus(); });
  const absl::Duration elapsed = absl::Now() - start;
  for (const absl::Status& s : statuses) {
    EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
    EXPECT_THAT(s.message(), HasSubstr("ranks [2] of 3 never arrived"));
  }
  EXPECT_LT(elapsed, absl::Seconds(1) + absl::Milliseconds(1500));
}

TEST(ProcessGroupManagerTest, DisagreeingWorldSizesAreInvalidArgument) {
  // Rank 0 believes in a world of 2, rank 1 in a world of 3 (rank 2 of the
  // larger world arrives too, so that nobody times out first).
  auto statuses = RunThreads(
      3,
      [&](int r) {
        TensorParallelConfig config = Config(r, r == 0 ? 2 : 3, 0);
        config.timeout = absl::Seconds(2);
        return config;
      },
      [](int, ProcessGroupManager&) { return absl::OkStatus(); });
  for (int r = 1; r < 3; ++r) {
    EXPECT_EQ(statuses[r].code(), absl::StatusCode::kInvalidArgument)
        << statuses[r];
    EXPECT_THAT(statuses[r].message(), HasSubstr("world size"));
  }
  EXPECT_FALSE(statuses[0].ok());
}

// Real processes over the TCP store hosted by rank 0.
TEST(ProcessGroupMultiProcessTest, FourProcessesOverTcpStore) {
  const int port = testing::PickFreePort();
  auto results = testing::RunProcesses(
      4,
      [&](int r) {
        TensorParallelConfig config = Config(r, 4, 2);
        config.launch.master_addr = "127.0.0.1";
        config.launch.master_port = port;
        auto pg = ProcessGroupManager::Init(config);
        if (!pg.ok()) return 10;
        if (!ExpectAllReduce((*pg)->world(), {0, 1, 2, 3}, r).ok()) return 11;
        std::vector<int> tp_members = {r / 2 * 2, r / 2 * 2 + 1};
        if (!ExpectAllReduce((*pg)->tensor_parallel(), tp_members, r).ok()) {
          return 12;
        }
        return (*pg)->world().Barrier().ok() ? 0 : 13;
      },
      absl::Seconds(60));
  ASSERT_TRUE(results.ok());
  for (const auto& r : *results) {
    EXPECT_EQ(r.exit_code, 0) << "rank " << r.rank << " signal " << r.signal;
  }
}

// A rank that dies during a collective: the survivors get an error (not a
// hang, not a wrong result) within the timeout + 1 s.
TEST(ProcessGroupMultiProcessTest, KilledRankGivesErrorsWithinTimeout) {
  const int port = testing::PickFreePort();
  constexpr absl::Duration kTimeout = absl::Seconds(3);
  auto results = testing::RunProcesses(
      3,
      [&](int r) {
        TensorParallelConfig config = Config(r, 3, 0);
        config.timeout = kTimeout;
        config.launch.master_addr = "127.0.0.1";
        config.launch.master_port = port;
        auto pg = ProcessGroupManager::Init(config);
        if (!pg.ok()) return 10;
        if (!(*pg)->world().Barrier().ok()) return 11;
        if (r == 2) raise(SIGKILL);  // dies before the next collective
        Tensor t = Tensor::Full({1 << 16}, 1.0, DType::kFloat32);
        const absl::Time start = absl::Now();
        absl::Status s = (*pg)->world().AllReduce(t);
        const absl::Duration took = absl::Now() - start;
        if (s.ok()) return 12;
        if (s.code() != absl::StatusCode::kDeadlineExceeded &&
            s.code() != absl::StatusCode::kUnavailable) {
          return 13;
        }
        return took <= kTimeout + absl::Seconds(1) ? 0 : 14;
      },
      absl::Seconds(60));
  ASSERT_TRUE(results.ok());
  EXPECT_EQ((*results)[2].signal, SIGKILL);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ((*results)[r].exit_code, 0)
        << "rank " << r << " signal " << (*results)[r].signal;
  }
}

}  // namespace
}  // namespace tp
