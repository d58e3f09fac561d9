// The backend registry: registration, "auto", lookup errors, context
// validation and plugin loading failures. (A real plugin running collectives
// is tested in tests/backends/gloo/gloo_registration_test.cc.)
#include "comm/backend_registry.h"

#include <cstdlib>
#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "runtime/hash_store.h"
#include "tests/testing/fake_communicator.h"

namespace tp {
namespace {

absl::StatusOr<std::unique_ptr<Communicator>> MakeFake(const BackendContext&) {
  return std::unique_ptr<Communicator>(new FakeCommunicator());
}

std::string RunfilePath(const std::string& relative) {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  return absl::StrCat(srcdir ? srcdir : ".", "/",
                      workspace ? workspace : "tensor_parallel", "/", relative);
}

TEST(BackendRegistryTest, RegistersAndCreatesByName) {
  BackendRegistry registry;
  ASSERT_TRUE(registry.Register("fake", &MakeFake).ok());
  EXPECT_TRUE(registry.Contains("fake"));
  EXPECT_FALSE(registry.Contains("auto"));
  EXPECT_EQ(registry.Names(), std::vector<std::string>{"fake"});
  BackendContext ctx;
  absl::StatusOr<std::unique_ptr<Communicator>> comm = registry.Create("fake", ctx);
  ASSERT_TRUE(comm.ok()) << comm.status();
  EXPECT_EQ((*comm)->backend(), "fake");
  EXPECT_EQ((*comm)->size(), 1);
}

TEST(BackendRegistryTest, RefusesDuplicateAndReservedNames) {
  BackendRegistry registry;
  ASSERT_TRUE(registry.Register("fake", &MakeFake).ok());
  EXPECT_EQ(registry.Register("fake", &MakeFake).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(registry.Register("auto", &MakeFake).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.Register("", &MakeFake).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.Register("null", BackendFactory()).code(),
            absl::StatusCode::kInvalidArgument);
  // RegisterAll is all or nothing.
  std::vector<std::pair<std::string, BackendFactory>> batch;
  batch.emplace_back("new_one", &MakeFake);
  batch.emplace_back("fake", &MakeFake);
  EXPECT_EQ(registry.RegisterAll(std::move(batch)).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_FALSE(registry.Contains("new_one"));
}

TEST(BackendRegistryTest, UnknownNameIsNotFoundListingRegisteredNames) {
  BackendRegistry registry;
  ASSERT_TRUE(registry.Register("zeta", &MakeFake).ok());
  ASSERT_TRUE(registry.Register("alpha", &MakeFake).ok());
  absl::StatusOr<std::unique_ptr<Communicator>> comm =
      registry.Create("mpi", BackendContext());
  ASSERT_EQ(comm.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(comm.status().message(), "\"mpi\""));
  EXPECT_TRUE(absl::StrContains(comm.status().message(), "[alpha, zeta]"))
      << comm.status();
  // "auto" on the CPU means gloo, which this registry lacks.
  comm = registry.Create("auto", BackendContext());
  ASSERT_EQ(comm.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(comm.status().message(), "\"gloo\""));
}

TEST(BackendRegistryTest, AutoPicksNcclOnlyForCudaDevicesWhenRegistered) {
  BackendRegistry registry;
  EXPECT_EQ(registry.Resolve("auto", Device::Cpu()), "gloo");
  EXPECT_EQ(registry.Resolve("auto", Device::Cuda(0)), "gloo");
  ASSERT_TRUE(registry.Register("nccl", &MakeFake).ok());
  EXPECT_EQ(registry.Resolve("auto", Device::Cuda(1)), "nccl");
  EXPECT_EQ(registry.Resolve("auto", Device::Cpu()), "gloo");
  EXPECT_EQ(registry.Resolve("gloo", Device::Cuda(0)), "gloo");
}

TEST(BackendRegistryTest, RejectsMalformedContexts) {
  BackendRegistry registry;
  ASSERT_TRUE(registry.Register("fake", &MakeFake).ok());
  auto code = [&](BackendContext ctx) {
    return registry.Create("fake", ctx).status().code();
  };
  BackendContext ctx;
  ctx.size = 0;
  EXPECT_EQ(code(ctx), absl::StatusCode::kInvalidArgument);
  ctx.size = 2;
  ctx.rank = 2;
  ctx.store = std::make_shared<HashStore>();
  EXPECT_EQ(code(ctx), absl::StatusCode::kInvalidArgument);
  ctx.rank = 1;
  ctx.store = nullptr;
  EXPECT_EQ(code(ctx), absl::StatusCode::kInvalidArgument);
  ctx.store = std::make_shared<HashStore>();
  ctx.timeout = absl::ZeroDuration();
  EXPECT_EQ(code(ctx), absl::StatusCode::kInvalidArgument);
  ctx.timeout = absl::Seconds(1);
  EXPECT_EQ(code(ctx), absl::StatusCode::kOk);
}

TEST(BackendRegistryTest, NullCommunicatorFromAFactoryIsInternal) {
  BackendRegistry registry;
  ASSERT_TRUE(registry
                  .Register("broken",
                            [](const BackendContext&)
                                -> absl::StatusOr<std::unique_ptr<Communicator>> {
                              return std::unique_ptr<Communicator>();
                            })
                  .ok());
  EXPECT_EQ(registry.Create("broken", BackendContext()).status().code(),
            absl::StatusCode::kInternal);
}

TEST(BackendRegistryTest, MissingPluginFileIsNotFoundWithDlerror) {
  BackendRegistry registry;
  absl::Status s = LoadBackendPlugin("/nonexistent/libnothing.so", &registry);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(s.message(), "/nonexistent/libnothing.so"));
  EXPECT_TRUE(absl::StrContains(s.message(), "No such file")) << s;
}

TEST(BackendRegistryTest, LibraryWithoutEntryPointIsNotFound) {
  BackendRegistry registry;
  absl::Status s = LoadBackendPlugin(
      RunfilePath("tests/comm/libtp_no_entry_plugin.so"), &registry);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(s.message(), "tp_register_backends")) << s;
}

TEST(BackendRegistryTest, WrongAbiVersionIsRefusedNamingBothVersions) {
  BackendRegistry registry;
  absl::Status s = LoadBackendPlugin(
      RunfilePath("tests/comm/libtp_wrong_abi_plugin.so"), &registry);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(
      s.message(), absl::StrCat("version ", TP_PLUGIN_ABI_VERSION + 1000)))
      << s;
  EXPECT_TRUE(absl::StrContains(
      s.message(), absl::StrCat("has version ", TP_PLUGIN_ABI_VERSION)))
      << s;
  EXPECT_FALSE(registry.Contains("wrong_abi"));
  EXPECT_TRUE(registry.Names().empty());
}

TEST(BackendRegistryTest, RefusedRegistrationRegistersNothing) {
  BackendRegistry registry;
  absl::Status s = LoadBackendPlugin(
      RunfilePath("tests/comm/libtp_bad_registration_plugin.so"), &registry);
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists) << s;
  EXPECT_TRUE(registry.Names().empty());
}

