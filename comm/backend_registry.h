// Backend registry: communicator backends by name, and backend plugins.
//
// A backend is a factory that builds one Communicator for one rank of one
// group from a BackendContext (rank, size, rendezvous store, timeout, device,
// backend options). Backends register under a name:
//   * built-in backends from their own Bazel target, through a static
//     BackendRegistrar in one .cc file of a library with `alwayslink = 1`
//     (//backends/gloo:gloo_communicator registers "gloo"), so that linking
//     the target is what makes the name available;
//   * plugins from a shared library loaded at startup with LoadBackendPlugins,
//     which registers its backends through one exported C function (see
//     "Plugins" below).
// CreateCommunicator(name, ctx) picks the factory. The name "auto" means
// "nccl" when ctx.device is a CUDA device and "nccl" is registered, else
// "gloo" (the per-device default of c10d: cpu -> gloo, cuda -> nccl). The
// caller (TensorParallelConfig) chooses a CUDA device only when the build has
// CUDA and a GPU is visible, so a CPU build always resolves "auto" to "gloo".
//
// Thread safety: every function may be called concurrently; factories run
// outside the registry lock.
//
// Plugins. A plugin is a shared library that exports
//     extern "C" int tp_register_backends(TpPluginApi* api);
// The host fills `api` (its ABI version and a registration callback) and
// calls it once. The function registers each backend with
// api->register_backend(api, "name", &factory) -- where factory is a
// tp::BackendFactory -- and returns kTpPluginAbiVersion as compiled into the
// plugin. Registrations are committed only when that returned version equals
// the host's; otherwise loading fails with kFailedPrecondition naming both
// versions and nothing is registered. Plugins are never unloaded. Use
// tp::RegisterPluginBackend (below) instead of calling the callback by hand.
//
// Example (a program):
//   RETURN_IF_ERROR(tp::LoadBackendPlugins(config.backend_plugins));
//   tp::BackendContext ctx;
//   ctx.rank = rank;
//   ctx.size = world_size;
//   ctx.store = group_store;                 // already prefixed for the group
//   ctx.timeout = absl::Seconds(60);
//   ASSIGN_OR_RETURN(std::unique_ptr<tp::Communicator> comm,
//                    tp::CreateCommunicator("auto", ctx));
//
// Example (a plugin, built as cc_binary(linkshared = 1)):
//   extern "C" int tp_register_backends(TpPluginApi* api) {
//     tp::RegisterPluginBackend(api, "my_backend", &CreateMyCommunicator);
//     return kTpPluginAbiVersion;
//   }
#ifndef TENSOR_PARALLEL_COMM_BACKEND_REGISTRY_H_
#define TENSOR_PARALLEL_COMM_BACKEND_REGISTRY_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "comm/communicator.h"
#include "runtime/device.h"
#include "runtime/store.h"

// ---- Plugin C interface (stable names; layout guarded by the version) ----

// Bumped whenever BackendContext, BackendFactory, Communicator, Tensor or
// TpPluginApi change in a way that breaks a plugin built against the old
// headers.
#define TP_PLUGIN_ABI_VERSION 1

extern "C" {

struct TpPluginApi {
  // The host's TP_PLUGIN_ABI_VERSION.
  uint32_t abi_version;
  // Opaque host state; pass `api` back to register_backend unchanged.
  void* host_data;
  // Registers the backend `name` (non-empty, unique) built by `*factory`, a
  // `const tp::BackendFactory*` that is copied before the call returns.
  // Returns 0 on success, -1 when name or factory is invalid or the name is
  // taken (the host records the reason and reports it from LoadBackendPlugin).
  int (*register_backend)(struct TpPluginApi* api, const char* name,
                          const void* factory);
};

// The one function a plugin exports; returns the plugin's ABI version.
typedef int (*TpRegisterBackendsFn)(struct TpPluginApi* api);

}  // extern "C"

inline constexpr int kTpPluginAbiVersion = TP_PLUGIN_ABI_VERSION;
inline constexpr char kTpPluginEntryPoint[] = "tp_register_backends";

