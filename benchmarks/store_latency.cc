#include "benchmarks/store_latency.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "runtime/status_macros.h"
#include "runtime/tcp_store.h"

namespace tp {
namespace {

struct Row {
  std::string op;
  int64_t count = 0;
  size_t bytes = 0;
  double median_us = 0;
  double p99_us = 0;
  int64_t wrong = 0;
};

// Times `op(i)` for i in [0, warmup + num): warm-up calls are not timed.
// `op` returns whether its result was right, or an error.
absl::StatusOr<Row> Measure(
    const std::string& name, size_t bytes, const TcpStoreLatencyOptions& o,
    const std::function<absl::StatusOr<bool>(int64_t)>& op) {
  Row row{name, o.num_ops, bytes};
  std::vector<double> us;
  us.reserve(static_cast<size_t>(o.num_ops));
  for (int64_t i = 0; i < o.warmup_ops + o.num_ops; ++i) {
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<bool> right = op(i);
    const auto end = std::chrono::steady_clock::now();
    if (!right.ok()) {
      return absl::Status(right.status().code(),
                          absl::StrCat(name, ": ", right.status().message()));
    }
    if (i < o.warmup_ops) continue;
    if (!*right) ++row.wrong;
    us.push_back(
        std::chrono::duration<double, std::micro>(end - start).count());
  }
  std::sort(us.begin(), us.end());
  row.median_us = us[us.size() / 2];
  row.p99_us = us[std::min(us.size() - 1, us.size() * 99 / 100)];
  return row;
}

// A plain TCP echo over loopback: the floor under any request/response
// protocol on this machine.
class EchoServer {
 public:
  static absl::StatusOr<std::unique_ptr<EchoServer>> Start(size_t message) {
    auto server = std::unique_ptr<EchoServer>(new EchoServer(message));
    server->listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr = {};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (server->listen_fd_ < 0 ||
        bind(server->listen_fd_, reinterpret_cast<sockaddr*>(&addr),
             sizeof(addr)) != 0 ||
        listen(server->listen_fd_, 1) != 0 ||
        getsockname(server->listen_fd_, reinterpret_cast<sockaddr*>(&addr),
                    &len) != 0) {
      return absl::InternalError(
          absl::StrCat("echo server: ", std::strerror(errno)));
    }
    server->port_ = ntohs(addr.sin_port);
    EchoServer* raw = server.get();
    server->thread_ = std::thread([raw] { raw->Run(); });
    return server;
  }
  ~EchoServer() {
    if (listen_fd_ >= 0) shutdown(listen_fd_, SHUT_RDWR);
    if (thread_.joinable()) thread_.join();
    if (listen_fd_ >= 0) close(listen_fd_);
  }
  int port() const { return port_; }

