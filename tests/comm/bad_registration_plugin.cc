// A plugin whose second registration is refused (it reuses a name), so the
// host must register neither of its backends.
#include "comm/backend_registry.h"

namespace {

absl::StatusOr<std::unique_ptr<tp::Communicator>> Unused(
    const tp::BackendContext&) {
  return absl::UnimplementedError("never called");
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int tp_register_backends(
    TpPluginApi* api) {
  tp::RegisterPluginBackend(api, "bad_first", &Unused);
  tp::RegisterPluginBackend(api, "bad_first", &Unused);
  return TP_PLUGIN_ABI_VERSION;
}
