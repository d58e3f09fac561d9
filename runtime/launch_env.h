// Rank discovery: where this process sits in a multi-process job.
//
// A program started by tprun/torchrun, mpirun, srun or an MPICH/Intel-MPI
// launcher learns its rank, world size, local rank and local world size from
// variables its launcher sets. DiscoverLaunchEnv reads them in one place, in a
// fixed order, validates them and says which launcher they came from. Nothing
// else in the project reads these variables.
//
// Sources, tried in this order; the FIRST source that is present is used and
// the others are not read (so a half-set or malformed higher-priority source
// is an error, never silently skipped):
//
//   1. kExplicit   LaunchOverrides::rank / world_size (e.g. from --rank and
//                  --world_size flags). Present when either is set; both are
//                  required. local_rank defaults to rank and
//                  local_world_size to world_size (one node).
//   2. kTorchrun   RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE. Present
//                  when RANK or WORLD_SIZE is set; both are required.
//   3. kOpenMpi    OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE,
//                  OMPI_COMM_WORLD_LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_SIZE.
//                  Present when OMPI_COMM_WORLD_RANK or _SIZE is set; both
//                  are required.
//   4. kSlurm      SLURM_PROCID (presence), SLURM_NTASKS (or, when unset,
//                  SLURM_NPROCS) for the world size, SLURM_LOCALID, and the
//                  tasks on this node from SLURM_NTASKS_PER_NODE, else derived
//                  from SLURM_STEP_TASKS_PER_NODE, else SLURM_TASKS_PER_NODE
//                  (compressed lists such as "4(x2),3") at index SLURM_NODEID.
//   5. kPmi        PMI_RANK, PMI_SIZE (MPICH Hydra, Intel MPI), with local
//                  values from MPI_LOCALRANKID, MPI_LOCALNRANKS. Present when
//                  PMI_RANK or PMI_SIZE is set; both are required.
//   6. kSingleProcess  none of the above: rank 0 of 1.
//
// Local values that a source leaves unset are completed the same way for
// every source: with neither set, the job is taken to be on one node
// (local_rank = rank, local_world_size = world_size); with only the local
// world size set, local_rank = rank % local_world_size (block placement); with
// only the local rank set, local_world_size = world_size.
//
// The rendezvous address is independent of the source:
//   master_addr = LaunchOverrides::master_addr, else MASTER_ADDR, else
//                 "127.0.0.1";
//   master_port = LaunchOverrides::master_port, else MASTER_PORT, else 29500.
// Under mpirun/srun across several hosts the user must export MASTER_ADDR
// (e.g. `mpirun -x MASTER_ADDR=host0`); the loopback default only reaches
// ranks on one host. (A file store, TP_STORE_PATH, needs neither.)
//
// A variable set to the empty string counts as unset. Integers are decimal,
// surrounding whitespace allowed. Every error is kInvalidArgument and names
// the variable (or the LaunchOverrides field, as "explicit rank") and its
// value: a non-integer, a negative value, world size < 1, rank >= world size,
// local world size > world size, local rank >= local world size, a port
// outside 1..65535, an empty explicit master address, only one of a source's
// two required variables set, or a malformed SLURM_*TASKS_PER_NODE.
//
// Thread safety: DiscoverLaunchEnv is thread-safe when `env` is (the default
// lookup calls getenv, which is safe as long as nobody calls setenv).
//
// Example:
//   ASSIGN_OR_RETURN(tp::LaunchEnv env, tp::DiscoverLaunchEnv());
//   LOG(INFO) << "rank " << env.rank << " of " << env.world_size << " via "
//             << tp::LaunchSourceName(env.source);
//
//   // Tests inject the environment:
//   absl::StatusOr<tp::LaunchEnv> env = tp::DiscoverLaunchEnv(
//       {}, tp::MapEnvLookup({{"OMPI_COMM_WORLD_RANK", "1"},
//                             {"OMPI_COMM_WORLD_SIZE", "2"}}));
#ifndef TENSOR_PARALLEL_RUNTIME_LAUNCH_ENV_H_
#define TENSOR_PARALLEL_RUNTIME_LAUNCH_ENV_H_

#include <functional>
#include <map>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tp {

// Which launcher the values came from.
enum class LaunchSource {
  kExplicit,
  kTorchrun,
  kOpenMpi,
  kSlurm,
  kPmi,
  kSingleProcess,
};

// "explicit", "torchrun", "openmpi", "slurm", "pmi", "single_process".
absl::string_view LaunchSourceName(LaunchSource source);

// Values given by the program itself (typically from command-line flags).
// Each field, when set, wins over every environment variable. rank and
// world_size select the kExplicit source (both or neither); the local values
// and the master address/port only refine whichever source is chosen.
struct LaunchOverrides {
  std::optional<int> rank;
  std::optional<int> world_size;
  std::optional<int> local_rank;
  std::optional<int> local_world_size;
  std::optional<std::string> master_addr;
  std::optional<int> master_port;
};

// Where this process sits in the job. Always valid when returned by
// DiscoverLaunchEnv: 0 <= rank < world_size, 0 <= local_rank <
// local_world_size <= world_size, 1 <= master_port <= 65535.
struct LaunchEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  // Host of rank 0's TCP store; reachable by every rank.
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  LaunchSource source = LaunchSource::kSingleProcess;

  // "rank 1/4 (local 1/4) master 127.0.0.1:29500 via torchrun".
  std::string DebugString() const;
};

// Returns the value of an environment variable, or nullopt when it is unset.
using EnvLookup =
    std::function<std::optional<std::string>(absl::string_view name)>;

// Reads the process environment (getenv).
EnvLookup ProcessEnvLookup();

// Reads from a fixed map (for tests and for programs that pass environments
// around). The map is copied into the returned function.
EnvLookup MapEnvLookup(std::map<std::string, std::string> vars);

// Discovers rank, world size, local rank/size and the rendezvous address as
// described at the top of this file. Returns kInvalidArgument naming the
// variable on contradictory or out-of-range values; never reads beyond the
// chosen source (plus MASTER_ADDR/MASTER_PORT).
absl::StatusOr<LaunchEnv> DiscoverLaunchEnv(
    const LaunchOverrides& overrides = {},
    const EnvLookup& env = ProcessEnvLookup());

// Parses Slurm's compressed tasks-per-node list ("2(x3),1": three nodes with
// 2 tasks, then one with 1) and returns the count of node `node_id`.
// kInvalidArgument naming `variable` on a malformed list or an out-of-range
// node id. Exposed for tests.
absl::StatusOr<int> SlurmTasksOnNode(absl::string_view variable,
                                     absl::string_view list, int node_id);

}  // namespace tp

#endif  // TENSOR_PARALLEL_RUNTIME_LAUNCH_ENV_H_
