#include "comm/process_group.h"

#include <algorithm>
#include <set>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "glog/logging.h"
#include "runtime/file_store.h"
#include "runtime/hash_store.h"
#include "runtime/prefix_store.h"
#include "runtime/status_macros.h"
#include "runtime/tcp_store.h"

namespace tp {
namespace {

absl::StatusOr<int> ParseIntVar(absl::string_view name, const std::string& v,
                                int min_value) {
  int out = 0;
  if (!absl::SimpleAtoi(v, &out) || out < min_value) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, "='", v, "' is not an integer >= ", min_value));
  }
  return out;
}

absl::StatusOr<std::shared_ptr<Store>> OpenStore(
    const TensorParallelConfig& config, const LaunchEnv& env) {
  if (config.store != nullptr) return config.store;
  if (!config.store_path.empty()) {
    FileStoreOptions options;
    options.path = config.store_path;
    options.timeout = config.timeout;
    ASSIGN_OR_RETURN(std::unique_ptr<FileStore> store, FileStore::Create(options));
    store->set_default_timeout(config.timeout);
    return std::shared_ptr<Store>(std::move(store));
  }
  if (env.world_size == 1) {
    auto store = std::make_shared<HashStore>();
    store->set_default_timeout(config.timeout);
    return std::shared_ptr<Store>(std::move(store));
  }
  TcpStoreOptions options;
  options.host = env.master_addr;
  options.port = env.master_port;
  options.is_server = env.rank == 0;
  options.timeout = config.timeout;
  options.connect_timeout = config.timeout;
  absl::StatusOr<std::unique_ptr<TcpStore>> store = TcpStore::Create(options);
  if (!store.ok()) {
    return absl::Status(
        store.status().code(),
        absl::StrCat("rank ", env.rank, ": cannot reach the TCP store at ",
                     env.master_addr, ":", env.master_port,
                     " hosted by rank 0: ", store.status().message()));
  }
  return std::shared_ptr<Store>(*std::move(store));
}

// Every rank announces itself with its world size, then waits for the others.
absl::Status Rendezvous(Store& store, const LaunchEnv& env,
                        absl::Duration timeout) {
  RETURN_IF_ERROR(store.Set(absl::StrCat("pg/arrived/", env.rank),
                            absl::StrCat(env.world_size)));
  std::vector<std::string> keys;
  for (int r = 0; r < env.world_size; ++r) {
    keys.push_back(absl::StrCat("pg/arrived/", r));
  }
  absl::Status waited = store.Wait(keys, timeout);
  if (absl::IsDeadlineExceeded(waited)) {
    std::vector<int> missing;
    for (int r = 0; r < env.world_size; ++r) {
      absl::StatusOr<bool> present = store.Check({keys[r]});
      if (present.ok() && !*present) missing.push_back(r);
    }
    return absl::DeadlineExceededError(absl::StrCat(
        "rank ", env.rank, ": rendezvous timed out after ",
        absl::FormatDuration(timeout), "; ranks [", absl::StrJoin(missing, ", "),
        "] of ", env.world_size, " never arrived"));
  }
  RETURN_IF_ERROR(waited);
  for (int r = 0; r < env.world_size; ++r) {
    ASSIGN_OR_RETURN(std::string value, store.Get(keys[r], timeout));
    if (value != absl::StrCat(env.world_size)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "rank ", env.rank, " has world size ", env.world_size, " but rank ",
          r, " has world size ", value));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TensorParallelConfig> TensorParallelConfig::FromEnv(
    const EnvLookup& env) {
  TensorParallelConfig config;
  if (auto v = env("TP_SIZE")) {
    ASSIGN_OR_RETURN(config.tensor_parallel_size, ParseIntVar("TP_SIZE", *v, 0));
  }
  if (auto v = env("TP_BACKEND")) {
    if (v->empty()) return absl::InvalidArgumentError("TP_BACKEND is empty");
    config.backend = *v;
  }
  if (auto v = env("TP_TIMEOUT_SECONDS")) {
    double seconds = 0;
    if (!absl::SimpleAtod(*v, &seconds) || !(seconds > 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "TP_TIMEOUT_SECONDS='", *v, "' is not a positive number"));
    }
    config.timeout = absl::Seconds(seconds);
  }
  if (auto v = env("TP_STORE_PATH")) config.store_path = *v;
  if (auto v = env("TP_BACKEND_PLUGINS")) config.backend_plugins = *v;
  if (auto v = env("TP_GLOO_HOSTNAME")) config.backend_options["gloo.hostname"] = *v;
  if (auto v = env("TP_GLOO_INTERFACE")) config.backend_options["gloo.iface"] = *v;
  if (auto v = env("TP_GLOO_CHECK_CONSISTENCY")) {
    config.backend_options["gloo.check_consistency"] = *v;
  }
  return config;
}

absl::StatusOr<std::vector<std::vector<int>>>
ProcessGroupManager::TensorParallelGroups(int world_size, int tp_size) {
  if (tp_size <= 0 || world_size <= 0 || world_size % tp_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor-parallel size ", tp_size, " does not divide world size ",
        world_size));
  }
  std::vector<std::vector<int>> groups(world_size / tp_size);
  for (int r = 0; r < world_size; ++r) groups[r / tp_size].push_back(r);
  return groups;
}

