// Child program for launch_test: one process of a launched job. Behaviour by
// --mode (everything it prints is checked by the test):
//   env       prints the launcher variables it received, a partial last line
//             and a line on stderr
//   fail      rank --fail_rank exits with --fail_code after 100 ms (a negative
//             code: kills itself with that signal); the others sleep
//             --sleep_s and print "survived". With --ready_dir, every other
//             rank creates <ready_dir>/ready.<rank> once it printed "ready"
//             (and, for ignore_term, ignores SIGTERM), and the failing rank
//             first waits (up to 30 s) for all of those files, so that its
//             failure cannot overtake a rank that is still starting up on a
//             loaded machine
//   ignore_term  like fail, but every rank ignores SIGTERM first
//   sigwait   prints "ready", waits for SIGINT/SIGTERM, prints "got signal N",
//             exits 0
//   lines     writes numbered lines of varying length to stdout and stderr,
//             then one line of 70000 'x'
//   discover  prints DiscoverLaunchEnv()'s result
// It also supports --nproc through MaybeRelaunchSelf, like every example.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/launch_env.h"
#include "tools/launch.h"

ABSL_FLAG(int, nproc, 1, "ranks to start (re-launches self)");
ABSL_FLAG(std::string, mode, "env", "what to do");
ABSL_FLAG(int, fail_rank, -1, "rank that fails (fail / ignore_term)");
ABSL_FLAG(int, fail_code, 3, "its exit code; negative: die by that signal");
ABSL_FLAG(int, sleep_s, 60, "how long the other ranks sleep");
ABSL_FLAG(std::string, ready_dir, "",
          "if set: the failing rank waits until every other rank is ready");

namespace {

volatile sig_atomic_t g_signal = 0;
void OnSignal(int sig) { g_signal = sig; }

std::string Var(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? "<unset>" : v;
}

int Rank() { return std::atoi(Var("RANK").c_str()); }

void Flush() {
  std::fflush(stdout);
  std::fflush(stderr);
}

std::string ReadyFile(int rank) {
  return absl::StrCat(absl::GetFlag(FLAGS_ready_dir), "/ready.", rank);
}

// Waits (bounded) until every rank but `rank` has created its ready file.
void WaitForTheOtherRanks(int rank) {
  const int world = std::atoi(Var("WORLD_SIZE").c_str());
  for (int tries = 0; tries < 3000; ++tries) {  // 3000 x 10 ms = 30 s
    int ready = 0;
    for (int r = 0; r < world; ++r) {
      ready += r != rank && access(ReadyFile(r).c_str(), F_OK) == 0 ? 1 : 0;
    }
    if (ready == world - 1) return;
    usleep(10 * 1000);
  }
  std::fprintf(stderr, "launch_child: rank %d gave up waiting for the others\n",
               rank);
}

int FailOrSleep() {
  const int rank = Rank();
  std::printf("ready %d\n", rank);
  Flush();
  const bool sync = !absl::GetFlag(FLAGS_ready_dir).empty();
  if (rank == absl::GetFlag(FLAGS_fail_rank)) {
    if (sync) WaitForTheOtherRanks(rank);
    usleep(100 * 1000);
    const int code = absl::GetFlag(FLAGS_fail_code);
    if (code < 0) {
      signal(-code, SIG_DFL);
      raise(-code);
    }
    std::exit(code);
  }
  if (sync) {
    const int fd = open(ReadyFile(rank).c_str(), O_WRONLY | O_CREAT, 0644);
    if (fd >= 0) close(fd);
  }
  // sleep() returns early on a caught signal; loop on the remaining time.
  unsigned left = static_cast<unsigned>(absl::GetFlag(FLAGS_sleep_s));
  while (left > 0) left = sleep(left);
  std::printf("survived %d\n", rank);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  absl::StatusOr<std::optional<int>> job =
      tp::MaybeRelaunchSelf(absl::GetFlag(FLAGS_nproc), argc, argv);
  if (!job.ok()) {
    std::cerr << "launch_child: " << job.status() << "\n";
    return 2;
  }
  if (job->has_value()) return **job;

  const std::string mode = absl::GetFlag(FLAGS_mode);
  if (mode == "env") {
    char cwd[4096];
    const char* dir = getcwd(cwd, sizeof(cwd));
    std::vector<std::string> args(positional.begin() + 1, positional.end());
    std::printf(
        "env RANK=%s WORLD_SIZE=%s LOCAL_RANK=%s LOCAL_WORLD_SIZE=%s "
        "GROUP_RANK=%s GROUP_WORLD_SIZE=%s MASTER_ADDR=%s MASTER_PORT=%s "
        "TP_LAUNCHED=%s\n",
        Var("RANK").c_str(), Var("WORLD_SIZE").c_str(),
        Var("LOCAL_RANK").c_str(), Var("LOCAL_WORLD_SIZE").c_str(),
        Var("GROUP_RANK").c_str(), Var("GROUP_WORLD_SIZE").c_str(),
        Var("MASTER_ADDR").c_str(), Var("MASTER_PORT").c_str(),
        Var("TP_LAUNCHED").c_str());
    std::printf("extra ARGS=%s FOO=%s UNSET_ME=%s BLAS=%s CWD=%s\n",
                absl::StrJoin(args, "|").c_str(), Var("FOO").c_str(),
                Var("TP_TEST_UNSET_ME").c_str(),
                Var("OPENBLAS_NUM_THREADS").c_str(), dir ? dir : "?");
    std::fprintf(stderr, "to stderr from %s\n", Var("RANK").c_str());
    std::printf("partial line without newline");
    Flush();
    return 0;
  }
  if (mode == "fail") return FailOrSleep();
  if (mode == "ignore_term") {
    signal(SIGTERM, SIG_IGN);
    return FailOrSleep();
  }
  if (mode == "sigwait") {
    signal(SIGINT, OnSignal);
    signal(SIGTERM, OnSignal);
    std::printf("ready %d\n", Rank());
    Flush();
    while (g_signal == 0) pause();
    std::printf("got signal %d\n", static_cast<int>(g_signal));
    Flush();
    return 0;
  }
  if (mode == "lines") {
    const int rank = Rank();
    for (int i = 0; i < 300; ++i) {
      // Lengths up to ~9 KB, larger than a pipe's atomic write (4 KB).
      const std::string body(static_cast<size_t>((i * 37 + rank * 101) % 9000),
                             static_cast<char>('a' + i % 26));
      std::FILE* f = i % 2 == 0 ? stdout : stderr;
      std::fprintf(f, "line %d %d %s\n", rank, i, body.c_str());
    }
    std::printf("%s\n", std::string(70000, 'x').c_str());
    Flush();
    return 0;
  }
  if (mode == "discover") {
    absl::StatusOr<tp::LaunchEnv> env = tp::DiscoverLaunchEnv();
    if (!env.ok()) {
      std::printf("discover error %s\n", env.status().ToString().c_str());
      return 1;
    }
    std::printf("discover %s\n", env->DebugString().c_str());
    return 0;
  }
  std::fprintf(stderr, "launch_child: unknown --mode=%s\n", mode.c_str());
  return 2;
}
