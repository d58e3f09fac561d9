#include "tools/launch.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "runtime/launch_env.h"
#include "runtime/status_macros.h"

extern char** environ;

namespace tp {
namespace {

constexpr int kMaxProc = 1024;
// Longest line relayed as one; longer output without a newline is split.
constexpr size_t kMaxLine = 64 * 1024;
// Poll period: bounds how late a child's exit or a deadline is noticed.
constexpr int kPollMs = 20;
// After every rank has exited, how long to wait for their pipes to reach EOF
// (a grandchild outside the rank's process group may still hold them).
constexpr absl::Duration kDrain = absl::Seconds(1);
constexpr int kForwardedSignals[] = {SIGINT, SIGTERM, SIGHUP};

// Write end of the self-pipe the signal handler reports to; -1 when no
// LaunchAndWait is running.
std::atomic<int> g_signal_fd{-1};

// Serializes LaunchAndWait calls: the signal handlers are process-wide.
absl::Mutex g_launch_mu(absl::kConstInit);

void OnSignal(int sig) {
  const int saved_errno = errno;
  const int fd = g_signal_fd.load();
  if (fd >= 0) {
    const unsigned char byte = static_cast<unsigned char>(sig);
    // Nothing useful to do on failure (a full pipe already has signals).
    (void)!write(fd, &byte, 1);
  }
  errno = saved_errno;
}

absl::Status ErrnoError(absl::string_view what) {
  return absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno)));
}

// Writes all of `data`; gives up silently when `fd` is closed or broken (the
// job must not fail because its log reader went away).
void WriteAll(int fd, absl::string_view data) {
  while (!data.empty()) {
    const ssize_t n = write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        pollfd p = {fd, POLLOUT, 0};
        poll(&p, 1, 100);
        continue;
      }
      return;
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
}

// Installs the forwarding handlers for the lifetime of the object and restores
// the previous ones afterwards.
class SignalCatcher {
 public:
  SignalCatcher() = default;
  SignalCatcher(const SignalCatcher&) = delete;
  SignalCatcher& operator=(const SignalCatcher&) = delete;

  absl::Status Install() {
    if (pipe2(fds_, O_CLOEXEC | O_NONBLOCK) != 0) {
      return ErrnoError("launch: pipe2 for signals");
    }
    g_signal_fd.store(fds_[1]);
    struct sigaction sa;
    std::memset(&sa, 0, sizeof(sa));
    sa.sa_handler = OnSignal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    for (size_t i = 0; i < kNumSignals; ++i) {
      if (sigaction(kForwardedSignals[i], &sa, &old_[i]) != 0) {
        return ErrnoError("launch: sigaction");
      }
      installed_[i] = true;
    }
    return absl::OkStatus();
  }

  ~SignalCatcher() {
    for (size_t i = 0; i < kNumSignals; ++i) {
      if (installed_[i]) sigaction(kForwardedSignals[i], &old_[i], nullptr);
    }
    g_signal_fd.store(-1);
    for (int fd : fds_) {
      if (fd >= 0) close(fd);
    }
  }

  int read_fd() const { return fds_[0]; }

  // Returns the signals received since the last call, oldest first.
  std::vector<int> Drain() {
    std::vector<int> out;
    unsigned char buf[64];
    for (;;) {
      const ssize_t n = read(fds_[0], buf, sizeof(buf));
      if (n <= 0) break;
      out.insert(out.end(), buf, buf + n);
    }
    return out;
  }

 private:
  static constexpr size_t kNumSignals =
      sizeof(kForwardedSignals) / sizeof(kForwardedSignals[0]);
  int fds_[2] = {-1, -1};
  struct sigaction old_[kNumSignals];
  bool installed_[kNumSignals] = {};
};

// One of a child's output pipes and the partial line read from it.
struct Stream {
  int fd = -1;
  int out_fd = -1;
  std::string pending;
};

struct Child {
  int rank = 0;
  pid_t pid = -1;
  bool running = false;
  std::string prefix;  // "[rank 3] "
  Stream streams[2];   // stdout, stderr
};

// Writes every complete line of `s.pending` (and, at EOF, the rest).
void EmitLines(Stream& s, const std::string& prefix, bool eof) {
  size_t start = 0;
  std::string line;
  for (;;) {
    const size_t nl = s.pending.find('\n', start);
    size_t len;
    size_t next;
    if (nl != std::string::npos && nl - start <= kMaxLine) {
      len = nl - start;
      next = nl + 1;
    } else if (s.pending.size() - start >= kMaxLine) {
      len = kMaxLine;
      next = start + kMaxLine;
    } else if (eof && s.pending.size() > start) {
      len = s.pending.size() - start;
      next = s.pending.size();
    } else {
      break;
    }
    line.clear();
    line.reserve(prefix.size() + len + 1);
    line.append(prefix);
    line.append(s.pending, start, len);
    line.push_back('\n');
    WriteAll(s.out_fd, line);
    start = next;
  }
  s.pending.erase(0, start);
}