 private:
  explicit EchoServer(size_t message) : message_(message) {}
  void Run() {
    const int fd = accept(listen_fd_, nullptr, nullptr);
    if (fd < 0) return;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    std::string buf(message_, '\0');
    while (recv(fd, &buf[0], buf.size(), MSG_WAITALL) ==
               static_cast<ssize_t>(buf.size()) &&
           send(fd, buf.data(), buf.size(), MSG_NOSIGNAL) ==
               static_cast<ssize_t>(buf.size())) {
    }
    close(fd);
  }
  const size_t message_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::thread thread_;
};

}  // namespace

absl::Status RunTcpStoreLatency(const TcpStoreLatencyOptions& options,
                                std::ostream& out) {
  if (options.num_ops < 1 || options.warmup_ops < 0 ||
      options.value_bytes > TcpStore::kMaxValueBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "RunTcpStoreLatency: need num_ops >= 1 (got ", options.num_ops,
        "), warmup_ops >= 0 (got ", options.warmup_ops, "), value_bytes <= ",
        TcpStore::kMaxValueBytes, " (got ", options.value_bytes, ")"));
  }
  TcpStoreOptions server_options;
  server_options.host = "127.0.0.1";
  server_options.bind_host = "127.0.0.1";
  server_options.is_server = true;
  server_options.timeout = absl::Seconds(30);
  ASSIGN_OR_RETURN(std::unique_ptr<TcpStore> server,
                   TcpStore::Create(server_options));
  TcpStoreOptions client_options = server_options;
  client_options.is_server = false;
  client_options.bind_host.clear();
  client_options.port = server->port();
  ASSIGN_OR_RETURN(std::unique_ptr<TcpStore> client,
                   TcpStore::Create(client_options));

  const size_t n = options.value_bytes;
  // Distinct values per iteration, so a stale answer counts as wrong.
  const auto value_of = [n](int64_t i) {
    std::string v = absl::StrCat(i, ":");
    v.resize(std::max(n, v.size()), 'v');
    v.resize(n);
    return v;
  };
  const auto key_of = [](int64_t i) { return absl::StrCat("bench/", i % 64); };
  std::vector<Row> rows;
  int64_t last_set = -1;
  ASSIGN_OR_RETURN(
      Row set,
      Measure("set", n, options, [&](int64_t i) -> absl::StatusOr<bool> {
        RETURN_IF_ERROR(client->Set(key_of(i), value_of(i)));
        last_set = i;
        return true;
      }));
  rows.push_back(set);
  // Get reads keys the set loop wrote in its last 64 iterations (each slot's
  // final value) and compares with that exact value.
  ASSIGN_OR_RETURN(
      Row get,
      Measure("get", n, options, [&](int64_t i) -> absl::StatusOr<bool> {
        const int64_t j = last_set - i % std::min<int64_t>(64, last_set + 1);
        ASSIGN_OR_RETURN(std::string v,
                         client->Get(key_of(j), absl::Seconds(30)));
        return v == value_of(j);
      }));
  rows.push_back(get);
  ASSIGN_OR_RETURN(
      Row add,
      Measure("add", 8, options, [&](int64_t i) -> absl::StatusOr<bool> {
        ASSIGN_OR_RETURN(int64_t v, client->Add("bench/counter", 1));
        return v == i + 1;
      }));
  rows.push_back(add);
  const std::vector<std::string> present = {"bench/0", "bench/1"};
  ASSIGN_OR_RETURN(Row check, Measure("check", 0, options,
                                      [&](int64_t) -> absl::StatusOr<bool> {
                                        return client->Check(present);
                                      }));
  rows.push_back(check);
  ASSIGN_OR_RETURN(
      Row wait,
      Measure("wait", 0, options, [&](int64_t) -> absl::StatusOr<bool> {
        RETURN_IF_ERROR(client->Wait(present, absl::Seconds(30)));
        return true;
      }));
  rows.push_back(wait);

  // Reference: a raw TCP echo of a frame the size of a set request.
  const size_t frame = 8 + 1 + 4 + key_of(0).size() + 4 + n;
  ASSIGN_OR_RETURN(std::unique_ptr<EchoServer> echo, EchoServer::Start(frame));
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(echo->port()));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd < 0 ||
      connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    if (fd >= 0) close(fd);
    return absl::InternalError(
        absl::StrCat("echo client: ", std::strerror(errno)));
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  timeval tv = {10, 0};  // Never hang on the reference either.
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  std::string sent(frame, 'e'), got(frame, '\0');
  absl::StatusOr<Row> echo_row = Measure(
      "tcp_echo (ref)", frame, options, [&](int64_t i) -> absl::StatusOr<bool> {
        sent[0] = static_cast<char>(i);
        if (send(fd, sent.data(), sent.size(), MSG_NOSIGNAL) !=
                static_cast<ssize_t>(sent.size()) ||
            recv(fd, &got[0], got.size(), MSG_WAITALL) !=
                static_cast<ssize_t>(got.size())) {
          return absl::InternalError(
              absl::StrCat("echo: ", std::strerror(errno)));
        }
        return got == sent;
      });
  close(fd);
  RETURN_IF_ERROR(echo_row.status());
  rows.push_back(*echo_row);

  out << absl::StrFormat(
      "# TcpStore round trip over loopback (server thread "
      "in this process, separate client), %d timed ops "
      "after %d warm-up\n",
      options.num_ops, options.warmup_ops);
  out << absl::StrFormat("%-16s %8s %8s %10s %10s %7s\n", "op", "count",
                         "bytes", "median_us", "p99_us", "#wrong");
  int64_t wrong = 0;
  for (const Row& r : rows) {
    out << absl::StrFormat("%-16s %8d %8d %10.1f %10.1f %7d\n", r.op, r.count,
                           r.bytes, r.median_us, r.p99_us, r.wrong);
    wrong += r.wrong;
  }
  out.flush();
  if (wrong > 0) {
    return absl::InternalError(
        absl::StrCat("RunTcpStoreLatency: ", wrong, " wrong results"));
  }
  return absl::OkStatus();
}

}  // namespace tp
