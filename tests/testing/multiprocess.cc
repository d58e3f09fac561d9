#include "tests/testing/multiprocess.h"

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <exception>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace tp {
namespace testing {

absl::StatusOr<std::vector<ProcessResult>> RunProcesses(
    int world_size, const std::function<int(int rank)>& fn,
    absl::Duration timeout) {
  std::vector<pid_t> pids(world_size, -1);
  std::vector<ProcessResult> results(world_size);
  const absl::Time start = absl::Now();
  for (int r = 0; r < world_size; ++r) {
    results[r].rank = r;
    pid_t pid = fork();
    if (pid < 0) {
      for (pid_t p : pids) {
        if (p > 0) kill(p, SIGKILL);
      }
      return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
    }
    if (pid == 0) {
      int code = 2;
      try {
        code = fn(r);
      } catch (...) {
        code = 2;
      }
      fflush(stdout);
      fflush(stderr);
      _exit(code);
    }
    pids[r] = pid;
  }
  int remaining = world_size;
  bool killed = false;
  while (remaining > 0) {
    int status = 0;
    pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid > 0) {
      for (int r = 0; r < world_size; ++r) {
        if (pids[r] != pid) continue;
        results[r].elapsed = absl::Now() - start;
        if (WIFEXITED(status)) results[r].exit_code = WEXITSTATUS(status);
        if (WIFSIGNALED(status)) results[r].signal = WTERMSIG(status);
        pids[r] = -1;
        --remaining;
      }
      continue;
    }
    if (!killed && absl::Now() - start > timeout) {
      for (int r = 0; r < world_size; ++r) {
        if (pids[r] > 0) {
          results[r].timed_out = true;
          kill(pids[r], SIGKILL);
        }
      }
      killed = true;
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  return results;
}

int PickFreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return 0;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  int port = 0;
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  close(fd);
  return port;
}

}  // namespace testing
}  // namespace tp
