// TensorParallelConfig and ProcessGroupManager: find the ranks, meet through a
// store, and build the world, tensor-parallel and data-parallel communicators.
//
// Group layout (Megatron-LM's): with world size W and tensor-parallel size T,
// tensor-parallel groups are consecutive ranks {0..T-1}, {T..2T-1}, ... (they
// exchange activations every layer, so they should share a host), and
// data-parallel groups are strided ranks {r, r+T, r+2T, ...} for r < T.
//
// Rendezvous: the store is a TcpStore hosted by rank 0 at
// MASTER_ADDR:MASTER_PORT, or a FileStore when `store_path` (TP_STORE_PATH) is
// set (a directory on a filesystem all ranks share; use a fresh directory per
// job). A single-process world needs neither.
//
// Thread safety: Init, NewGroup and the accessors may be called from one thread
// at a time; each returned Communicator follows communicator.h.
//
// Example:
//   ASSIGN_OR_RETURN(tp::TensorParallelConfig config,
//                    tp::TensorParallelConfig::FromEnv());
//   config.tensor_parallel_size = 2;
//   ASSIGN_OR_RETURN(std::unique_ptr<tp::ProcessGroupManager> pg,
//                    tp::ProcessGroupManager::Init(config));
//   RETURN_IF_ERROR(pg->tensor_parallel().AllReduce(partial));
#ifndef TENSOR_PARALLEL_COMM_PROCESS_GROUP_H_
#define TENSOR_PARALLEL_COMM_PROCESS_GROUP_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "comm/backend_registry.h"
#include "comm/communicator.h"
#include "runtime/launch_env.h"
#include "runtime/store.h"

namespace tp {

// The seed's configuration, environment-aware. Every field has a default;
// FromEnv() overrides them from environment variables (the only place the
// process group reads the environment besides rank discovery).
struct TensorParallelConfig {
  // Ranks per tensor-parallel group. 0 (default): the whole world. Must divide
  // the world size. Env: TP_SIZE.
  int tensor_parallel_size = 0;
  // Backend name: "auto" (default; nccl with CUDA and a visible GPU, else
  // gloo), "gloo", "nccl", or a name a plugin registers. Env: TP_BACKEND.
  std::string backend = "auto";
  // Bounds the rendezvous and every collective. Default 300 s; tests use 1-5 s.
  // Env: TP_TIMEOUT_SECONDS.
  absl::Duration timeout = absl::Seconds(300);
  // Non-empty: rendezvous through a FileStore in this directory instead of
  // the TCP store. Default empty. Env: TP_STORE_PATH.
  std::string store_path;
  // When set, the rendezvous store to use instead of opening a TCP or file
  // store (as c10d's init_process_group(store=...)): e.g. a HashStore shared
  // by threads in tests, or a store the application already runs. Default
  // null. Not read from the environment.
  std::shared_ptr<Store> store;
  // Colon-separated shared libraries loaded before the backend is chosen.
  // Default empty. Env: TP_BACKEND_PLUGINS.
  std::string backend_plugins;
  // Backend-specific options passed to the factory, keyed "<backend>.<key>":
  // "gloo.hostname" / "gloo.iface" (what Gloo binds; env TP_GLOO_HOSTNAME,
  // TP_GLOO_INTERFACE) and "gloo.check_consistency" ("first_use" by default,
  // "always" or "off": when ranks check that they agree on each call, see
  // backends/gloo/gloo_communicator.h; env TP_GLOO_CHECK_CONSISTENCY).
  std::map<std::string, std::string> backend_options;
  // Explicit rank/world/master values; unset fields are discovered from the
  // launcher's variables (see launch_env.h).
  LaunchOverrides launch;

  // Defaults overridden by the variables named above. kInvalidArgument naming
  // the variable when a value does not parse or is out of range.
  static absl::StatusOr<TensorParallelConfig> FromEnv(
      const EnvLookup& env = ProcessEnvLookup());
};

class ProcessGroupManager {
 public:
  // Discovers the ranks, loads plugins, meets the other ranks through the
  // store and creates the world, tensor-parallel and data-parallel
  // communicators. Errors: kInvalidArgument when the TP size does not divide
  // the world size or ranks disagree on the world size; kDeadlineExceeded
  // naming the ranks that never arrived; kNotFound for an unknown backend;
  // kUnavailable when the store cannot be reached.
  static absl::StatusOr<std::unique_ptr<ProcessGroupManager>> Init(
      const TensorParallelConfig& config);

  ProcessGroupManager(const ProcessGroupManager&) = delete;
  ProcessGroupManager& operator=(const ProcessGroupManager&) = delete;
  ~ProcessGroupManager();

  int rank() const { return env_.rank; }
  int world_size() const { return env_.world_size; }
  int tensor_parallel_size() const { return tp_size_; }
  int data_parallel_size() const { return env_.world_size / tp_size_; }
  // This rank's position inside its TP group and DP group.
  int tensor_parallel_rank() const { return env_.rank % tp_size_; }
  int data_parallel_rank() const { return env_.rank / tp_size_; }
  const LaunchEnv& launch_env() const { return env_; }
  // The backend name after resolving "auto".
  const std::string& backend() const { return backend_; }

  Communicator& world() { return *world_; }
  Communicator& tensor_parallel() { return *tensor_parallel_; }
  Communicator& data_parallel() { return *data_parallel_; }
  Store& store() { return *store_; }

  // A new communicator over `ranks` (world ranks; its rank i is ranks[i]).
  // Only the members call it, all with the same list, in the same order
  // relative to their other NewGroup calls. kInvalidArgument when the list is
  // empty, has duplicates or out-of-range ranks, or lacks this rank.
  absl::StatusOr<std::unique_ptr<Communicator>> NewGroup(std::vector<int> ranks);

  // The groups of the layout, as world ranks (pure functions, for tests and
  // printing). kInvalidArgument when tp_size does not divide world_size.
  static absl::StatusOr<std::vector<std::vector<int>>> TensorParallelGroups(
      int world_size, int tp_size);
  static absl::StatusOr<std::vector<std::vector<int>>> DataParallelGroups(
      int world_size, int tp_size);

 private:
  ProcessGroupManager() = default;
  absl::StatusOr<std::unique_ptr<Communicator>> CreateGroup(
      const std::vector<int>& ranks, const std::string& prefix);

  LaunchEnv env_;
  int tp_size_ = 1;
  std::string backend_;
  absl::Duration timeout_;
  std::map<std::string, std::string> backend_options_;
  std::shared_ptr<Store> store_;
  std::map<std::vector<int>, int> new_group_calls_;
  std::unique_ptr<Communicator> world_;
  std::unique_ptr<Communicator> tensor_parallel_;
  std::unique_ptr<Communicator> data_parallel_;
};

}  // namespace tp

#endif  // TENSOR_PARALLEL_COMM_PROCESS_GROUP_H_
