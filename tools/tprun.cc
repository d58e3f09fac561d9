// tprun: starts the ranks of a tensor_parallel job on this node.
//
//   bazel run //tools:tprun -- --nproc=4 -- bazel-bin/examples/foo --steps=10
//   tprun --nproc=2 --nnodes=2 --node_rank=1 --master_addr=host0
//         --master_port=29500 -- ./train      (one line)
//
// Everything after `--` is the program and its arguments. Each rank gets
// torchrun-compatible variables (RANK, WORLD_SIZE, LOCAL_RANK, ...; see
// tools/launch.h), its output lines are prefixed with "[rank R] ", SIGINT,
// SIGTERM and SIGHUP are forwarded, and when one rank fails the others are
// stopped. Under `bazel run` a relative PROGRAM is resolved against the
// directory bazel was invoked from (BUILD_WORKING_DIRECTORY), which is also
// the ranks' working directory.
//
// Exit status: the job's (0, the first failing rank's code, or 128 + signal);
// 124 when --timeout passed; 2 on a usage error; 126 when PROGRAM is not
// executable; 127 when it is not found; 1 on any other launcher failure.
#include <cstdlib>
#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "tools/launch.h"

ABSL_FLAG(int, nproc, 1, "Ranks to start on this node.");
ABSL_FLAG(int, nnodes, 1, "Nodes in the job (each runs tprun).");
ABSL_FLAG(int, node_rank, 0, "Index of this node, 0..nnodes-1.");
ABSL_FLAG(std::string, master_addr, "127.0.0.1",
          "Host of rank 0 (the rendezvous store), reachable from every node.");
ABSL_FLAG(int, master_port, 0,
          "Rendezvous port; 0 picks a free one (single node only).");
// Durations are string flags parsed with absl::ParseDuration: absl::Duration
// flags do not compile under GCC's -fsanitize=thread (-Wtsan in absl's
// sequence lock).
ABSL_FLAG(std::string, grace, "3s",
          "After a rank fails: time between SIGTERM and SIGKILL for the "
          "others (e.g. 500ms, 10s).");
ABSL_FLAG(std::string, timeout, "inf",
          "Wall-clock limit for the whole job (e.g. 10m); inf: none.");

namespace {

int ExitCodeForStatus(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kDeadlineExceeded:
      return 124;
    case absl::StatusCode::kInvalidArgument:
      return 2;
    case absl::StatusCode::kPermissionDenied:
      return 126;
    case absl::StatusCode::kNotFound:
      return 127;
    default:
      return 1;
  }
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "tprun --nproc=N [--nnodes=M --node_rank=I --master_addr=HOST "
      "--master_port=PORT] -- PROGRAM [ARGS...]");
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() < 2) {
    std::cerr << "tprun: no program given\nusage: "
              << absl::ProgramUsageMessage() << "\n";
    return 2;
  }

  tp::LaunchOptions options;
  options.nproc = absl::GetFlag(FLAGS_nproc);
  options.nnodes = absl::GetFlag(FLAGS_nnodes);
  options.node_rank = absl::GetFlag(FLAGS_node_rank);
  options.master_addr = absl::GetFlag(FLAGS_master_addr);
  options.master_port = absl::GetFlag(FLAGS_master_port);
  for (auto [flag, out] : {std::make_pair(&FLAGS_grace, &options.grace),
                           std::make_pair(&FLAGS_timeout, &options.timeout)}) {
    const std::string text = absl::GetFlag(*flag);
    if (!absl::ParseDuration(text, out)) {
      std::cerr << "tprun: --" << flag->Name() << "='" << text
                << "' is not a duration (e.g. 500ms, 10s, 5m, inf)\n";
      return 2;
    }
  }
  for (size_t i = 2; i < positional.size(); ++i) {
    options.args.push_back(positional[i]);
  }

  // `bazel run` starts us in our runfiles tree; the user's paths are relative
  // to where they typed the command, and our runfiles variables would
  // mislead another program.
  std::string base_dir;
  if (const char* bwd = std::getenv("BUILD_WORKING_DIRECTORY")) {
    base_dir = bwd;
    options.working_dir = bwd;
    options.unset_env = {"RUNFILES_DIR", "RUNFILES_MANIFEST_FILE",
                         "JAVA_RUNFILES"};
  }
  absl::StatusOr<std::string> program =
      tp::ResolveProgram(positional[1], base_dir);
  if (!program.ok()) {
    std::cerr << "tprun: " << program.status().message() << "\n";
    return ExitCodeForStatus(program.status());
  }
  options.program = *program;

  absl::StatusOr<int> code = tp::LaunchAndWait(options);
  if (!code.ok()) {
    std::cerr << "tprun: " << code.status().message() << "\n";
    return ExitCodeForStatus(code.status());
  }
  return *code;
}
