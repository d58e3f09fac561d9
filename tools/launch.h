// Launcher: starts the ranks of a job on this node and supervises them.
//
// LaunchAndWait starts `nproc` copies of a program with torchrun-compatible
// variables, so that DiscoverLaunchEnv (runtime/launch_env.h) in each copy
// finds its rank:
//
//   RANK              node_rank * nproc + local_rank
//   WORLD_SIZE        nnodes * nproc
//   LOCAL_RANK        0 .. nproc-1
//   LOCAL_WORLD_SIZE  nproc
//   GROUP_RANK        node_rank           GROUP_WORLD_SIZE  nnodes
//   ROLE_RANK         = RANK              ROLE_WORLD_SIZE   = WORLD_SIZE
//   MASTER_ADDR       master_addr         MASTER_PORT       master_port (or
//                                                           the port picked)
//   TP_LAUNCHED       "1": marks a process started by this launcher
//
// Every other variable of the launcher's environment is inherited, except
// those in `unset_env`; `env` adds or replaces variables.
//
// Supervision:
//   - Output: each child's stdout and stderr are pipes. Complete lines are
//     written to `stdout_fd` / `stderr_fd` prefixed with "[rank R] ", one
//     write per line, so lines of different ranks never interleave. A last
//     line without a newline gets one; a line longer than 64 KiB is split.
//   - Failure: when a rank exits non-zero or is killed by a signal, the
//     launcher prints "[launch] rank R ... exited with code C; stopping the
//     others" on `stderr_fd`, sends SIGTERM to every other rank, and SIGKILL
//     to those still alive `grace` later. The job's result is the first
//     failure's code.
//   - Signals: while LaunchAndWait runs it catches SIGINT, SIGTERM and SIGHUP
//     and forwards each to every rank; a second signal sends SIGKILL to all.
//     (The previous handlers are restored on return.)
//   - Each child runs in its own process group (so a signal reaches the
//     programs it starts too), with stdin from /dev/null, and dies with SIGKILL
//     if the thread that called LaunchAndWait dies (PR_SET_PDEATHSIG).
//
// Exit codes (the int result): 0 when every rank exited 0; else the first
// failing rank's exit code, or 128 + signal number when it was killed by a
// signal; when all ranks exited 0 after a forwarded signal, 128 + that signal.
//
// Thread safety: calls are serialized process-wide (the signal handlers are
// process-wide); call it from a thread that lives until it returns.
//
// Example (a launcher program):
//   tp::LaunchOptions opts;
//   opts.nproc = 4;
//   opts.program = "/path/to/train";
//   opts.args = {"--steps=10"};
//   absl::StatusOr<int> code = tp::LaunchAndWait(opts);
//   if (!code.ok()) { std::cerr << code.status() << "\n"; return 1; }
//   return *code;
//
// Example (the --nproc flag of every example and benchmark):
//   ABSL_FLAG(int, nproc, 1, "ranks to start on this host (re-launches self)");
//
//   int main(int argc, char** argv) {
//     absl::ParseCommandLine(argc, argv);           // leaves argv unchanged
//     absl::StatusOr<std::optional<int>> job =
//         tp::MaybeRelaunchSelf(absl::GetFlag(FLAGS_nproc), argc, argv);
//     if (!job.ok()) { std::cerr << job.status() << "\n"; return 2; }
//     if (job->has_value()) return **job;           // parent: the job's code
//     // From here on this process is one rank; DiscoverLaunchEnv finds it.
//     ...
//   }
//
// `bazel run //examples:foo -- --nproc=4` then runs 4 ranks of foo, and the
// same binary runs unchanged under tprun, torchrun, mpirun or srun.
#ifndef TENSOR_PARALLEL_TOOLS_LAUNCH_H_
#define TENSOR_PARALLEL_TOOLS_LAUNCH_H_

#include <unistd.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace tp {