void CloseStream(Stream& s, const std::string& prefix) {
  if (s.fd < 0) return;
  EmitLines(s, prefix, /*eof=*/true);
  close(s.fd);
  s.fd = -1;
}

std::string DescribeStatus(int wait_status) {
  if (WIFSIGNALED(wait_status)) {
    const int sig = WTERMSIG(wait_status);
    const char* name = strsignal(sig);
    return absl::StrCat("was killed by signal ", sig, " (",
                        name != nullptr ? name : "?", ")");
  }
  return absl::StrCat("exited with code ", WEXITSTATUS(wait_status));
}

int ExitCodeOf(int wait_status) {
  if (WIFSIGNALED(wait_status)) return 128 + WTERMSIG(wait_status);
  return WEXITSTATUS(wait_status);
}

// Sends `sig` to the process group of every running child.
void SignalAll(std::vector<Child>& children, int sig) {
  for (Child& c : children) {
    if (c.running) kill(-c.pid, sig);
  }
}

int CountRunning(const std::vector<Child>& children) {
  int n = 0;
  for (const Child& c : children) n += c.running ? 1 : 0;
  return n;
}

absl::Status Validate(const LaunchOptions& o) {
  auto bad = [](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat("launch: ", parts...));
  };
  if (o.nproc < 1 || o.nproc > kMaxProc) {
    return bad("nproc=", o.nproc, " is out of range [1, ", kMaxProc, "]");
  }
  if (o.nnodes < 1) return bad("nnodes=", o.nnodes, " must be >= 1");
  if (static_cast<int64_t>(o.nnodes) * o.nproc > INT_MAX) {
    return bad("nnodes=", o.nnodes, " x nproc=", o.nproc,
               " ranks do not fit in an int");
  }
  if (o.node_rank < 0 || o.node_rank >= o.nnodes) {
    return bad("node_rank=", o.node_rank,
               " is out of range [0, nnodes=", o.nnodes, ")");
  }
  if (o.master_addr.empty()) return bad("master_addr is empty");
  if (o.master_port < 0 || o.master_port > 65535) {
    return bad("master_port=", o.master_port,
               " is out of range [0, 65535] (0: pick a free port)");
  }
  if (o.master_port == 0 && o.nnodes > 1) {
    return bad("master_port=0 (pick a free port) needs nnodes=1, got nnodes=",
               o.nnodes, "; give every node the same master_port");
  }
  if (o.program.empty()) return bad("program is empty");
  if (o.grace < absl::ZeroDuration()) {
    return bad("grace=", absl::FormatDuration(o.grace), " is negative");
  }
  if (o.timeout <= absl::ZeroDuration()) {
    return bad("timeout=", absl::FormatDuration(o.timeout),
               " must be positive");
  }
  if (o.stdout_fd < 0 || o.stderr_fd < 0) {
    return bad("stdout_fd=", o.stdout_fd, " / stderr_fd=", o.stderr_fd,
               " must be open descriptors");
  }
  for (const auto& [name, value] : o.env) {
    if (name.empty() || absl::StrContains(name, '=')) {
      return bad("env variable name '", name, "' is empty or contains '='");
    }
  }
  return absl::OkStatus();
}

