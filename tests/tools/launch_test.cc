#include "tools/launch.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

extern char** environ;

namespace tp {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::string TestDir() {
  const char* d = std::getenv("TEST_TMPDIR");
  return d != nullptr ? d : "/tmp";
}

std::string Runfile(const std::string& path) {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  return absl::StrCat(srcdir != nullptr ? srcdir : ".", "/tensor_parallel/",
                      path);
}

std::string ChildPath() { return Runfile("tests/tools/launch_child"); }

std::string ReadFile(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> out = absl::StrSplit(text, '\n');
  if (!out.empty() && out.back().empty()) out.pop_back();
  return out;
}

// Output of one LaunchAndWait call, captured in files.
struct Captured {
  absl::StatusOr<int> code = 0;
  std::string out;
  std::string err;
  absl::Duration elapsed;
};

class OutputFiles {
 public:
  explicit OutputFiles(const std::string& name)
      : out_path_(absl::StrCat(TestDir(), "/", name, ".out")),
        err_path_(absl::StrCat(TestDir(), "/", name, ".err")) {
    out_fd_ = open(out_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    err_fd_ = open(err_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  }
  ~OutputFiles() {
    close(out_fd_);
    close(err_fd_);
  }
  void Attach(LaunchOptions& o) const {
    o.stdout_fd = out_fd_;
    o.stderr_fd = err_fd_;
  }
  std::string out() const { return ReadFile(out_path_); }
  std::string err() const { return ReadFile(err_path_); }

 private:
  std::string out_path_, err_path_;
  int out_fd_ = -1, err_fd_ = -1;
};

Captured Launch(LaunchOptions o, const std::string& name) {
  OutputFiles files(name);
  files.Attach(o);
  Captured c;
  const absl::Time start = absl::Now();
  c.code = LaunchAndWait(o);
  c.elapsed = absl::Now() - start;
  c.out = files.out();
  c.err = files.err();
  return c;
}

LaunchOptions ChildOptions(int nproc, std::vector<std::string> args) {
  LaunchOptions o;
  o.nproc = nproc;
  o.program = ChildPath();
  o.args = std::move(args);
  return o;
}

// Every line must carry a rank prefix; returns rank -> payload lines.
std::map<int, std::vector<std::string>> ByRank(const std::string& text) {
  std::map<int, std::vector<std::string>> out;
  for (const std::string& line : Lines(text)) {
    if (absl::StartsWith(line, "[launch] ")) continue;
    EXPECT_TRUE(absl::StartsWith(line, "[rank ")) << "unprefixed: " << line;
    const size_t close = line.find("] ");
    int rank = -1;
    EXPECT_NE(close, std::string::npos) << line;
    if (close == std::string::npos) continue;
    EXPECT_TRUE(absl::SimpleAtoi(line.substr(6, close - 6), &rank)) << line;
    out[rank].push_back(line.substr(close + 2));
  }
  return out;
}

class LaunchWorldTest : public ::testing::TestWithParam<int> {};

TEST_P(LaunchWorldTest, ChildrenSeeDistinctRanksAndPrefixedOutput) {
  const int n = GetParam();
  ASSERT_EQ(setenv("TP_TEST_UNSET_ME", "inherited", 1), 0);
  LaunchOptions o = ChildOptions(n, {"--mode=env", "a b", "c"});
  o.env = {{"FOO", "bar"}};
  o.unset_env = {"TP_TEST_UNSET_ME"};
  o.working_dir = TestDir();
  // Neither set: the launcher shares the cores, cores / nproc threads each.
  unsetenv("OPENBLAS_NUM_THREADS");
  unsetenv("OMP_NUM_THREADS");
  const std::string blas =
      n == 1 ? "<unset>"
             : absl::StrCat(std::max<long>(1, sysconf(_SC_NPROCESSORS_ONLN) / n));
  Captured c = Launch(o, absl::StrCat("world", n));
  unsetenv("TP_TEST_UNSET_ME");
  ASSERT_TRUE(c.code.ok()) << c.code.status();
  EXPECT_EQ(*c.code, 0) << c.err;

  std::map<int, std::vector<std::string>> out = ByRank(c.out);
  std::map<int, std::vector<std::string>> err = ByRank(c.err);
  ASSERT_EQ(out.size(), static_cast<size_t>(n)) << c.out;
  std::set<std::string> ports;
  for (int r = 0; r < n; ++r) {
    ASSERT_EQ(out[r].size(), 3u) << c.out;
    const std::string& env = out[r][0];
    EXPECT_TRUE(absl::StartsWith(
        env, absl::StrCat("env RANK=", r, " WORLD_SIZE=", n, " LOCAL_RANK=", r,
                          " LOCAL_WORLD_SIZE=", n,
                          " GROUP_RANK=0 GROUP_WORLD_SIZE=1 "
                          "MASTER_ADDR=127.0.0.1 MASTER_PORT=")))
        << env;
    EXPECT_TRUE(absl::EndsWith(env, " TP_LAUNCHED=1")) << env;
    const size_t p = env.find("MASTER_PORT=") + 12;
    const std::string port = env.substr(p, env.find(' ', p) - p);
    int port_value = 0;
    ASSERT_TRUE(absl::SimpleAtoi(port, &port_value)) << env;
    EXPECT_GT(port_value, 0);
    EXPECT_LE(port_value, 65535);
    ports.insert(port);
    EXPECT_EQ(out[r][1], absl::StrCat("extra ARGS=a b|c FOO=bar "
                                      "UNSET_ME=<unset> BLAS=",
                                      blas, " CWD=", TestDir()));
    // The last line had no newline; the launcher completes it.
    EXPECT_EQ(out[r][2], "partial line without newline");
    ASSERT_EQ(err[r].size(), 1u) << c.err;
    EXPECT_EQ(err[r][0], absl::StrCat("to stderr from ", r));
  }
  EXPECT_EQ(ports.size(), 1u) << "all ranks share one master port";
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, LaunchWorldTest,
                         ::testing::Values(1, 2, 3, 4));

TEST(LaunchTest, SecondNodeRanksAndFixedMaster) {
  LaunchOptions o = ChildOptions(2, {"--mode=env"});
  o.nnodes = 3;
  o.node_rank = 1;
  o.master_addr = "10.0.0.7";
  o.master_port = 1234;
  Captured c = Launch(o, "node1");
  ASSERT_TRUE(c.code.ok()) << c.code.status();
  EXPECT_EQ(*c.code, 0);
  std::map<int, std::vector<std::string>> out = ByRank(c.out);
  ASSERT_EQ(out.size(), 2u) << c.out;
  for (int local = 0; local < 2; ++local) {
    const int r = 2 + local;
    ASSERT_FALSE(out[r].empty()) << c.out;
    EXPECT_EQ(out[r][0],
              absl::StrCat("env RANK=", r, " WORLD_SIZE=6 LOCAL_RANK=", local,
                           " LOCAL_WORLD_SIZE=2 GROUP_RANK=1 "
                           "GROUP_WORLD_SIZE=3 MASTER_ADDR=10.0.0.7 "
                           "MASTER_PORT=1234 TP_LAUNCHED=1"));
  }
}

// A fresh directory for launch_child's --ready_dir: the failing rank waits
// until every other rank has started (on a loaded machine a rank can take
// longer than the failing rank's 100 ms to start, and would then be stopped
// before it printed anything or ignored SIGTERM).
std::string ReadyDirFlag(const std::string& name) {
  const std::string dir = absl::StrCat(TestDir(), "/", name, ".ready");
  EXPECT_TRUE(mkdir(dir.c_str(), 0755) == 0 || errno == EEXIST) << dir;
  return absl::StrCat("--ready_dir=", dir);
}

TEST(LaunchTest, FailingRankStopsTheOthersWithinSeconds) {
  LaunchOptions o =
      ChildOptions(4, {"--mode=fail", "--fail_rank=1", "--fail_code=3",
                       "--sleep_s=60", ReadyDirFlag("fail")});
  Captured c = Launch(o, "fail");
  ASSERT_TRUE(c.code.ok()) << c.code.status();
  EXPECT_EQ(*c.code, 3);
  EXPECT_LT(c.elapsed, absl::Seconds(5));
  std::cout << "[timing] failing rank -> LaunchAndWait returned after "
            << absl::FormatDuration(c.elapsed) << "\n";
  EXPECT_THAT(c.err, HasSubstr("[launch] rank 1 (pid "));
  EXPECT_THAT(c.err,
              HasSubstr("exited with code 3; stopping the other 3 rank(s)"));
  EXPECT_THAT(c.out, Not(HasSubstr("survived")));
  std::map<int, std::vector<std::string>> out = ByRank(c.out);
  for (int r = 0; r < 4; ++r) {
    ASSERT_FALSE(out[r].empty()) << c.out;
    EXPECT_EQ(out[r][0], absl::StrCat("ready ", r));
  }
}

TEST(LaunchTest, RankKilledBySignalCountsAsFailure) {
  LaunchOptions o = ChildOptions(
      3, {"--mode=fail", "--fail_rank=2", "--fail_code=-9", "--sleep_s=60"});
  Captured c = Launch(o, "killed");
  ASSERT_TRUE(c.code.ok()) << c.code.status();
  EXPECT_EQ(*c.code, 128 + SIGKILL);
  EXPECT_LT(c.elapsed, absl::Seconds(5));
  EXPECT_THAT(c.err, HasSubstr("[launch] rank 2"));
  EXPECT_THAT(c.err, HasSubstr("killed by signal 9"));
  EXPECT_THAT(c.out, Not(HasSubstr("survived")));
}

TEST(LaunchTest, RanksIgnoringSigtermAreKilledAfterGrace) {
  LaunchOptions o =
      ChildOptions(3, {"--mode=ignore_term", "--fail_rank=0", "--fail_code=3",
                       "--sleep_s=60", ReadyDirFlag("grace")});
  o.grace = absl::Milliseconds(700);
  Captured c = Launch(o, "grace");
  ASSERT_TRUE(c.code.ok()) << c.code.status();
  EXPECT_EQ(*c.code, 3);
  // Rank 0 fails ~100 ms after the others ignore SIGTERM; they survive
  // SIGTERM for `grace`, then are killed (long before their 60 s sleep ends).
  EXPECT_GE(c.elapsed, absl::Milliseconds(700));
  EXPECT_LT(c.elapsed, absl::Seconds(5));
  std::cout << "[timing] SIGTERM ignored, grace 700ms -> returned after "
            << absl::FormatDuration(c.elapsed) << "\n";
  EXPECT_THAT(c.out, Not(HasSubstr("survived")));
}

TEST(LaunchTest, TimeoutStopsTheJob) {
  LaunchOptions o = ChildOptions(2, {"--mode=fail", "--sleep_s=60"});
  o.timeout = absl::Milliseconds(300);
  Captured c = Launch(o, "timeout");
  ASSERT_FALSE(c.code.ok());
  EXPECT_EQ(c.code.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(std::string(c.code.status().message()), HasSubstr("300ms"));
  EXPECT_GE(c.elapsed, absl::Milliseconds(300));
  EXPECT_LT(c.elapsed, absl::Seconds(2));
  EXPECT_THAT(c.err, HasSubstr("did not finish within 300ms"));
}

// Waits until `path` holds `n` lines containing `needle`.
bool WaitForLines(const std::string& path, const std::string& needle, int n) {
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (absl::Now() < deadline) {
    int count = 0;
    for (const std::string& line : Lines(ReadFile(path))) {
      count += absl::StrContains(line, needle) ? 1 : 0;
    }
    if (count >= n) return true;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return false;
}

class LaunchSignalTest : public ::testing::TestWithParam<int> {};

TEST_P(LaunchSignalTest, ForwardsSignalToEveryRank) {
  const int sig = GetParam();
  const std::string name = absl::StrCat("signal", sig);
  OutputFiles files(name);
  LaunchOptions o = ChildOptions(3, {"--mode=sigwait"});
  o.timeout = absl::Seconds(30);  // a safety net: the ranks wait for a signal
  files.Attach(o);
  struct sigaction before;
  ASSERT_EQ(sigaction(sig, nullptr, &before), 0);
  bool ready = false;
  std::thread sender([&] {
    ready =
        WaitForLines(absl::StrCat(TestDir(), "/", name, ".out"), "ready", 3);
    // The launcher's handler is installed before the first rank starts, so
    // this reaches it (and not the default action) once a rank is ready.
    if (ready) kill(getpid(), sig);
  });
  absl::StatusOr<int> code = LaunchAndWait(o);
  sender.join();
  ASSERT_TRUE(ready) << files.out();
  ASSERT_TRUE(code.ok()) << code.status();
  // Every rank caught the signal and exited 0: the job reports the signal.
  EXPECT_EQ(*code, 128 + sig);
  std::map<int, std::vector<std::string>> out = ByRank(files.out());
  for (int r = 0; r < 3; ++r) {
    ASSERT_EQ(out[r].size(), 2u) << files.out();
    EXPECT_EQ(out[r][1], absl::StrCat("got signal ", sig));
  }
  // The previous disposition is back.
  struct sigaction after;
  ASSERT_EQ(sigaction(sig, nullptr, &after), 0);
  EXPECT_EQ(after.sa_handler, before.sa_handler);
}

INSTANTIATE_TEST_SUITE_P(Signals, LaunchSignalTest,
                         ::testing::Values(SIGINT, SIGTERM));

TEST(LaunchTest, SecondSignalKillsRanksThatIgnoreTheFirst) {
  OutputFiles files("second_signal");
  LaunchOptions o = ChildOptions(2, {"--mode=ignore_term", "--sleep_s=60"});
  o.timeout = absl::Seconds(30);  // a safety net
  files.Attach(o);
  std::thread sender([&] {
    if (!WaitForLines(absl::StrCat(TestDir(), "/second_signal.out"), "ready",
                      2)) {
      return;
    }
    kill(getpid(), SIGTERM);
    absl::SleepFor(absl::Milliseconds(300));
    kill(getpid(), SIGTERM);
  });
  const absl::Time start = absl::Now();
  absl::StatusOr<int> code = LaunchAndWait(o);
  const absl::Duration elapsed = absl::Now() - start;
  sender.join();
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 128 + SIGKILL);
  EXPECT_LT(elapsed, absl::Seconds(5));
  EXPECT_THAT(files.out(), Not(HasSubstr("survived")));
}

TEST(LaunchTest, WholeLinesFromBothStreams) {
  Captured c = Launch(ChildOptions(3, {"--mode=lines"}), "lines");
  ASSERT_TRUE(c.code.ok()) << c.code.status();
  EXPECT_EQ(*c.code, 0);
  std::map<int, std::vector<std::string>> out = ByRank(c.out);
  std::map<int, std::vector<std::string>> err = ByRank(c.err);
  for (int r = 0; r < 3; ++r) {
    std::vector<std::string> want_out, want_err;
    for (int i = 0; i < 300; ++i) {
      const std::string body(static_cast<size_t>((i * 37 + r * 101) % 9000),
                             static_cast<char>('a' + i % 26));
      (i % 2 == 0 ? want_out : want_err)
          .push_back(absl::StrCat("line ", r, " ", i, " ", body));
    }
    // The 70000-byte line is split at 64 KiB.
    want_out.push_back(std::string(65536, 'x'));
    want_out.push_back(std::string(70000 - 65536, 'x'));
    EXPECT_EQ(out[r], want_out) << "rank " << r;
    EXPECT_EQ(err[r], want_err) << "rank " << r;
  }
}

TEST(LaunchTest, EndToEndDiscoveryUnderTheLauncher) {
  LaunchOptions o = ChildOptions(3, {"--mode=discover"});
  o.master_port = 4567;
  Captured c = Launch(o, "discover");
  ASSERT_TRUE(c.code.ok()) << c.code.status();
  EXPECT_EQ(*c.code, 0) << c.out;
  std::map<int, std::vector<std::string>> out = ByRank(c.out);
  for (int r = 0; r < 3; ++r) {
    ASSERT_EQ(out[r].size(), 1u) << c.out;
    EXPECT_EQ(out[r][0],
              absl::StrCat("discover rank ", r, "/3 (local ", r,
                           "/3) master 127.0.0.1:4567 via torchrun"));
  }
}

struct BadOptions {
  std::string name;
  std::function<void(LaunchOptions&)> edit;
  absl::StatusCode code;
  std::string mentions;
};

TEST(LaunchTest, RejectsBadOptions) {
  const std::string not_exec = TestDir() + "/not_executable";
  { std::ofstream(not_exec) << "#!/bin/sh\n"; }
  chmod(not_exec.c_str(), 0644);
  const std::vector<BadOptions> cases = {
      {"nproc0", [](LaunchOptions& o) { o.nproc = 0; },
       absl::StatusCode::kInvalidArgument, "nproc=0"},
      {"nproc_huge", [](LaunchOptions& o) { o.nproc = 5000; },
       absl::StatusCode::kInvalidArgument, "nproc=5000"},
      {"nnodes0", [](LaunchOptions& o) { o.nnodes = 0; },
       absl::StatusCode::kInvalidArgument, "nnodes=0"},
      {"node_rank",
       [](LaunchOptions& o) {
         o.nnodes = 2;
         o.node_rank = 2;
         o.master_port = 5000;
       },
       absl::StatusCode::kInvalidArgument, "node_rank=2"},
      {"negative_node_rank", [](LaunchOptions& o) { o.node_rank = -1; },
       absl::StatusCode::kInvalidArgument, "node_rank=-1"},
      {"port", [](LaunchOptions& o) { o.master_port = 70000; },
       absl::StatusCode::kInvalidArgument, "master_port=70000"},
      {"port0_multinode", [](LaunchOptions& o) { o.nnodes = 2; },
       absl::StatusCode::kInvalidArgument, "master_port=0"},
      {"empty_addr", [](LaunchOptions& o) { o.master_addr = ""; },
       absl::StatusCode::kInvalidArgument, "master_addr"},
      {"empty_program", [](LaunchOptions& o) { o.program = ""; },
       absl::StatusCode::kInvalidArgument, "program"},
      {"negative_grace", [](LaunchOptions& o) { o.grace = absl::Seconds(-1); },
       absl::StatusCode::kInvalidArgument, "grace=-1s"},
      {"zero_timeout",
       [](LaunchOptions& o) { o.timeout = absl::ZeroDuration(); },
       absl::StatusCode::kInvalidArgument, "timeout=0"},
      {"bad_env",
       [](LaunchOptions& o) {
         o.env = {{"A=B", "c"}};
       },
       absl::StatusCode::kInvalidArgument, "A=B"},
      {"missing", [](LaunchOptions& o) { o.program = "/nonexistent/prog"; },
       absl::StatusCode::kNotFound, "/nonexistent/prog"},
      {"missing_in_path",
       [](LaunchOptions& o) { o.program = "tp-no-such-program-xyz"; },
       absl::StatusCode::kNotFound, "tp-no-such-program-xyz"},
      {"not_executable", [&](LaunchOptions& o) { o.program = not_exec; },
       absl::StatusCode::kPermissionDenied, "not_executable"},
      {"directory", [](LaunchOptions& o) { o.program = TestDir(); },
       absl::StatusCode::kPermissionDenied, "not an executable"},
  };
  for (const BadOptions& b : cases) {
    LaunchOptions o = ChildOptions(2, {"--mode=env"});
    b.edit(o);
    absl::StatusOr<int> code = LaunchAndWait(o);
    ASSERT_FALSE(code.ok()) << b.name;
    EXPECT_EQ(code.status().code(), b.code) << b.name << ": " << code.status();
    EXPECT_THAT(std::string(code.status().message()), HasSubstr(b.mentions))
        << b.name;
  }
}

TEST(LaunchTest, ResolveProgram) {
  absl::StatusOr<std::string> sh = ResolveProgram("sh", "");
  ASSERT_TRUE(sh.ok()) << sh.status();
  EXPECT_TRUE(absl::EndsWith(*sh, "/sh")) << *sh;
  EXPECT_EQ(access(sh->c_str(), X_OK), 0);

  const std::string child = ChildPath();
  const std::string dir = child.substr(0, child.rfind('/'));
  absl::StatusOr<std::string> rel = ResolveProgram("./launch_child", dir);
  ASSERT_TRUE(rel.ok()) << rel.status();
  EXPECT_EQ(*rel, dir + "/./launch_child");
  EXPECT_EQ(ResolveProgram("./launch_child", "/nonexistent").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(ResolveProgram("", "").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LaunchTest, PickFreePortReturnsABindablePort) {
  absl::StatusOr<int> port = PickFreePort();
  ASSERT_TRUE(port.ok()) << port.status();
  ASSERT_GT(*port, 0);
  ASSERT_LE(*port, 65535);
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = htons(static_cast<uint16_t>(*port));
  EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  close(fd);
}

// Runs `argv` as a plain subprocess (not through the launcher) with `extra`
// added to the environment; returns its exit code and output.
struct RunResult {
  int exit_code = -1;
  std::string out, err;
  absl::Duration elapsed;
};

RunResult RunProcess(const std::vector<std::string>& args,
                     const std::vector<std::string>& extra_env,
                     const std::string& name) {
  const std::string out_path = absl::StrCat(TestDir(), "/", name, ".run.out");
  const std::string err_path = absl::StrCat(TestDir(), "/", name, ".run.err");
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, out_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) env_strings.push_back(*e);
  env_strings.insert(env_strings.end(), extra_env.begin(), extra_env.end());
  std::vector<char*> envp, argv;
  for (std::string& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> arg_copy = args;
  for (std::string& s : arg_copy) argv.push_back(s.data());
  argv.push_back(nullptr);
  RunResult r;
  const absl::Time start = absl::Now();
  pid_t pid = -1;
  const int rc =
      posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    ADD_FAILURE() << "posix_spawn " << args[0] << ": " << rc;
    return r;
  }
  int status = 0;
  waitpid(pid, &status, 0);
  r.elapsed = absl::Now() - start;
  r.exit_code =
      WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = ReadFile(out_path);
  r.err = ReadFile(err_path);
  return r;
}

TEST(MaybeRelaunchSelfTest, NprocFlagRelaunchesTheBinary) {
  RunResult r =
      RunProcess({ChildPath(), "--nproc=3", "--mode=discover"}, {}, "relaunch");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::map<int, std::vector<std::string>> out = ByRank(r.out);
  ASSERT_EQ(out.size(), 3u) << r.out;
  std::string port;
  for (int rank = 0; rank < 3; ++rank) {
    ASSERT_EQ(out[rank].size(), 1u) << r.out;
    const std::string& line = out[rank][0];
    EXPECT_TRUE(absl::StartsWith(
        line, absl::StrCat("discover rank ", rank, "/3 (local ", rank,
                           "/3) master 127.0.0.1:")))
        << line;
    EXPECT_TRUE(absl::EndsWith(line, " via torchrun")) << line;
  }
}

TEST(MaybeRelaunchSelfTest, RelaunchedJobPassesOnTheFailureCode) {
  RunResult r = RunProcess({ChildPath(), "--nproc=2", "--mode=fail",
                            "--fail_rank=1", "--fail_code=5", "--sleep_s=60"},
                           {}, "relaunch_fail");
  EXPECT_EQ(r.exit_code, 5) << r.err;
  EXPECT_LT(r.elapsed, absl::Seconds(5));
  EXPECT_THAT(r.err, HasSubstr("[launch] rank 1"));
}

TEST(MaybeRelaunchSelfTest, RefusesToMultiplyRanksOfAnotherLauncher) {
  RunResult r = RunProcess({ChildPath(), "--nproc=2", "--mode=discover"},
                           {"OMPI_COMM_WORLD_RANK=0", "OMPI_COMM_WORLD_SIZE=2"},
                           "relaunch_mpi");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("INVALID_ARGUMENT"));
  EXPECT_THAT(r.err, HasSubstr("already rank 0 of 2 started by openmpi"));
  // Without --nproc the same environment runs as that MPI rank.
  RunResult plain = RunProcess(
      {ChildPath(), "--mode=discover"},
      {"OMPI_COMM_WORLD_RANK=1", "OMPI_COMM_WORLD_SIZE=2"}, "plain_mpi");
  EXPECT_EQ(plain.exit_code, 0) << plain.err;
  EXPECT_EQ(plain.out,
            "discover rank 1/2 (local 1/2) master 127.0.0.1:29500 via "
            "openmpi\n");
}

TEST(MaybeRelaunchSelfTest, ContinuesAsRankWhenNotNeeded) {
  char arg0[] = "prog";
  char* argv[] = {arg0, nullptr};
  absl::StatusOr<std::optional<int>> one = MaybeRelaunchSelf(1, 1, argv);
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_FALSE(one->has_value());

  ASSERT_EQ(setenv("TP_LAUNCHED", "1", 1), 0);
  absl::StatusOr<std::optional<int>> child = MaybeRelaunchSelf(4, 1, argv);
  unsetenv("TP_LAUNCHED");
  ASSERT_TRUE(child.ok()) << child.status();
  EXPECT_FALSE(child->has_value());

  absl::StatusOr<std::optional<int>> zero = MaybeRelaunchSelf(0, 1, argv);
  EXPECT_EQ(zero.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(zero.status().message()), HasSubstr("--nproc=0"));
}

std::string TprunPath() { return Runfile("tools/tprun"); }

TEST(TprunTest, RunsProgramRelativeToBuildWorkingDirectory) {
  const std::string child = ChildPath();
  const std::string dir = child.substr(0, child.rfind('/'));
  RunResult r =
      RunProcess({TprunPath(), "--nproc=2", "--master_port=2345", "--",
                  "./launch_child", "--mode=env", "x"},
                 {absl::StrCat("BUILD_WORKING_DIRECTORY=", dir)}, "tprun");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::map<int, std::vector<std::string>> out = ByRank(r.out);
  ASSERT_EQ(out.size(), 2u) << r.out;
  for (int rank = 0; rank < 2; ++rank) {
    ASSERT_EQ(out[rank].size(), 3u) << r.out;
    EXPECT_EQ(out[rank][0],
              absl::StrCat("env RANK=", rank, " WORLD_SIZE=2 LOCAL_RANK=", rank,
                           " LOCAL_WORLD_SIZE=2 GROUP_RANK=0 "
                           "GROUP_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 "
                           "MASTER_PORT=2345 TP_LAUNCHED=1"));
    EXPECT_TRUE(absl::StartsWith(out[rank][1], "extra ARGS=x FOO=<unset>"))
        << out[rank][1];
    EXPECT_TRUE(absl::EndsWith(out[rank][1], absl::StrCat(" CWD=", dir)))
        << out[rank][1];
  }
}

TEST(TprunTest, ExitCodes) {
  RunResult fail =
      RunProcess({TprunPath(), "--nproc=2", "--grace=1s", "--", ChildPath(),
                  "--mode=fail", "--fail_rank=0", "--fail_code=7"},
                 {}, "tprun_fail");
  EXPECT_EQ(fail.exit_code, 7) << fail.err;
  EXPECT_LT(fail.elapsed, absl::Seconds(5));

  RunResult timeout = RunProcess({TprunPath(), "--nproc=1", "--timeout=200ms",
                                  "--", ChildPath(), "--mode=fail"},
                                 {}, "tprun_timeout");
  EXPECT_EQ(timeout.exit_code, 124) << timeout.err;
  EXPECT_THAT(timeout.err, HasSubstr("did not finish within 200ms"));

  RunResult usage = RunProcess({TprunPath(), "--nproc=2"}, {}, "tprun_usage");
  EXPECT_EQ(usage.exit_code, 2);
  EXPECT_THAT(usage.err, HasSubstr("no program given"));

  RunResult missing = RunProcess({TprunPath(), "--", "tp-no-such-program-xyz"},
                                 {}, "tprun_missing");
  EXPECT_EQ(missing.exit_code, 127);
  EXPECT_THAT(missing.err, HasSubstr("not found"));

  RunResult bad = RunProcess({TprunPath(), "--nproc=0", "--", ChildPath()}, {},
                             "tprun_bad");
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_THAT(bad.err, HasSubstr("nproc=0"));

  RunResult bad_grace = RunProcess(
      {TprunPath(), "--grace=soon", "--", ChildPath()}, {}, "tprun_grace");
  EXPECT_EQ(bad_grace.exit_code, 2);
  EXPECT_THAT(bad_grace.err, HasSubstr("--grace='soon' is not a duration"));
}

}  // namespace
}  // namespace tp
