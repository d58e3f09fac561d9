#include "tests/testing/communicator_testing.h"

#include "comm/backend_registry.h"

namespace tp {

absl::StatusOr<std::unique_ptr<Communicator>> CreateTestCommunicator(
    absl::string_view backend, int rank, int world_size,
    std::shared_ptr<Store> store, const TestCommunicatorOptions& options) {
  BackendContext ctx;
  ctx.rank = rank;
  ctx.size = world_size;
  ctx.store = std::move(store);
  ctx.timeout = options.timeout;
  ctx.options = options.backend_options;
  return CreateCommunicator(backend, ctx);
}

}  // namespace tp
