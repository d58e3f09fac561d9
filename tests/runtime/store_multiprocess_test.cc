// Stores across real processes: rendezvous of 4 processes over TcpStore and
// FileStore, a client that sends garbage to the TcpStore server, and a server
// process that dies under its clients.
//
// Child processes are this test binary re-executed (fork + execve of
// /proc/self/exe) with --gtest_filter=StoreChild.Main and the role in
// environment variables, so that no child runs code in a forked copy of a
// multi-threaded parent (safe under TSan and glog).
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "glog/logging.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "runtime/file_store.h"
#include "runtime/prefix_store.h"
#include "runtime/store.h"
#include "runtime/tcp_store.h"

namespace tp {
namespace {

constexpr int kWorld = 4;
constexpr int kAddsPerRank = 25;
constexpr absl::Duration kChildTimeout = absl::Seconds(20);

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr ? v : "";
}

std::string TempDir(absl::string_view name) {
  static std::atomic<int> counter{0};
  const std::string base =
      Env("TEST_TMPDIR").empty() ? "/tmp" : Env("TEST_TMPDIR");
  return absl::StrCat(base, "/", name, ".", getpid(), ".",
                      counter.fetch_add(1));
}

// ---- Child side
// ------------------------------------------------------------------

// What one rank does: announce itself, wait for everyone, add to a shared
// counter, then a barrier (every rank's "done" key) after which the counter
// must be complete. Returns a non-OK status describing the first failure.
absl::Status RendezvousRank(Store& store, int rank) {
  absl::Status s =
      store.Set(absl::StrCat("rank/", rank), absl::StrCat(getpid()));
  if (!s.ok()) return s;
  std::vector<std::string> ranks, done;
  for (int r = 0; r < kWorld; ++r) {
    ranks.push_back(absl::StrCat("rank/", r));
    done.push_back(absl::StrCat("done/", r));
  }
  s = store.Wait(ranks, kChildTimeout);
  if (!s.ok()) return s;
  for (int r = 0; r < kWorld; ++r) {
    absl::StatusOr<std::string> pid = store.Get(ranks[r], kChildTimeout);
    if (!pid.ok()) return pid.status();
    int value = 0;
    if (!absl::SimpleAtoi(*pid, &value) || value <= 0) {
      return absl::InternalError(
          absl::StrCat("bad pid '", *pid, "' of rank ", r));
    }
  }
  for (int i = 0; i < kAddsPerRank; ++i) {
    absl::StatusOr<int64_t> v = store.Add("counter", 1);
    if (!v.ok()) return v.status();
    if (*v < 1 || *v > kWorld * kAddsPerRank) {
      return absl::InternalError(absl::StrCat("counter out of range: ", *v));
    }
  }
  // A group namespace must not leak into the world's keys.
  PrefixStore group(absl::StrCat("group", rank % 2), store);
  absl::StatusOr<int64_t> members = group.Add("members", 1);
  if (!members.ok()) return members.status();
  s = store.Set(done[rank], "1");
  if (!s.ok()) return s;
  s = store.Wait(done, kChildTimeout);
  if (!s.ok()) return s;
  absl::StatusOr<std::string> total = store.Get("counter", kChildTimeout);
  if (!total.ok()) return total.status();
  if (*total != absl::StrCat(kWorld * kAddsPerRank)) {
    return absl::InternalError(
        absl::StrCat("counter is ", *total, " after the barrier"));
  }
  absl::StatusOr<std::string> group_members =
      group.Get("members", kChildTimeout);
  if (!group_members.ok()) return group_members.status();
  if (*group_members != absl::StrCat(kWorld / 2)) {
    return absl::InternalError(
        absl::StrCat("group has ", *group_members, " members"));
  }
  return absl::OkStatus();
}

// The child's entry point; a normal run skips it.
TEST(StoreChild, Main) {
  const std::string role = Env("TP_STORE_CHILD_ROLE");
  if (role.empty()) GTEST_SKIP() << "only runs in child processes";
  int rank = 0, port = 0;
  (void)absl::SimpleAtoi(Env("TP_STORE_CHILD_RANK"), &rank);
  (void)absl::SimpleAtoi(Env("TP_STORE_CHILD_PORT"), &port);
  if (role == "tcp_rank") {
    TcpStoreOptions options;
    options.port = port;
    options.connect_timeout = kChildTimeout;
    auto store = TcpStore::Create(options);
    ASSERT_TRUE(store.ok()) << store.status();
    absl::Status s = RendezvousRank(**store, rank);
    ASSERT_TRUE(s.ok()) << "rank " << rank << ": " << s;
  } else if (role == "file_rank") {
    auto store = FileStore::Create(Env("TP_STORE_CHILD_DIR"));
    ASSERT_TRUE(store.ok()) << store.status();
    absl::Status s = RendezvousRank(**store, rank);
    ASSERT_TRUE(s.ok()) << "rank " << rank << ": " << s;
  } else if (role == "tcp_server") {
    // Hosts a server, reports its port on the pipe, then waits to be killed
    // (bounded, in case the parent dies first).
    TcpStoreOptions options;
    options.is_server = true;
    auto store = TcpStore::Create(options);
    ASSERT_TRUE(store.ok()) << store.status();
    ASSERT_TRUE((*store)->Set("server_pid", absl::StrCat(getpid())).ok());
    int fd = 0;
    ASSERT_TRUE(absl::SimpleAtoi(Env("TP_STORE_CHILD_PIPE"), &fd));
    const std::string msg = absl::StrCat((*store)->port(), "\n");
    ASSERT_EQ(write(fd, msg.data(), msg.size()),
              static_cast<ssize_t>(msg.size()));
    close(fd);
    absl::SleepFor(absl::Seconds(60));
  } else {
    FAIL() << "unknown role " << role;
  }
}

// ---- Parent side
// -----------------------------------------------------------------

// Starts this binary as a child with `env` added to the environment.
// `keep_fd` (if >= 0) stays open in the child.
pid_t SpawnChild(const std::vector<std::string>& env, int keep_fd = -1) {
  std::vector<std::string> env_strings = env;
  for (char** e = environ; *e != nullptr; ++e) env_strings.push_back(*e);
  std::vector<char*> envp;
  for (std::string& e : env_strings) envp.push_back(&e[0]);
  envp.push_back(nullptr);
  std::string exe = "/proc/self/exe";
  std::string filter = "--gtest_filter=StoreChild.Main";
  char* argv[] = {&exe[0], &filter[0], nullptr};
  const pid_t pid = fork();
  CHECK_GE(pid, 0) << std::strerror(errno);
  if (pid == 0) {
    // Only async-signal-safe calls between fork and exec.
    if (keep_fd >= 0) {
      int flags = fcntl(keep_fd, F_GETFD);
      fcntl(keep_fd, F_SETFD, flags & ~FD_CLOEXEC);
    }
    execve(argv[0], argv, envp.data());
    _exit(127);
  }
  return pid;
}

// Waits for every child up to `timeout`; kills the rest. Returns each
// child's exit code (-1 when killed or signalled).
std::vector<int> WaitChildren(const std::vector<pid_t>& pids,
                              absl::Duration timeout) {
  std::vector<int> codes(pids.size(), -2);
  const absl::Time deadline = absl::Now() + timeout;
  size_t left = pids.size();
  while (left > 0 && absl::Now() < deadline) {
    for (size_t i = 0; i < pids.size(); ++i) {
      if (codes[i] != -2) continue;
      int status = 0;
      if (waitpid(pids[i], &status, WNOHANG) == pids[i]) {
        codes[i] = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        --left;
      }
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  for (size_t i = 0; i < pids.size(); ++i) {
    if (codes[i] == -2) {
      kill(pids[i], SIGKILL);
      waitpid(pids[i], nullptr, 0);
      codes[i] = -1;
    }
  }
  return codes;
}

TEST(StoreMultiProcessTest, FourProcessesRendezvousOverTcpStore) {
  TcpStoreOptions options;
  options.is_server = true;
  auto server = TcpStore::Create(options);
  ASSERT_TRUE(server.ok()) << server.status();
  std::vector<pid_t> pids;
  for (int r = 0; r < kWorld; ++r) {
    pids.push_back(
        SpawnChild({"TP_STORE_CHILD_ROLE=tcp_rank",
                    absl::StrCat("TP_STORE_CHILD_RANK=", r),
                    absl::StrCat("TP_STORE_CHILD_PORT=", (*server)->port())}));
  }
  const std::vector<int> codes = WaitChildren(pids, absl::Seconds(40));
  for (int r = 0; r < kWorld; ++r) EXPECT_EQ(codes[r], 0) << "rank " << r;
  EXPECT_EQ(*(*server)->Get("counter", absl::Seconds(1)),
            absl::StrCat(kWorld * kAddsPerRank));
  EXPECT_EQ(*(*server)->Get("group0/members", absl::Seconds(1)), "2");
  EXPECT_EQ(*(*server)->Get("group1/members", absl::Seconds(1)), "2");
  EXPECT_FALSE(*(*server)->Check({"members"}));
}

TEST(StoreMultiProcessTest, FourProcessesRendezvousOverFileStore) {
  const std::string dir = TempDir("mp_file_store");
  auto store = FileStore::Create(dir);
  ASSERT_TRUE(store.ok()) << store.status();
  std::vector<pid_t> pids;
  for (int r = 0; r < kWorld; ++r) {
    pids.push_back(SpawnChild({"TP_STORE_CHILD_ROLE=file_rank",
                               absl::StrCat("TP_STORE_CHILD_RANK=", r),
                               absl::StrCat("TP_STORE_CHILD_DIR=", dir)}));
  }
  const std::vector<int> codes = WaitChildren(pids, absl::Seconds(40));
  for (int r = 0; r < kWorld; ++r) EXPECT_EQ(codes[r], 0) << "rank " << r;
  EXPECT_EQ(*(*store)->Get("counter", absl::Seconds(1)),
            absl::StrCat(kWorld * kAddsPerRank));
  EXPECT_EQ(*(*store)->Get("group1/members", absl::Seconds(1)), "2");
}

// ---- Garbage on the wire
// --------------------------------------------------------

int ConnectRaw(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  CHECK_GE(fd, 0);
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  CHECK_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0)
      << std::strerror(errno);
  timeval tv = {5, 0};  // Never hang the test on a server that stays silent.
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  return fd;
}

// True when the server closes the connection (EOF or reset) within 5 s
// without sending anything back.
bool ServerClosesAfter(int port, const std::string& bytes) {
  const int fd = ConnectRaw(port);
  if (!bytes.empty()) {
    EXPECT_EQ(send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(bytes.size()));
  }
  char buf[64];
  const ssize_t n = recv(fd, buf, sizeof(buf), 0);
  const int err = errno;
  close(fd);
  return n == 0 || (n < 0 && err == ECONNRESET);
}

std::string U32(uint32_t v) {
  std::string s;
  for (int i = 0; i < 4; ++i) s.push_back(static_cast<char>(v >> (8 * i)));
  return s;
}

const std::string kMagic = "TPS1";  // The documented request magic.

TEST(StoreMultiProcessTest, ServerSurvivesGarbageAndServesOtherClients) {
  TcpStoreOptions options;
  options.is_server = true;
  auto server = TcpStore::Create(options);
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  // A client connected before the garbage keeps working afterwards.
  TcpStoreOptions client_options;
  client_options.port = port;
  auto client = TcpStore::Create(client_options);
  ASSERT_TRUE(client.ok()) << client.status();
  ASSERT_TRUE((*client)->Set("before", "1").ok());
  // A valid request, raw: Set("raw", "ok") gets an OK answer.
  {
    std::string payload =
        std::string(1, '\x01') + U32(3) + "raw" + U32(2) + "ok";
    const int fd = ConnectRaw(port);
    const std::string frame = kMagic + U32(payload.size()) + payload;
    ASSERT_EQ(send(fd, frame.data(), frame.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(frame.size()));
    char buf[5];
    ASSERT_EQ(recv(fd, buf, 5, MSG_WAITALL), 5);
    EXPECT_EQ(std::string(buf, 5), U32(1) + std::string(1, '\0'));
    close(fd);
    EXPECT_EQ(*(*client)->Get("raw", absl::Seconds(1)), "ok");
  }
  const std::vector<std::pair<std::string, std::string>> garbage = {
      {"http", "GET / HTTP/1.1\r\nHost: x\r\n\r\n"},
      {"oversized length", kMagic + U32(0xFFFFFFFFu)},
      {"length just over the limit",
       kMagic + U32(static_cast<uint32_t>(TcpStore::kMaxFrameBytes + 1))},
      {"unknown op", kMagic + U32(5) + std::string("\x63\x00\x00\x00\x00", 5)},
      {"empty payload", kMagic + U32(0)},
      {"key longer than the payload",
       kMagic + U32(7) + std::string(1, '\x01') + U32(1000) + "ab"},
      {"oversized key",
       kMagic + U32(5 + TcpStore::kMaxKeyBytes + 1 + 4) +
           std::string(1, '\x01') + U32(TcpStore::kMaxKeyBytes + 1) +
           std::string(TcpStore::kMaxKeyBytes + 1, 'k') + U32(0)},
      {"trailing bytes",
       kMagic + U32(6) + std::string(1, '\x06') + U32(0) + "x"},
      {"too many keys",
       kMagic + U32(5) + std::string(1, '\x05') + U32(0x7fffffff)},
  };
  for (const auto& [what, bytes] : garbage) {
    EXPECT_TRUE(ServerClosesAfter(port, bytes)) << what;
    // Everyone else is still served.
    EXPECT_TRUE((*client)->Set("after", what).ok()) << what;
    EXPECT_EQ(*(*server)->Get("after", absl::Seconds(1)), what);
  }
  // A client that sends half a frame and vanishes.
  {
    const int fd = ConnectRaw(port);
    const std::string half = kMagic + U32(100) + "abc";
    ASSERT_EQ(send(fd, half.data(), half.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(half.size()));
    close(fd);
  }
  // Many connections opened and dropped without a word.
  for (int i = 0; i < 50; ++i) close(ConnectRaw(port));
  EXPECT_EQ(*(*client)->Get("before", absl::Seconds(1)), "1");
  EXPECT_EQ(*(*client)->Add("n", 2), 2);
  auto late = TcpStore::Create(client_options);
  ASSERT_TRUE(late.ok()) << late.status();
  EXPECT_EQ(*(*late)->Add("n", 1), 3);
}

// ---- A server that goes away
// ------------------------------------------------------

TEST(StoreMultiProcessTest, ClientsOfAKilledServerGetUnavailablePromptly) {
  int fds[2];
  ASSERT_EQ(pipe2(fds, O_CLOEXEC), 0);
  const pid_t server =
      SpawnChild({"TP_STORE_CHILD_ROLE=tcp_server",
                  absl::StrCat("TP_STORE_CHILD_PIPE=", fds[1])},
                 fds[1]);
  close(fds[1]);
  std::string line;
  char c;
  while (read(fds[0], &c, 1) == 1 && c != '\n') line.push_back(c);
  close(fds[0]);
  int port = 0;
  ASSERT_TRUE(absl::SimpleAtoi(line, &port)) << "child said '" << line << "'";

  TcpStoreOptions options;
  options.port = port;
  options.reconnect_timeout = absl::Milliseconds(300);
  auto client = TcpStore::Create(options);
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_EQ(*(*client)->Get("server_pid", absl::Seconds(5)),
            absl::StrCat(server));
  ASSERT_TRUE((*client)->Set("x", "1").ok());
  ASSERT_TRUE((*client)->Set("y", "1").ok());

  // One thread is blocked in a long Get when the server dies.
  absl::StatusOr<std::string> blocked;
  absl::Duration blocked_took;
  std::thread waiter([&] {
    const absl::Time start = absl::Now();
    blocked = (*client)->Get("never", absl::Seconds(60));
    blocked_took = absl::Now() - start;
  });
  absl::SleepFor(absl::Milliseconds(200));
  ASSERT_EQ(kill(server, SIGKILL), 0);
  ASSERT_EQ(waitpid(server, nullptr, 0), server);
  waiter.join();
  EXPECT_EQ(blocked.status().code(), absl::StatusCode::kUnavailable)
      << blocked.status();
  EXPECT_LT(blocked_took, absl::Seconds(2));

  // Every later call fails fast instead of hanging.
  const auto fast_failure = [](const absl::Status& s) {
    return s.code() == absl::StatusCode::kUnavailable ||
           s.code() == absl::StatusCode::kDeadlineExceeded;
  };
  for (int i = 0; i < 3; ++i) {
    const absl::Time start = absl::Now();
    absl::Status set = (*client)->Set("x", "2");
    absl::StatusOr<std::string> get = (*client)->Get("x", absl::Seconds(30));
    absl::StatusOr<int64_t> add = (*client)->Add("n", 1);
    EXPECT_TRUE(fast_failure(set)) << set;
    EXPECT_TRUE(fast_failure(get.status())) << get.status();
    EXPECT_TRUE(fast_failure(add.status())) << add.status();
    EXPECT_LT(absl::Now() - start, absl::Seconds(3));
  }
}

}  // namespace
}  // namespace tp