absl::StatusOr<std::vector<std::vector<int>>>
ProcessGroupManager::DataParallelGroups(int world_size, int tp_size) {
  RETURN_IF_ERROR(TensorParallelGroups(world_size, tp_size).status());
  std::vector<std::vector<int>> groups(tp_size);
  for (int r = 0; r < world_size; ++r) groups[r % tp_size].push_back(r);
  return groups;
}

absl::StatusOr<std::unique_ptr<ProcessGroupManager>> ProcessGroupManager::Init(
    const TensorParallelConfig& config) {
  if (config.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TensorParallelConfig.timeout must be positive, got ",
        absl::FormatDuration(config.timeout)));
  }
  if (config.tensor_parallel_size < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor_parallel_size must be >= 0, got ", config.tensor_parallel_size));
  }
  if (!config.backend_plugins.empty()) {
    RETURN_IF_ERROR(LoadBackendPlugins(config.backend_plugins));
  }
  ASSIGN_OR_RETURN(LaunchEnv env, DiscoverLaunchEnv(config.launch));

  std::unique_ptr<ProcessGroupManager> pg(new ProcessGroupManager());
  pg->env_ = env;
  pg->tp_size_ = config.tensor_parallel_size == 0 ? env.world_size
                                                  : config.tensor_parallel_size;
  if (env.world_size % pg->tp_size_ != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor-parallel size ", pg->tp_size_, " does not divide world size ",
        env.world_size));
  }
  // CPU build: no GPU is visible, so "auto" resolves to the CPU default.
  pg->backend_ = BackendRegistry::Global().Resolve(config.backend, Device::Cpu());
  if (!BackendRegistry::Global().Contains(pg->backend_)) {
    return absl::NotFoundError(absl::StrCat(
        "unknown backend '", config.backend, "'; registered: ",
        absl::StrJoin(BackendRegistry::Global().Names(), ", ")));
  }
  pg->timeout_ = config.timeout;
  pg->backend_options_ = config.backend_options;

  ASSIGN_OR_RETURN(pg->store_, OpenStore(config, env));
  RETURN_IF_ERROR(Rendezvous(*pg->store_, env, config.timeout));

  std::vector<int> all(env.world_size);
  for (int r = 0; r < env.world_size; ++r) all[r] = r;
  ASSIGN_OR_RETURN(pg->world_, pg->CreateGroup(all, "world/"));

  ASSIGN_OR_RETURN(auto tp_groups,
                   TensorParallelGroups(env.world_size, pg->tp_size_));
  ASSIGN_OR_RETURN(auto dp_groups,
                   DataParallelGroups(env.world_size, pg->tp_size_));
  const int tp_index = env.rank / pg->tp_size_;
  const int dp_index = env.rank % pg->tp_size_;
  ASSIGN_OR_RETURN(pg->tensor_parallel_,
                   pg->CreateGroup(tp_groups[tp_index],
                                   absl::StrCat("tp/", tp_index, "/")));
  ASSIGN_OR_RETURN(pg->data_parallel_,
                   pg->CreateGroup(dp_groups[dp_index],
                                   absl::StrCat("dp/", dp_index, "/")));
  LOG_IF(INFO, env.rank == 0)
      << "ProcessGroupManager: world " << env.world_size << ", tensor-parallel "
      << pg->tp_size_ << ", data-parallel " << pg->data_parallel_size()
      << ", backend " << pg->backend_ << ", ranks from "
      << LaunchSourceName(env.source);
  return pg;
}

ProcessGroupManager::~ProcessGroupManager() {
  // Communicators hold connections set up through the store; close them first.
  data_parallel_.reset();
  tensor_parallel_.reset();
  world_.reset();
}

absl::StatusOr<std::unique_ptr<Communicator>> ProcessGroupManager::CreateGroup(
    const std::vector<int>& ranks, const std::string& prefix) {
  const auto self = std::find(ranks.begin(), ranks.end(), env_.rank);
  BackendContext ctx;
  ctx.rank = static_cast<int>(self - ranks.begin());
  ctx.size = static_cast<int>(ranks.size());
  ctx.store = std::make_shared<PrefixStore>(prefix, store_);
  ctx.timeout = timeout_;
  ctx.device = Device::Cpu();
  ctx.master_addr = env_.master_addr;
  ctx.options = backend_options_;
  return CreateCommunicator(backend_, ctx);
}

absl::StatusOr<std::unique_ptr<Communicator>> ProcessGroupManager::NewGroup(
    std::vector<int> ranks) {
  if (ranks.empty()) {
    return absl::InvalidArgumentError("NewGroup: empty rank list");
  }
  std::set<int> seen;
  for (int r : ranks) {
    if (r < 0 || r >= env_.world_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "NewGroup: rank ", r, " out of range for world size ",
          env_.world_size));
    }
    if (!seen.insert(r).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("NewGroup: rank ", r, " listed twice"));
    }
  }
  if (seen.count(env_.rank) == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "NewGroup: rank ", env_.rank, " is not in [", absl::StrJoin(ranks, ", "),
        "]; only members create the group"));
  }
  const int call = new_group_calls_[ranks]++;
  return CreateGroup(ranks, absl::StrCat("group/", absl::StrJoin(ranks, ","),
                                         "/", call, "/"));
}

}  // namespace tp