// The children's environment: the launcher's, minus `unset_env`, plus the
// launcher variables of `rank`, plus `options.env`.
std::vector<std::string> BuildEnvironment(const LaunchOptions& o,
                                          int local_rank, int port) {
  std::vector<std::string> order;
  std::map<std::string, std::string> vars;
  auto set = [&](const std::string& k, const std::string& v) {
    if (vars.find(k) == vars.end()) order.push_back(k);
    vars[k] = v;
  };
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    absl::string_view kv(*e);
    const size_t eq = kv.find('=');
    if (eq == absl::string_view::npos) continue;
    set(std::string(kv.substr(0, eq)), std::string(kv.substr(eq + 1)));
  }
  for (const std::string& k : o.unset_env) vars.erase(k);
  const int world = o.nnodes * o.nproc;
  const int rank = o.node_rank * o.nproc + local_rank;
  set("RANK", absl::StrCat(rank));
  set("WORLD_SIZE", absl::StrCat(world));
  set("LOCAL_RANK", absl::StrCat(local_rank));
  set("LOCAL_WORLD_SIZE", absl::StrCat(o.nproc));
  set("GROUP_RANK", absl::StrCat(o.node_rank));
  set("GROUP_WORLD_SIZE", absl::StrCat(o.nnodes));
  set("ROLE_RANK", absl::StrCat(rank));
  set("ROLE_WORLD_SIZE", absl::StrCat(world));
  set("MASTER_ADDR", o.master_addr);
  set("MASTER_PORT", absl::StrCat(port));
  set("TP_LAUNCHED", "1");
  // Like torchrun's OMP_NUM_THREADS: the local ranks share this host's cores,
  // so unless the user chose, each rank's OpenBLAS gets cores / nproc threads
  // instead of every rank spinning a thread per core.
  if (o.nproc > 1 && vars.count("OPENBLAS_NUM_THREADS") == 0 &&
      vars.count("OMP_NUM_THREADS") == 0) {
    const long cores = sysconf(_SC_NPROCESSORS_ONLN);
    set("OPENBLAS_NUM_THREADS",
        absl::StrCat(std::max<long>(1, cores / o.nproc)));
  }
  for (const auto& [k, v] : o.env) set(k, v);
  std::vector<std::string> out;
  out.reserve(vars.size());
  for (const std::string& k : order) {
    auto it = vars.find(k);
    if (it != vars.end()) out.push_back(absl::StrCat(k, "=", it->second));
  }
  return out;
}