namespace tp {

// Everything a backend needs to build the communicator of one rank.
struct BackendContext {
  // This process's rank in the group, in [0, size).
  int rank = 0;
  // Number of ranks in the group (>= 1).
  int size = 1;
  // Rendezvous store for this group, already prefixed so that its keys do not
  // collide with other groups (a backend may add its own sub-prefix). Shared
  // with the caller; must outlive the factory call. Required when size > 1.
  std::shared_ptr<Store> store;
  // Bounds the rendezvous and every later operation of the communicator.
  // Default 300 s (c10d's default is 30 min; shorter means quicker failure
  // reports but spurious timeouts on slow, large first collectives).
  absl::Duration timeout = absl::Seconds(300);
  // The device whose tensors the communicator moves. Default: the CPU.
  Device device = Device::Cpu();
  // Host (name or address) of the rendezvous server, MASTER_ADDR. Backends
  // that open sockets bind to the local address that routes to it. Empty or
  // a loopback address: every rank is on this host (bind to 127.0.0.1).
  std::string master_addr;
  // Backend-specific options as "backend.key" -> value, e.g.
  // {"gloo.hostname", "10.0.0.7"}; each backend documents its keys and
  // rejects unknown keys under its own prefix with kInvalidArgument.
  std::map<std::string, std::string> options;
};

// Builds the communicator for ctx.rank. Blocks until the group has met (every
// rank called the factory) or ctx.timeout passes (kDeadlineExceeded).
using BackendFactory =
    std::function<absl::StatusOr<std::unique_ptr<Communicator>>(
        const BackendContext& ctx)>;

class BackendRegistry {
 public:
  // The process-wide registry used by CreateCommunicator and the plugins.
  static BackendRegistry& Global();

  BackendRegistry() = default;
  BackendRegistry(const BackendRegistry&) = delete;
  BackendRegistry& operator=(const BackendRegistry&) = delete;

  // Adds `factory` under `name`. kInvalidArgument for an empty name, "auto"
  // or a null factory; kAlreadyExists when the name is taken.
  absl::Status Register(absl::string_view name, BackendFactory factory);

  // Registers all of `backends` or, on the first refusal (same errors as
  // Register, duplicates within the list included), none of them.
  absl::Status RegisterAll(
      std::vector<std::pair<std::string, BackendFactory>> backends);

  // True when `name` is registered ("auto" is never registered).
  bool Contains(absl::string_view name) const;

  // The registered names, sorted.
  std::vector<std::string> Names() const;

  // The backend "auto" stands for on `device` (see the file comment); any
  // other name is returned unchanged.
  std::string Resolve(absl::string_view name, const Device& device) const;

  // Builds a communicator with the backend `name` (or "auto"). kNotFound
  // listing the registered names when there is no such backend;
  // kInvalidArgument when ctx is malformed (size < 1, rank out of range,
  // no store with size > 1, non-positive timeout); else the factory's result.
  absl::StatusOr<std::unique_ptr<Communicator>> Create(
      absl::string_view name, const BackendContext& ctx) const;

 private:
  mutable absl::Mutex mu_;
  std::map<std::string, BackendFactory, std::less<>> factories_
      ABSL_GUARDED_BY(mu_);
};

// BackendRegistry::Global().Create(name, ctx).
absl::StatusOr<std::unique_ptr<Communicator>> CreateCommunicator(
    absl::string_view name, const BackendContext& ctx);

// Registers a built-in backend in the global registry at static
// initialization. Use it in exactly one .cc of a library with alwayslink = 1:
//   static const tp::BackendRegistrar kGloo("gloo", &CreateGlooCommunicator);
// A failed registration (duplicate name) is a programmer error: it is logged
// at ERROR level and the first registration stays.
class BackendRegistrar {
 public:
  BackendRegistrar(absl::string_view name, BackendFactory factory);
};

// Loads the plugin at `path` with dlopen and runs its tp_register_backends
// into `registry` (default: the global one). kNotFound when dlopen fails
// (dlerror() in the message) or the library does not export
// tp_register_backends; kFailedPrecondition "... ABI version P, host has H"
// on a version mismatch; kAlreadyExists / kInvalidArgument when a
// registration is refused. Nothing is registered unless every registration of
// the plugin succeeds. Loading the same path twice is an error
// (kAlreadyExists from the duplicate names).
absl::Status LoadBackendPlugin(absl::string_view path,
                               BackendRegistry* registry = nullptr);

// Loads every plugin of a colon-separated list of paths (the format of
// TP_BACKEND_PLUGINS; empty entries are skipped), stopping at the first
// error, which names the path.
absl::Status LoadBackendPlugins(absl::string_view colon_separated_paths,
                                BackendRegistry* registry = nullptr);

// For plugins: registers `factory` under `name` through `api`. Returns true
// on success; on failure the host reports the reason from LoadBackendPlugin.
inline bool RegisterPluginBackend(TpPluginApi* api, const char* name,
                                  const BackendFactory& factory) {
  return api->register_backend(api, name, &factory) == 0;
}

}  // namespace tp

#endif  // TENSOR_PARALLEL_COMM_BACKEND_REGISTRY_H_
