// A backend plugin built for another plugin ABI version: it tries to register
// "wrong_abi" and reports version TP_PLUGIN_ABI_VERSION + 1000, so the host
// must refuse it and register nothing.
#include "comm/backend_registry.h"

extern "C" __attribute__((visibility("default"))) int tp_register_backends(
    TpPluginApi* api) {
  tp::RegisterPluginBackend(
      api, "wrong_abi",
      [](const tp::BackendContext&)
          -> absl::StatusOr<std::unique_ptr<tp::Communicator>> {
        return absl::UnimplementedError("never called");
      });
  return TP_PLUGIN_ABI_VERSION + 1000;
}