std::vector<char*> CStrings(std::vector<std::string>& strings) {
  std::vector<char*> out;
  out.reserve(strings.size() + 1);
  for (std::string& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

void WriteRaw(int fd, const char* msg) {
  (void)!write(fd, msg, std::strlen(msg));
}

// Forks and execs one rank. Everything the child touches between fork and
// exec is prepared here, since only async-signal-safe calls are allowed there.
absl::Status Spawn(const std::string& path, std::vector<char*>& argv,
                   std::vector<char*>& envp, const std::string& working_dir,
                   int devnull, const LaunchOptions& o, Child& child) {
  int out[2], err[2];
  if (pipe2(out, O_CLOEXEC) != 0) return ErrnoError("launch: pipe2");
  if (pipe2(err, O_CLOEXEC) != 0) {
    close(out[0]);
    close(out[1]);
    return ErrnoError("launch: pipe2");
  }
  const pid_t parent = getpid();
  // Block the forwarded signals across fork, so that the child never runs
  // our handler (which would report into the launcher's pipe).
  sigset_t block, old_mask;
  sigemptyset(&block);
  for (int sig : kForwardedSignals) sigaddset(&block, sig);
  pthread_sigmask(SIG_BLOCK, &block, &old_mask);
  const pid_t pid = fork();
  if (pid == 0) {
    for (int sig : kForwardedSignals) signal(sig, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);  // the launcher died already
    if (dup2(devnull, STDIN_FILENO) < 0 || dup2(out[1], STDOUT_FILENO) < 0 ||
        dup2(err[1], STDERR_FILENO) < 0) {
      _exit(127);
    }
    if (!working_dir.empty() && chdir(working_dir.c_str()) != 0) {
      WriteRaw(STDERR_FILENO,
               "launch: cannot change to the working directory\n");
      _exit(127);
    }
    execve(path.c_str(), argv.data(), envp.data());
    WriteRaw(STDERR_FILENO, "launch: execve failed\n");
    _exit(127);
  }
  const int fork_errno = errno;
  pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
  close(out[1]);
  close(err[1]);
  if (pid < 0) {
    close(out[0]);
    close(err[0]);
    errno = fork_errno;
    return ErrnoError("launch: fork");
  }
  setpgid(pid, pid);  // also done by the child; whichever runs first wins
  child.pid = pid;
  child.running = true;
  child.streams[0] = Stream{out[0], o.stdout_fd, ""};
  child.streams[1] = Stream{err[0], o.stderr_fd, ""};
  return absl::OkStatus();
}

absl::StatusOr<int> Supervise(const LaunchOptions& o,
                              std::vector<Child>& children,
                              SignalCatcher& signals) {
  const absl::Time start = absl::Now();
  const absl::Time deadline = o.timeout == absl::InfiniteDuration()
                                  ? absl::InfiniteFuture()
                                  : start + o.timeout;
  std::optional<int> first_failure;
  bool stopping = false;
  bool timed_out = false;
  int forwarded = 0;
  absl::Time kill_at = absl::InfiniteFuture();
  absl::Time drain_until = absl::InfiniteFuture();

  auto stop_all = [&](absl::Time now) {
    if (stopping) return;
    stopping = true;
    SignalAll(children, SIGTERM);
    kill_at = now + o.grace;
  };

  std::vector<pollfd> fds;
  std::vector<Stream*> polled;
  std::vector<const std::string*> polled_prefix;
  char buf[64 * 1024];
  for (;;) {
    fds.clear();
    polled.clear();
    polled_prefix.clear();
    fds.push_back({signals.read_fd(), POLLIN, 0});
    for (Child& c : children) {
      for (Stream& s : c.streams) {
        if (s.fd < 0) continue;
        fds.push_back({s.fd, POLLIN, 0});
        polled.push_back(&s);
        polled_prefix.push_back(&c.prefix);
      }
    }
    const int running = CountRunning(children);
    if (running == 0 && polled.empty()) break;

    const int ready = poll(fds.data(), fds.size(), kPollMs);
    if (ready < 0 && errno != EINTR) return ErrnoError("launch: poll");
    const absl::Time now = absl::Now();

    if (ready > 0 && (fds[0].revents & POLLIN) != 0) {
      for (int sig : signals.Drain()) {
        if (forwarded == 0) {
          forwarded = sig;
          SignalAll(children, sig);
        } else {
          SignalAll(children, SIGKILL);
        }
      }
    }
    for (size_t i = 0; ready > 0 && i < polled.size(); ++i) {
      if (fds[i + 1].revents == 0) continue;
      Stream& s = *polled[i];
      const ssize_t n = read(s.fd, buf, sizeof(buf));
      if (n > 0) {
        s.pending.append(buf, static_cast<size_t>(n));
        EmitLines(s, *polled_prefix[i], /*eof=*/false);
      } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
        CloseStream(s, *polled_prefix[i]);
      }
    }

    for (Child& c : children) {
      if (!c.running) continue;
      int wait_status = 0;
      const pid_t r = waitpid(c.pid, &wait_status, WNOHANG);
      if (r == 0 || (r < 0 && errno == EINTR)) continue;
      c.running = false;
      if (r < 0) wait_status = 127 << 8;  // cannot happen for our own child
      const bool failed =
          WIFSIGNALED(wait_status) || WEXITSTATUS(wait_status) != 0;
      if (failed && !first_failure.has_value() && !timed_out) {
        first_failure = ExitCodeOf(wait_status);
        const int others = CountRunning(children);
        WriteAll(o.stderr_fd,
                 absl::StrCat("[launch] rank ", c.rank, " (pid ", c.pid, ") ",
                              DescribeStatus(wait_status),
                              others > 0 ? absl::StrCat("; stopping the other ",
                                                        others, " rank(s)")
                                         : std::string(),
                              "\n"));
        stop_all(now);
      }
    }

    if (!stopping && now >= deadline) {
      timed_out = true;
      WriteAll(o.stderr_fd,
               absl::StrCat("[launch] the job did not finish within ",
                            absl::FormatDuration(o.timeout),
                            "; stopping all ranks\n"));
      stop_all(now);
    }
    if (now >= kill_at) {
      SignalAll(children, SIGKILL);
      kill_at = absl::InfiniteFuture();
    }
    if (CountRunning(children) == 0) {
      if (drain_until == absl::InfiniteFuture()) drain_until = now + kDrain;
      if (now >= drain_until) {
        for (Child& c : children) {
          for (Stream& s : c.streams) CloseStream(s, c.prefix);
        }
      }
    }
  }

  if (timed_out) {
    return absl::DeadlineExceededError(absl::StrCat(
        "launch: the job of ", children.size(), " rank(s) running ", o.program,
        " did not finish within ", absl::FormatDuration(o.timeout),
        "; all ranks were stopped"));
  }
  if (first_failure.has_value()) return *first_failure;
  if (forwarded != 0) return 128 + forwarded;
  return 0;
}

}  // namespace

absl::StatusOr<std::string> ResolveProgram(const std::string& program,
                                           const std::string& relative_to) {
  if (program.empty()) {
    return absl::InvalidArgumentError("launch: program is empty");
  }
  auto check = [](const std::string& path) -> absl::Status {
    struct stat st;
    if (stat(path.c_str(), &st) != 0) {
      return absl::NotFoundError(
          absl::StrCat("launch: program '", path, "' not found"));
    }
    if (!S_ISREG(st.st_mode) || access(path.c_str(), X_OK) != 0) {
      return absl::PermissionDeniedError(absl::StrCat(
          "launch: program '", path, "' is not an executable file"));
    }
    return absl::OkStatus();
  };
  if (absl::StrContains(program, '/')) {
    std::string path = program;
    if (program[0] != '/') {
      std::string base = relative_to;
      if (base.empty()) {
        char cwd[PATH_MAX];
        if (getcwd(cwd, sizeof(cwd)) == nullptr) {
          return ErrnoError("launch: getcwd");
        }
        base = cwd;
      }
      path = absl::StrCat(base, "/", program);
    }
    RETURN_IF_ERROR(check(path));
    return path;
  }
  const char* path_env = std::getenv("PATH");
  const std::string search =
      path_env != nullptr ? path_env : "/usr/local/bin:/usr/bin:/bin";
  for (absl::string_view dir : absl::StrSplit(search, ':')) {
    const std::string candidate =
        absl::StrCat(dir.empty() ? "." : dir, "/", program);
    absl::Status s = check(candidate);
    if (s.ok()) return candidate;
  }
  return absl::NotFoundError(absl::StrCat("launch: program '", program,
                                          "' not found in PATH=", search));
}