struct LaunchOptions {
  // Ranks to start on this node; 1..1024.
  int nproc = 1;
  // Nodes in the job and this node's index; every node runs the launcher with
  // the same nproc, nnodes, master_addr and master_port.
  int nnodes = 1;
  int node_rank = 0;
  // Rendezvous address handed to the ranks (rank 0 hosts the TCP store).
  std::string master_addr = "127.0.0.1";
  // 1..65535, or 0: pick a free TCP port on this host (only with nnodes == 1,
  // since other nodes could not know it). Picking has a small race: another
  // process may take the port before rank 0 binds it.
  int master_port = 0;
  // Program to run: an absolute path, a path relative to the current
  // directory (when it contains '/'), or a name searched in $PATH.
  std::string program;
  // Arguments after the program name (argv[1..]).
  std::vector<std::string> args;
  // Working directory of the children; empty: the launcher's.
  std::string working_dir;
  // Variables added to (or replacing) the inherited environment, after the
  // launcher's own variables are set (so they can override RANK etc. too).
  // With nproc > 1 and neither OPENBLAS_NUM_THREADS nor OMP_NUM_THREADS set,
  // the launcher sets OPENBLAS_NUM_THREADS = max(1, cores / nproc), as
  // torchrun sets OMP_NUM_THREADS, so the local ranks share the cores.
  std::vector<std::pair<std::string, std::string>> env;
  // Inherited variables removed from the children's environment.
  std::vector<std::string> unset_env;
  // Time between SIGTERM and SIGKILL when stopping ranks after a failure.
  // Longer lets ranks clean up; shorter makes a failed job end sooner.
  absl::Duration grace = absl::Seconds(3);
  // Wall-clock limit for the whole job; when it passes, every rank is
  // stopped (SIGTERM, then SIGKILL after `grace`) and LaunchAndWait returns
  // kDeadlineExceeded. Default: no limit.
  absl::Duration timeout = absl::InfiniteDuration();
  // Where the prefixed output lines go (not owned, not closed).
  int stdout_fd = STDOUT_FILENO;
  int stderr_fd = STDERR_FILENO;
};

// Starts the ranks of this node, relays their output, and waits for all of
// them (see the top of this file). Returns the job's exit code (0 = success).
// Errors: kInvalidArgument for bad options (naming the field and value),
// kNotFound when the program does not exist, kPermissionDenied when it is not
// executable, kDeadlineExceeded when `timeout` passed (all ranks are stopped
// first), kInternal when a process or pipe cannot be created (ranks already
// started are stopped).
absl::StatusOr<int> LaunchAndWait(const LaunchOptions& options);

// The --nproc pattern (see the Example above). When nproc > 1 and this
// process was not started by LaunchAndWait (TP_LAUNCHED unset), re-runs this
// very binary (/proc/self/exe) with the same argv[1..] as `nproc` ranks under
// LaunchAndWait(base with nproc and program/args filled in) and returns the
// job's exit code; the caller should exit with it. Returns nullopt when the
// caller should continue as a rank: nproc <= 1, or TP_LAUNCHED=1.
// kInvalidArgument when nproc < 1, or when nproc > 1 but the process was
// already started by another launcher (torchrun, mpirun, srun: any source
// other than kSingleProcess) — re-launching would multiply the ranks. Errors
// of LaunchAndWait are passed on.
absl::StatusOr<std::optional<int>> MaybeRelaunchSelf(
    int nproc, int argc, char** argv, LaunchOptions base = LaunchOptions());

// Resolves `program` to an executable path as LaunchAndWait does: absolute
// paths as they are, paths with '/' against `relative_to` (or the current
// directory when empty), bare names through $PATH. kNotFound /
// kPermissionDenied as LaunchAndWait.
absl::StatusOr<std::string> ResolveProgram(const std::string& program,
                                           const std::string& relative_to);

// Returns a TCP port that was free on this host a moment ago (binds port 0 and
// reads back the number). kInternal when no socket can be bound.
absl::StatusOr<int> PickFreePort();

}  // namespace tp

#endif  // TENSOR_PARALLEL_TOOLS_LAUNCH_H_
