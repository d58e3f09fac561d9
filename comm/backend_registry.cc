#include "comm/backend_registry.h"

#include <dlfcn.h>

#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "glog/logging.h"

namespace tp {
namespace {

constexpr absl::string_view kAuto = "auto";

absl::Status ValidateContext(const BackendContext& ctx) {
  if (ctx.size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("BackendContext: size must be >= 1, got ", ctx.size));
  }
  if (ctx.rank < 0 || ctx.rank >= ctx.size) {
    return absl::InvalidArgumentError(
        absl::StrCat("BackendContext: rank ", ctx.rank,
                     " is out of range [0, ", ctx.size, ")"));
  }
  if (ctx.size > 1 && ctx.store == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "BackendContext: a store is required for a group of size ", ctx.size));
  }
  if (ctx.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("BackendContext: timeout must be positive, got ",
                     absl::FormatDuration(ctx.timeout)));
  }
  return absl::OkStatus();
}

// Registrations made by one plugin, committed only when its ABI version
// matches and every registration was accepted.
struct PluginStaging {
  BackendRegistry* registry = nullptr;
  std::vector<std::pair<std::string, BackendFactory>> backends;
  absl::Status error;
};

int StagePluginBackend(TpPluginApi* api, const char* name,
                                  const void* factory) {
  auto* staging = static_cast<PluginStaging*>(api->host_data);
  if (!staging->error.ok()) return -1;
  if (name == nullptr || name[0] == '\0' || factory == nullptr) {
    staging->error = absl::InvalidArgumentError(
        "plugin registered a backend with an empty name or a null factory");
    return -1;
  }
  absl::string_view n(name);
  if (n == kAuto || staging->registry->Contains(n)) {
    staging->error = absl::AlreadyExistsError(
        absl::StrCat("plugin backend name \"", n, "\" is already taken"));
    return -1;
  }
  for (const auto& entry : staging->backends) {
    if (entry.first == n) {
      staging->error = absl::AlreadyExistsError(
          absl::StrCat("plugin registered \"", n, "\" twice"));
      return -1;
    }
  }
  const auto& fn = *static_cast<const BackendFactory*>(factory);
  if (!fn) {
    staging->error = absl::InvalidArgumentError(
        absl::StrCat("plugin registered \"", n, "\" with an empty factory"));
    return -1;
  }
  staging->backends.emplace_back(std::string(n), fn);
  return 0;
}

}  // namespace

BackendRegistry& BackendRegistry::Global() {
  static BackendRegistry* registry = new BackendRegistry();
  return *registry;
}

absl::Status BackendRegistry::Register(absl::string_view name,
                                       BackendFactory factory) {
  if (name.empty() || name == kAuto) {
    return absl::InvalidArgumentError(
        absl::StrCat("BackendRegistry: invalid backend name \"", name, "\""));
  }
  if (!factory) {
    return absl::InvalidArgumentError(absl::StrCat(
        "BackendRegistry: null factory for backend \"", name, "\""));
  }
  absl::MutexLock lock(&mu_);
  auto [it, inserted] =
      factories_.try_emplace(std::string(name), std::move(factory));
  if (!inserted) {
    return absl::AlreadyExistsError(absl::StrCat(
        "BackendRegistry: backend \"", name, "\" is already registered"));
  }
  return absl::OkStatus();
}

absl::Status BackendRegistry::RegisterAll(
    std::vector<std::pair<std::string, BackendFactory>> backends) {
  absl::MutexLock lock(&mu_);
  std::set<absl::string_view> seen;
  for (const auto& entry : backends) {
    if (!seen.insert(entry.first).second) {
      return absl::AlreadyExistsError(absl::StrCat(
          "BackendRegistry: backend \"", entry.first, "\" listed twice"));
    }
    if (entry.first.empty() || entry.first == kAuto || !entry.second) {
      return absl::InvalidArgumentError(absl::StrCat(
          "BackendRegistry: invalid backend \"", entry.first, "\""));
    }
    if (factories_.count(entry.first) > 0) {
      return absl::AlreadyExistsError(absl::StrCat(
          "BackendRegistry: backend \"", entry.first,
          "\" is already registered"));
    }
  }
  for (auto& entry : backends) {
    factories_.emplace(std::move(entry.first), std::move(entry.second));
  }
  return absl::OkStatus();
}

bool BackendRegistry::Contains(absl::string_view name) const {
  absl::MutexLock lock(&mu_);
  return factories_.find(name) != factories_.end();
}