absl::StatusOr<int> PickFreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return ErrnoError("launch: socket");
  sockaddr_in addr;
  std::memset(&addr, 0, sizeof(addr));
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    absl::Status s = ErrnoError("launch: binding a free port");
    close(fd);
    return s;
  }
  close(fd);
  return static_cast<int>(ntohs(addr.sin_port));
}

absl::StatusOr<int> LaunchAndWait(const LaunchOptions& options) {
  RETURN_IF_ERROR(Validate(options));
  ASSIGN_OR_RETURN(std::string path, ResolveProgram(options.program, ""));
  int port = options.master_port;
  if (port == 0) {
    ASSIGN_OR_RETURN(port, PickFreePort());
  }

  absl::MutexLock lock(&g_launch_mu);

  std::vector<std::string> argv_strings;
  argv_strings.push_back(options.program);
  argv_strings.insert(argv_strings.end(), options.args.begin(),
                      options.args.end());
  std::vector<char*> argv = CStrings(argv_strings);

  const int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (devnull < 0) return ErrnoError("launch: open /dev/null");

  SignalCatcher signals;
  absl::Status installed = signals.Install();
  if (!installed.ok()) {
    close(devnull);
    return installed;
  }

  std::vector<Child> children(static_cast<size_t>(options.nproc));
  absl::Status spawned;
  for (int local = 0; local < options.nproc; ++local) {
    Child& c = children[static_cast<size_t>(local)];
    c.rank = options.node_rank * options.nproc + local;
    c.prefix = absl::StrCat("[rank ", c.rank, "] ");
    std::vector<std::string> env_strings =
        BuildEnvironment(options, local, port);
    std::vector<char*> envp = CStrings(env_strings);
    spawned = Spawn(path, argv, envp, options.working_dir, devnull, options, c);
    if (!spawned.ok()) break;
  }
  close(devnull);
  if (!spawned.ok()) {
    SignalAll(children, SIGKILL);
    for (Child& c : children) {
      if (c.running) waitpid(c.pid, nullptr, 0);
      for (Stream& s : c.streams) CloseStream(s, c.prefix);
    }
    return spawned;
  }
  absl::StatusOr<int> result = Supervise(options, children, signals);
  if (!result.ok()) {
    // Only poll() itself can fail here; do not leave ranks behind.
    SignalAll(children, SIGKILL);
    for (Child& c : children) {
      if (c.running) waitpid(c.pid, nullptr, 0);
      for (Stream& s : c.streams) {
        if (s.fd >= 0) close(s.fd);
      }
    }
  }
  return result;
}

absl::StatusOr<std::optional<int>> MaybeRelaunchSelf(int nproc, int argc,
                                                     char** argv,
                                                     LaunchOptions base) {
  if (nproc < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--nproc=", nproc, " must be >= 1"));
  }
  const char* launched = std::getenv("TP_LAUNCHED");
  if (launched != nullptr && std::string(launched) == "1") {
    return std::optional<int>();
  }
  if (nproc == 1) return std::optional<int>();
  ASSIGN_OR_RETURN(LaunchEnv env, DiscoverLaunchEnv());
  if (env.source != LaunchSource::kSingleProcess) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--nproc=", nproc, " asks to start ", nproc,
        " ranks, but this process is already rank ", env.rank, " of ",
        env.world_size, " started by ", LaunchSourceName(env.source),
        "; drop --nproc or the outer launcher"));
  }
  char self[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) return ErrnoError("launch: readlink /proc/self/exe");
  self[n] = '\0';
  base.nproc = nproc;
  base.program = self;
  base.args.clear();
  for (int i = 1; i < argc; ++i) base.args.push_back(argv[i]);
  ASSIGN_OR_RETURN(int code, LaunchAndWait(base));
  return std::optional<int>(code);
}

}  // namespace tp