TEST(BackendRegistryTest, PluginListStopsAtTheFirstErrorNamingThePath) {
  BackendRegistry registry;
  EXPECT_TRUE(LoadBackendPlugins("", &registry).ok());
  EXPECT_TRUE(LoadBackendPlugins(":::", &registry).ok());
  absl::Status s = LoadBackendPlugins(
      absl::StrCat(":", RunfilePath("tests/comm/libtp_wrong_abi_plugin.so"),
                   ":/nonexistent/second.so"),
      &registry);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "libtp_wrong_abi_plugin.so"));
}

TEST(BackendRegistryTest, RegistrarAddsToTheGlobalRegistry) {
  static const BackendRegistrar registrar("fake_global_for_test", &MakeFake);
  EXPECT_TRUE(BackendRegistry::Global().Contains("fake_global_for_test"));
  absl::StatusOr<std::unique_ptr<Communicator>> comm =
      CreateCommunicator("fake_global_for_test", BackendContext());
  ASSERT_TRUE(comm.ok()) << comm.status();
  // A second registrar with the same name logs and keeps the first.
  static const BackendRegistrar again("fake_global_for_test", &MakeFake);
  EXPECT_TRUE(BackendRegistry::Global().Contains("fake_global_for_test"));
}

}  // namespace
}  // namespace tp