std::vector<std::string> BackendRegistry::Names() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> names;
  names.reserve(factories_.size());
  for (const auto& entry : factories_) names.push_back(entry.first);
  return names;  // std::map keeps them sorted
}

std::string BackendRegistry::Resolve(absl::string_view name,
                                     const Device& device) const {
  if (name != kAuto) return std::string(name);
  if (device.is_cuda() && Contains("nccl")) return "nccl";
  return "gloo";
}

absl::StatusOr<std::unique_ptr<Communicator>> BackendRegistry::Create(
    absl::string_view name, const BackendContext& ctx) const {
  const std::string resolved = Resolve(name, ctx.device);
  BackendFactory factory;
  {
    absl::MutexLock lock(&mu_);
    auto it = factories_.find(resolved);
    if (it != factories_.end()) factory = it->second;
  }
  if (!factory) {
    std::vector<std::string> names = Names();
    return absl::NotFoundError(absl::StrCat(
        "unknown communicator backend \"", resolved, "\"",
        name == kAuto ? " (chosen for \"auto\")" : "",
        "; registered backends: [",
        names.empty() ? std::string("none") : absl::StrJoin(names, ", "),
        "]. Link the backend's target or load its plugin "
        "(TP_BACKEND_PLUGINS)."));
  }
  absl::Status valid = ValidateContext(ctx);
  if (!valid.ok()) return valid;
  absl::StatusOr<std::unique_ptr<Communicator>> comm = factory(ctx);
  if (comm.ok() && *comm == nullptr) {
    return absl::InternalError(absl::StrCat(
        "backend \"", resolved, "\" returned a null communicator"));
  }
  return comm;
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateCommunicator(
    absl::string_view name, const BackendContext& ctx) {
  return BackendRegistry::Global().Create(name, ctx);
}

BackendRegistrar::BackendRegistrar(absl::string_view name,
                                   BackendFactory factory) {
  absl::Status s = BackendRegistry::Global().Register(name, std::move(factory));
  if (!s.ok()) LOG(ERROR) << s;
}

absl::Status LoadBackendPlugin(absl::string_view path,
                               BackendRegistry* registry) {
  if (registry == nullptr) registry = &BackendRegistry::Global();
  const std::string p(path);
  // RTLD_LOCAL: a plugin's own symbols (and its copies of library code) do
  // not leak into later plugins. The handle is never closed because the
  // registered factories point into the library.
  void* handle = dlopen(p.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* err = dlerror();
    return absl::NotFoundError(
        absl::StrCat("cannot load backend plugin \"", p,
                     "\": ", err != nullptr ? err : "unknown dlopen error"));
  }
  dlerror();  // clear
  void* sym = dlsym(handle, kTpPluginEntryPoint);
  if (sym == nullptr) {
    const char* err = dlerror();
    return absl::NotFoundError(absl::StrCat(
        "backend plugin \"", p, "\" does not export ", kTpPluginEntryPoint,
        "(): ", err != nullptr ? err : "symbol is null"));
  }
  auto entry = reinterpret_cast<TpRegisterBackendsFn>(sym);
  PluginStaging staging;
  staging.registry = registry;
  TpPluginApi api;
  api.abi_version = TP_PLUGIN_ABI_VERSION;
  api.host_data = &staging;
  api.register_backend = &StagePluginBackend;
  const int plugin_version = entry(&api);
  if (plugin_version != TP_PLUGIN_ABI_VERSION) {
    return absl::FailedPreconditionError(absl::StrCat(
        "backend plugin \"", p, "\" was built for plugin ABI version ",
        plugin_version, " but this program has version ",
        TP_PLUGIN_ABI_VERSION, "; rebuild the plugin against these headers"));
  }
  if (!staging.error.ok()) {
    return absl::Status(staging.error.code(),
                        absl::StrCat("backend plugin \"", p,
                                     "\": ", staging.error.message()));
  }
  if (staging.backends.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("backend plugin \"", p, "\" registered no backend"));
  }
  absl::Status s = registry->RegisterAll(std::move(staging.backends));
  if (!s.ok()) {
    return absl::Status(s.code(), absl::StrCat("backend plugin \"", p,
                                               "\": ", s.message()));
  }
  VLOG(1) << "loaded backend plugin " << p;
  return absl::OkStatus();
}

absl::Status LoadBackendPlugins(absl::string_view colon_separated_paths,
                                BackendRegistry* registry) {
  for (absl::string_view path :
       absl::StrSplit(colon_separated_paths, ':', absl::SkipEmpty())) {
    absl::Status s = LoadBackendPlugin(path, registry);
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace tp
