// The Gloo backend as a plugin: a shared library whose one exported C
// function registers the backend "gloo_plugin". It shows (and tests) the
// plugin path of comm/backend_registry.h end to end; programs normally link
// //backends/gloo:gloo_communicator and use "gloo".
#include "backends/gloo/gloo_communicator.h"
#include "comm/backend_registry.h"

namespace {

absl::StatusOr<std::unique_ptr<tp::Communicator>> CreateGlooPluginCommunicator(
    const tp::BackendContext& ctx) {
  absl::StatusOr<tp::GlooOptions> options = tp::ParseGlooOptions(ctx.options);
  if (!options.ok()) return options.status();
  absl::StatusOr<std::unique_ptr<tp::GlooCommunicator>> comm =
      tp::GlooCommunicator::Create(ctx, *options, "gloo_plugin");
  if (!comm.ok()) return comm.status();
  return std::unique_ptr<tp::Communicator>(std::move(comm).value());
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int tp_register_backends(
    TpPluginApi* api) {
  if (api->abi_version != TP_PLUGIN_ABI_VERSION) {
    return TP_PLUGIN_ABI_VERSION;  // the host reports the mismatch
  }
  tp::RegisterPluginBackend(api, "gloo_plugin", &CreateGlooPluginCommunicator);
  return TP_PLUGIN_ABI_VERSION;
}
