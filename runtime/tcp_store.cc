#include "runtime/tcp_store.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <list>
#include <mutex>
#include <system_error>
#include <thread>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "glog/logging.h"
#include "runtime/hash_store.h"
#include "runtime/status_macros.h"

namespace tp {
namespace {

constexpr uint32_t kMagic = 0x31535054;  // "TPS1" read as little-endian.
// A frame that has started arriving must complete within this time, and a
// response must be accepted by the client within it; otherwise the server
// drops the connection (a stalled or malicious peer must not hold a thread).
constexpr absl::Duration kServerIoTimeout = absl::Seconds(30);
// Longest wait the server honours in one Get/Wait request.
constexpr absl::Duration kMaxServerWait = absl::Hours(24 * 30);
// Why a connection closes when the server shuts down (not an error).
constexpr char kStopping[] = "server stopping";
// Idle client connections kept for reuse.
constexpr size_t kMaxIdleConnections = 4;

enum class Op : uint8_t {
  kSet = 1,
  kGet = 2,
  kAdd = 3,
  kWait = 4,
  kCheck = 5,
  kDelete = 6,
};

// ---- Encoding -------------------------------------------------------------

void PutU32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>(v >> (8 * i)));
}
void PutI64(std::string& out, int64_t v) {
  const auto u = static_cast<uint64_t>(v);
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>(u >> (8 * i)));
}
void PutStr(std::string& out, absl::string_view s) {
  PutU32(out, static_cast<uint32_t>(s.size()));
  out.append(s.data(), s.size());
}
uint32_t LoadU32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) {
    v |= static_cast<uint32_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  }
  return v;
}

// Bounds-checked reader over a received payload; every Get* returns false
// (and poisons the reader) instead of reading past the end.
class Reader {
 public:
  explicit Reader(absl::string_view data) : data_(data) {}
  bool U8(uint8_t* v) {
    if (data_.size() < 1) return false;
    *v = static_cast<uint8_t>(data_[0]);
    data_.remove_prefix(1);
    return true;
  }
  bool U32(uint32_t* v) {
    if (data_.size() < 4) return false;
    *v = LoadU32(data_.data());
    data_.remove_prefix(4);
    return true;
  }
  bool I64(int64_t* v) {
    if (data_.size() < 8) return false;
    uint64_t u = 0;
    for (int i = 0; i < 8; ++i) {
      u |= static_cast<uint64_t>(static_cast<unsigned char>(data_[i]))
           << (8 * i);
    }
    *v = static_cast<int64_t>(u);
    data_.remove_prefix(8);
    return true;
  }
  bool Str(size_t max_len, absl::string_view* s) {
    uint32_t n = 0;
    if (!U32(&n) || n > max_len || data_.size() < n) return false;
    *s = data_.substr(0, n);
    data_.remove_prefix(n);
    return true;
  }
  bool AtEnd() const { return data_.empty(); }

 private:
  absl::string_view data_;
};

int64_t ToMicros(absl::Duration d) {
  return absl::ToInt64Microseconds(
      std::min(std::max(d, absl::ZeroDuration()), kMaxServerWait));
}

// ---- Socket I/O with deadlines ---------------------------------------------
// Sockets are non-blocking; every transfer waits in poll() for at most the
// time left before `deadline` (absl::InfiniteFuture() waits indefinitely, used
// only by the server for the first byte of a request, where idling is
// normal and shutdown() wakes it).

int PollMillis(absl::Time deadline) {
  if (deadline == absl::InfiniteFuture()) return -1;
  const absl::Duration left = deadline - absl::Now();
  if (left <= absl::ZeroDuration()) return 0;
  // Round up so that we never wake just before the deadline and spin.
  return static_cast<int>(
      std::min<int64_t>(absl::ToInt64Milliseconds(left) + 1, 1 << 30));
}

// Waits until `fd` is ready for `events`. kDeadlineExceeded on timeout.
absl::Status WaitFd(int fd, short events, absl::Time deadline) {
  while (true) {
    struct pollfd p = {fd, events, 0};
    const int rc = poll(&p, 1, PollMillis(deadline));
    if (rc > 0) return absl::OkStatus();  // Ready, or an error to read out.
    if (rc < 0 && errno != EINTR) {
      return absl::UnavailableError(
          absl::StrCat("poll failed: ", std::strerror(errno)));
    }
    if (rc == 0 && absl::Now() >= deadline) {
      return absl::DeadlineExceededError("no data before the deadline");
    }
  }
}

absl::Status SendAll(int fd, absl::string_view data, absl::Time deadline) {
  while (!data.empty()) {
    const ssize_t n =
        send(fd, data.data(), data.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      data.remove_prefix(static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      RETURN_IF_ERROR(WaitFd(fd, POLLOUT, deadline));
      continue;
    }
    return absl::UnavailableError(
        absl::StrCat("send failed: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

// Appends exactly `n` bytes to `out`, growing it as data arrives (so a lying
// length prefix costs no memory up front). kUnavailable on EOF or error.
absl::Status RecvAppend(int fd, size_t n, absl::Time deadline,
                        std::string* out) {
  constexpr size_t kChunk = 1 << 20;
  while (n > 0) {
    const size_t want = std::min(n, kChunk);
    const size_t old_size = out->size();
    out->resize(old_size + want);
    const ssize_t got = recv(fd, &(*out)[old_size], want, MSG_DONTWAIT);
    out->resize(old_size + (got > 0 ? static_cast<size_t>(got) : 0));
    if (got > 0) {
      n -= static_cast<size_t>(got);
      continue;
    }
    if (got == 0) return absl::UnavailableError("connection closed by peer");
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      RETURN_IF_ERROR(WaitFd(fd, POLLIN, deadline));
      continue;
    }
    return absl::UnavailableError(
        absl::StrCat("recv failed: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

void SetNoDelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

bool SetNonBlocking(int fd) {
  const int flags = fcntl(fd, F_GETFL, 0);
  return flags >= 0 && fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0;
}

std::string PeerName(int fd) {
  sockaddr_storage addr;
  socklen_t len = sizeof(addr);
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    return "?";
  }
  char host[NI_MAXHOST] = {}, serv[NI_MAXSERV] = {};
  if (getnameinfo(reinterpret_cast<sockaddr*>(&addr), len, host, sizeof(host),
                  serv, sizeof(serv), NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
    return "?";
  }
  return absl::StrCat(host, ":", serv);
}

// Encodes an error answer (the request was valid; the store said no).
// Returns true: the connection stays open.
bool ErrorToWire(const absl::Status& status, std::string* response) {
  response->push_back(static_cast<char>(status.code()));
  PutStr(*response, status.message().substr(0, 1 << 16));
  return true;
}

}  // namespace

// ---- Server ----------------------------------------------------------------
//
// One thread accepts; each connection gets its own thread running a plain
// blocking request/response loop. We chose threads over a poll() event loop
// because requests block on the data (Get/Wait): with a thread per connection
// a wait is one condition-variable wait and needs no waiter lists, timers or
// partial-I/O state machines, so there is less code to get wrong. The number
// of connections is about the number of ranks (plus a few per rank for
// concurrent calls), small enough for one thread each; kMaxServerConnections
// bounds it.
class TcpStore::Server {
 public:
  static absl::StatusOr<std::unique_ptr<Server>> Start(
      const std::string& bind_host, int port);
  ~Server();

  int port() const { return port_; }

 private:
  struct Connection {
    int fd = -1;
    std::thread thread;
    std::atomic<bool> done{false};
  };

  Server() = default;
  void AcceptLoop();
  void Serve(Connection* conn);
  // Decodes and executes one request. Returns false when the request is
  // malformed or the server is stopping; the caller then closes the
  // connection. `*reason` says why.
  bool Handle(absl::string_view payload, std::string* response,
              std::string* reason);
  void ReapFinished() ABSL_EXCLUSIVE_LOCKS_REQUIRED(conns_mu_);

  int listen_fd_ = -1;
  int wake_pipe_[2] = {-1, -1};
  int port_ = 0;
  std::thread accept_thread_;

  // std::mutex rather than absl::Mutex: see runtime/hash_store.h (TSan).
  std::mutex conns_mu_;
  std::list<Connection> conns_ ABSL_GUARDED_BY(conns_mu_);

  std::mutex data_mu_;
  std::condition_variable data_changed_;  // A key was added, or stopping_.
  absl::flat_hash_map<std::string, std::string> data_ ABSL_GUARDED_BY(data_mu_);
  bool stopping_ ABSL_GUARDED_BY(data_mu_) = false;
};

absl::StatusOr<std::unique_ptr<TcpStore::Server>> TcpStore::Server::Start(
    const std::string& bind_host, int port) {
  std::unique_ptr<Server> server(new Server());
  addrinfo hints = {};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* addrs = nullptr;
  const std::string port_str = absl::StrCat(port);
  const int gai = getaddrinfo(bind_host.empty() ? nullptr : bind_host.c_str(),
                              port_str.c_str(), &hints, &addrs);
  if (gai != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("TcpStore: cannot resolve bind address '", bind_host,
                     "': ", gai_strerror(gai)));
  }
  std::string last_error = "no address";
  // Prefer IPv6 (dual-stack, also accepts IPv4) and fall back to IPv4.
  std::vector<addrinfo*> order;
  for (addrinfo* a = addrs; a != nullptr; a = a->ai_next) {
    if (a->ai_family == AF_INET6) order.push_back(a);
  }
  for (addrinfo* a = addrs; a != nullptr; a = a->ai_next) {
    if (a->ai_family != AF_INET6) order.push_back(a);
  }
  for (addrinfo* a : order) {
    const int fd =
        socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      last_error = std::strerror(errno);
      continue;
    }
    int one = 1, zero = 0;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (a->ai_family == AF_INET6) {
      setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
    }
    if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 ||
        listen(fd, SOMAXCONN) != 0) {
      last_error = std::strerror(errno);
      close(fd);
      continue;
    }
    server->listen_fd_ = fd;
    break;
  }
  freeaddrinfo(addrs);
  if (server->listen_fd_ < 0) {
    return absl::UnavailableError(absl::StrCat("TcpStore: cannot listen on '",
                                               bind_host, ":", port,
                                               "': ", last_error));
  }
  sockaddr_storage addr;
  socklen_t len = sizeof(addr);
  if (getsockname(server->listen_fd_, reinterpret_cast<sockaddr*>(&addr),
                  &len) != 0) {
    return absl::InternalError(
        absl::StrCat("TcpStore: getsockname: ", std::strerror(errno)));
  }
  server->port_ = ntohs(addr.ss_family == AF_INET6
                            ? reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port
                            : reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  if (pipe2(server->wake_pipe_, O_CLOEXEC) != 0) {
    return absl::InternalError(
        absl::StrCat("TcpStore: pipe: ", std::strerror(errno)));
  }
  Server* raw = server.get();
  server->accept_thread_ = std::thread([raw] { raw->AcceptLoop(); });
  return server;
}

TcpStore::Server::~Server() {
  {
    std::lock_guard<std::mutex> lock(data_mu_);
    stopping_ = true;  // Ends every Get/Wait; their connections then close.
  }
  data_changed_.notify_all();
  if (accept_thread_.joinable()) {
    char byte = 0;
    while (write(wake_pipe_[1], &byte, 1) < 0 && errno == EINTR) {
    }
    accept_thread_.join();
  }
  // Start() may have failed half-way: close only what was opened.
  for (int fd : {listen_fd_, wake_pipe_[0], wake_pipe_[1]}) {
    if (fd >= 0) close(fd);
  }
  // No new connections can appear now. shutdown() wakes each connection
  // thread blocked in poll()/recv(); join before close so that no thread
  // ever uses a closed (possibly reused) descriptor.
  std::lock_guard<std::mutex> lock(conns_mu_);
  for (Connection& conn : conns_) shutdown(conn.fd, SHUT_RDWR);
  for (Connection& conn : conns_) {
    conn.thread.join();
    close(conn.fd);
  }
  conns_.clear();
}

void TcpStore::Server::ReapFinished() {
  for (auto it = conns_.begin(); it != conns_.end();) {
    if (it->done.load(std::memory_order_acquire)) {
      it->thread.join();
      close(it->fd);
      it = conns_.erase(it);
    } else {
      ++it;
    }
  }
}

void TcpStore::Server::AcceptLoop() {
  while (true) {
    struct pollfd fds[2] = {{listen_fd_, POLLIN, 0},
                            {wake_pipe_[0], POLLIN, 0}};
    const int rc = poll(fds, 2, -1);
    if (rc < 0) {
      if (errno == EINTR) continue;
      LOG(ERROR) << "TcpStore server: poll failed: " << std::strerror(errno);
      absl::SleepFor(absl::Milliseconds(10));
      continue;
    }
    if (fds[1].revents != 0) return;  // Stopping.
    if ((fds[0].revents & POLLIN) == 0) continue;
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED) {
        // E.g. EMFILE: back off instead of spinning on the ready socket.
        LOG(ERROR) << "TcpStore server: accept failed: "
                   << std::strerror(errno);
        absl::SleepFor(absl::Milliseconds(10));
      }
      continue;
    }
    std::lock_guard<std::mutex> lock(conns_mu_);
    ReapFinished();
    if (conns_.size() >= static_cast<size_t>(kMaxServerConnections)) {
      LOG(ERROR) << "TcpStore server: refusing connection from " << PeerName(fd)
                 << ": " << kMaxServerConnections
                 << " connections already open";
      close(fd);
      continue;
    }
    if (!SetNonBlocking(fd)) {
      LOG(ERROR) << "TcpStore server: fcntl failed: " << std::strerror(errno);
      close(fd);
      continue;
    }
    SetNoDelay(fd);
    conns_.emplace_back();
    Connection* conn = &conns_.back();
    conn->fd = fd;
    try {
      conn->thread = std::thread([this, conn] { Serve(conn); });
    } catch (const std::system_error& e) {  // Out of threads: refuse, survive.
      LOG(ERROR) << "TcpStore server: refusing connection from " << PeerName(fd)
                 << ": cannot start a thread: " << e.what();
      close(fd);
      conns_.pop_back();
    }
  }
}

void TcpStore::Server::Serve(Connection* conn) {
  const int fd = conn->fd;
  std::string header, payload, response;
  while (true) {
    header.clear();
    // Idle between requests is normal: wait without a deadline for the first
    // byte, then the rest of the frame must follow within kServerIoTimeout.
    absl::Status s = RecvAppend(fd, 1, absl::InfiniteFuture(), &header);
    if (!s.ok()) break;  // Client closed the connection (or we stopped).
    s = RecvAppend(fd, 7, absl::Now() + kServerIoTimeout, &header);
    std::string reason;
    if (s.ok()) {
      const uint32_t magic = LoadU32(header.data());
      const uint32_t length = LoadU32(header.data() + 4);
      if (magic != kMagic) {
        reason = absl::StrCat("bad magic 0x", absl::Hex(magic));
      } else if (length > kMaxFrameBytes) {
        reason = absl::StrCat("frame of ", length, " bytes exceeds the limit ",
                              kMaxFrameBytes);
      } else {
        payload.clear();
        s = RecvAppend(fd, length, absl::Now() + kServerIoTimeout, &payload);
        if (s.ok()) {
          response.assign(4, '\0');  // Length, filled in below.
          if (Handle(payload, &response, &reason)) {
            const uint32_t n = static_cast<uint32_t>(response.size() - 4);
            for (int i = 0; i < 4; ++i)
              response[i] = static_cast<char>(n >> (8 * i));
            s = SendAll(fd, response, absl::Now() + kServerIoTimeout);
            if (s.ok()) continue;
          }
        }
      }
    }
    if (reason.empty() && !s.ok()) reason = std::string(s.message());
    if (reason == kStopping) {
      VLOG(1) << "TcpStore server: closing connection from " << PeerName(fd)
              << ": " << reason;
    } else if (!reason.empty()) {
      LOG(ERROR) << "TcpStore server: closing connection from " << PeerName(fd)
                 << ": " << reason;
    }
    break;
  }
  shutdown(fd, SHUT_RDWR);
  conn->done.store(true, std::memory_order_release);
}

bool TcpStore::Server::Handle(absl::string_view payload, std::string* response,
                              std::string* reason) {
  Reader in(payload);
  uint8_t op_byte = 0;
  if (!in.U8(&op_byte)) {
    *reason = "empty request";
    return false;
  }
  const auto malformed = [&](absl::string_view what) {
    *reason = absl::StrCat("malformed request (op ", op_byte, "): ", what);
    return false;
  };
  absl::string_view key, value;
  int64_t arg = 0;
  std::vector<absl::string_view> keys;
  switch (static_cast<Op>(op_byte)) {
    case Op::kSet:
      if (!in.Str(kMaxKeyBytes, &key) || !in.Str(kMaxValueBytes, &value) ||
          !in.AtEnd()) {
        return malformed("want key, value");
      }
      break;
    case Op::kGet:
    case Op::kAdd:
      if (!in.Str(kMaxKeyBytes, &key) || !in.I64(&arg) || !in.AtEnd()) {
        return malformed("want key, int64");
      }
      break;
    case Op::kDelete:
      if (!in.Str(kMaxKeyBytes, &key) || !in.AtEnd()) {
        return malformed("want key");
      }
      break;
    case Op::kWait:
    case Op::kCheck: {
      uint32_t n = 0;
      if (!in.U32(&n) || n > kMaxKeysPerRequest) {
        return malformed("bad key count");
      }
      keys.resize(n);
      for (uint32_t i = 0; i < n; ++i) {
        if (!in.Str(kMaxKeyBytes, &keys[i])) return malformed("bad key");
      }
      if (static_cast<Op>(op_byte) == Op::kWait && !in.I64(&arg)) {
        return malformed("want timeout");
      }
      if (!in.AtEnd()) return malformed("trailing bytes");
      break;
    }
    default:
      *reason = absl::StrCat("unknown op ", op_byte);
      return false;
  }

  const absl::Duration wait = absl::Microseconds(
      std::min(std::max<int64_t>(arg, 0), ToMicros(kMaxServerWait)));
  const auto deadline = StoreDeadlineFromNow(wait);
  std::string value_copy;
  if (static_cast<Op>(op_byte) == Op::kSet)
    value_copy.assign(value.data(), value.size());
  std::unique_lock<std::mutex> lock(data_mu_);
  if (stopping_) {
    *reason = kStopping;
    return false;
  }
  const auto all_present = [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    if (stopping_) return true;
    for (absl::string_view k : keys) {
      if (!data_.contains(k)) return false;
    }
    return true;
  };
  switch (static_cast<Op>(op_byte)) {
    case Op::kSet:
      data_[key] = std::move(value_copy);
      lock.unlock();
      data_changed_.notify_all();
      response->push_back(0);
      return true;
    case Op::kGet: {
      keys.assign(1, key);
      if (!data_changed_.wait_until(lock, deadline, all_present)) {
        return ErrorToWire(absl::DeadlineExceededError(absl::StrCat(
                               "TcpStore::Get: key '", key, "' not set within ",
                               absl::FormatDuration(wait))),
                           response);
      }
      if (stopping_) {
        *reason = kStopping;
        return false;
      }
      response->push_back(0);
      PutStr(*response, data_.find(key)->second);
      return true;
    }
    case Op::kAdd: {
      auto it = data_.find(key);
      absl::StatusOr<int64_t> result =
          StoreAddToValue(key, it == data_.end() ? nullptr : &it->second, arg);
      if (!result.ok()) return ErrorToWire(result.status(), response);
      data_[key] = absl::StrCat(*result);
      lock.unlock();
      data_changed_.notify_all();
      response->push_back(0);
      PutI64(*response, *result);
      return true;
    }
    case Op::kWait: {
      if (!data_changed_.wait_until(lock, deadline, all_present)) {
        std::vector<absl::string_view> missing;
        for (absl::string_view k : keys) {
          if (!data_.contains(k)) missing.push_back(k);
        }
        return ErrorToWire(absl::DeadlineExceededError(absl::StrCat(
                               "TcpStore::Wait: keys not set within ",
                               absl::FormatDuration(wait), ": ",
                               absl::StrJoin(missing, ", "))),
                           response);
      }
      if (stopping_) {
        *reason = kStopping;
        return false;
      }
      response->push_back(0);
      return true;
    }
    case Op::kCheck:
      response->push_back(0);
      response->push_back(all_present() ? 1 : 0);
      return true;
    case Op::kDelete:
      response->push_back(0);
      response->push_back(data_.erase(key) > 0 ? 1 : 0);
      return true;
  }
  return false;  // Unreachable: unknown ops were rejected above.
}

// ---- Client ----------------------------------------------------------------

struct TcpStore::Response {
  std::string payload;  // After the status byte.
};

absl::StatusOr<std::unique_ptr<TcpStore>> TcpStore::Create(
    const TcpStoreOptions& options) {
  if (options.port < 0 || options.port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("TcpStore: port ", options.port, " is not in [0, 65535]"));
  }
  if (!options.is_server && options.port == 0) {
    return absl::InvalidArgumentError(
        "TcpStore: a client needs the server's port (port 0 is only for the "
        "server)");
  }
  if (options.host.empty()) {
    return absl::InvalidArgumentError("TcpStore: empty host");
  }
  std::unique_ptr<TcpStore> store(new TcpStore(options));
  if (options.is_server) {
    ASSIGN_OR_RETURN(store->server_,
                     Server::Start(options.bind_host, options.port));
    store->port_ = store->server_->port();
  }
  ASSIGN_OR_RETURN(int fd, store->Connect(options.connect_timeout));
  store->ReleaseConnection(fd);
  return store;
}

TcpStore::TcpStore(const TcpStoreOptions& options)
    : options_(options), port_(options.port) {
  set_default_timeout(options.timeout);
}

TcpStore::~TcpStore() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int fd : idle_fds_) close(fd);
    idle_fds_.clear();
  }
  server_.reset();
}

absl::StatusOr<int> TcpStore::Connect(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  const std::string port_str = absl::StrCat(port_);
  absl::Duration backoff = absl::Milliseconds(10);
  std::string last_error;
  while (true) {
    addrinfo hints = {};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* addrs = nullptr;
    const int gai =
        getaddrinfo(options_.host.c_str(), port_str.c_str(), &hints, &addrs);
    if (gai != 0) {
      last_error = absl::StrCat("cannot resolve: ", gai_strerror(gai));
    }
    for (addrinfo* a = gai == 0 ? addrs : nullptr; a != nullptr;
         a = a->ai_next) {
      const int fd =
          socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
                 a->ai_protocol);
      if (fd < 0) {
        last_error = std::strerror(errno);
        continue;
      }
      int rc = connect(fd, a->ai_addr, a->ai_addrlen);
      if (rc != 0 && errno == EINPROGRESS) {
        const absl::Time attempt_deadline =
            std::min(deadline, absl::Now() + absl::Seconds(5));
        absl::Status ready = WaitFd(fd, POLLOUT, attempt_deadline);
        int err = 0;
        socklen_t len = sizeof(err);
        if (!ready.ok()) {
          err = ETIMEDOUT;
        } else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) {
          err = errno;
        }
        rc = err == 0 ? 0 : -1;
        errno = err;
      }
      if (rc == 0) {
        SetNoDelay(fd);
        freeaddrinfo(addrs);
        return fd;
      }
      last_error = std::strerror(errno);
      close(fd);
    }
    if (gai == 0) freeaddrinfo(addrs);
    const absl::Time now = absl::Now();
    if (now >= deadline) break;
    absl::SleepFor(std::min(backoff, deadline - now));
    backoff = std::min(backoff * 2, absl::Seconds(1));
  }
  return absl::UnavailableError(absl::StrCat(
      "TcpStore: cannot connect to ", options_.host, ":", port_, " within ",
      absl::FormatDuration(timeout), ": ", last_error));
}

absl::StatusOr<int> TcpStore::AcquireConnection() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!idle_fds_.empty()) {
      const int fd = idle_fds_.back();
      idle_fds_.pop_back();
      return fd;
    }
  }
  return Connect(options_.reconnect_timeout);
}

void TcpStore::ReleaseConnection(int fd) {
  std::lock_guard<std::mutex> lock(mu_);
  if (idle_fds_.size() < kMaxIdleConnections) {
    idle_fds_.push_back(fd);
  } else {
    close(fd);
  }
}

absl::StatusOr<TcpStore::Response> TcpStore::Call(const std::string& request,
                                                  absl::Duration wait) {
  ASSIGN_OR_RETURN(const int fd, AcquireConnection());
  const absl::Time start = absl::Now();
  const absl::Time deadline =
      start + (wait > absl::ZeroDuration() ? wait + options_.response_grace
                                           : options_.timeout);
  std::string header;
  absl::Status s = SendAll(fd, request, start + options_.timeout);
  if (s.ok()) s = RecvAppend(fd, 4, deadline, &header);
  Response response;
  uint8_t code = 0;
  if (s.ok()) {
    const uint32_t length = LoadU32(header.data());
    if (length == 0 || length > kMaxFrameBytes) {
      s = absl::InternalError(
          absl::StrCat("bad response length ", length, " (not a TcpStore?)"));
    } else {
      s = RecvAppend(fd, length, deadline, &response.payload);
      if (s.ok()) {
        code = static_cast<uint8_t>(response.payload[0]);
        response.payload.erase(0, 1);
      }
    }
  }
  if (!s.ok()) {
    close(fd);
    const std::string where =
        absl::StrCat("TcpStore ", options_.host, ":", port_, ": ");
    if (absl::IsDeadlineExceeded(s)) {
      return absl::DeadlineExceededError(
          absl::StrCat(where, "no answer from the server within ",
                       absl::FormatDuration(deadline - start)));
    }
    if (absl::IsUnavailable(s)) {
      return absl::UnavailableError(
          absl::StrCat(where, "lost the server: ", s.message()));
    }
    return absl::Status(s.code(), absl::StrCat(where, s.message()));
  }
  ReleaseConnection(fd);
  if (code != 0) {
    Reader in(response.payload);
    absl::string_view message;
    if (code > static_cast<uint8_t>(absl::StatusCode::kUnauthenticated) ||
        !in.Str(1 << 16, &message)) {
      return absl::InternalError("TcpStore: malformed error response");
    }
    return absl::Status(static_cast<absl::StatusCode>(code), message);
  }
  return response;
}

namespace {

absl::Status CheckKey(absl::string_view key) {
  if (key.size() > TcpStore::kMaxKeyBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TcpStore: key of ", key.size(), " bytes exceeds the limit of ",
        TcpStore::kMaxKeyBytes, " (key '", key.substr(0, 64), "...')"));
  }
  return absl::OkStatus();
}

absl::Status CheckKeys(absl::Span<const std::string> keys) {
  if (keys.size() > TcpStore::kMaxKeysPerRequest) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TcpStore: ", keys.size(), " keys in one request exceed the limit of ",
        TcpStore::kMaxKeysPerRequest));
  }
  size_t total = 0;
  for (const std::string& key : keys) {
    RETURN_IF_ERROR(CheckKey(key));
    total += 4 + key.size();
  }
  if (total + 64 > TcpStore::kMaxFrameBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TcpStore: ", total, " bytes of keys exceed the frame limit of ",
        TcpStore::kMaxFrameBytes));
  }
  return absl::OkStatus();
}

// Starts a request frame (magic, length placeholder, op).
std::string BeginRequest(Op op) {
  std::string out;
  PutU32(out, kMagic);
  PutU32(out, 0);
  out.push_back(static_cast<char>(op));
  return out;
}

std::string& FinishRequest(std::string& out) {
  const uint32_t n = static_cast<uint32_t>(out.size() - 8);
  for (int i = 0; i < 4; ++i) out[4 + i] = static_cast<char>(n >> (8 * i));
  return out;
}

absl::Status Malformed() {
  return absl::InternalError("TcpStore: malformed response from the server");
}

}  // namespace

absl::Status TcpStore::Set(absl::string_view key, absl::string_view value) {
  RETURN_IF_ERROR(CheckKey(key));
  if (value.size() > kMaxValueBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TcpStore::Set: value of ", value.size(), " bytes for key '", key,
        "' exceeds the limit of ", kMaxValueBytes));
  }
  std::string request = BeginRequest(Op::kSet);
  PutStr(request, key);
  PutStr(request, value);
  ASSIGN_OR_RETURN(Response r,
                   Call(FinishRequest(request), absl::ZeroDuration()));
  if (!r.payload.empty()) return Malformed();
  return absl::OkStatus();
}

absl::StatusOr<std::string> TcpStore::Get(absl::string_view key,
                                          absl::Duration timeout) {
  RETURN_IF_ERROR(CheckKey(key));
  timeout = std::max(timeout, absl::ZeroDuration());
  std::string request = BeginRequest(Op::kGet);
  PutStr(request, key);
  PutI64(request, ToMicros(timeout));
  ASSIGN_OR_RETURN(Response r, Call(FinishRequest(request), timeout));
  Reader in(r.payload);
  absl::string_view value;
  if (!in.Str(kMaxValueBytes, &value) || !in.AtEnd()) return Malformed();
  return std::string(value);
}

absl::StatusOr<int64_t> TcpStore::Add(absl::string_view key, int64_t delta) {
  RETURN_IF_ERROR(CheckKey(key));
  std::string request = BeginRequest(Op::kAdd);
  PutStr(request, key);
  PutI64(request, delta);
  ASSIGN_OR_RETURN(Response r,
                   Call(FinishRequest(request), absl::ZeroDuration()));
  Reader in(r.payload);
  int64_t value = 0;
  if (!in.I64(&value) || !in.AtEnd()) return Malformed();
  return value;
}

absl::Status TcpStore::Wait(absl::Span<const std::string> keys,
                            absl::Duration timeout) {
  RETURN_IF_ERROR(CheckKeys(keys));
  timeout = std::max(timeout, absl::ZeroDuration());
  std::string request = BeginRequest(Op::kWait);
  PutU32(request, static_cast<uint32_t>(keys.size()));
  for (const std::string& key : keys) PutStr(request, key);
  PutI64(request, ToMicros(timeout));
  ASSIGN_OR_RETURN(Response r, Call(FinishRequest(request), timeout));
  if (!r.payload.empty()) return Malformed();
  return absl::OkStatus();
}

absl::StatusOr<bool> TcpStore::Check(absl::Span<const std::string> keys) {
  RETURN_IF_ERROR(CheckKeys(keys));
  std::string request = BeginRequest(Op::kCheck);
  PutU32(request, static_cast<uint32_t>(keys.size()));
  for (const std::string& key : keys) PutStr(request, key);
  ASSIGN_OR_RETURN(Response r,
                   Call(FinishRequest(request), absl::ZeroDuration()));
  if (r.payload.size() != 1) return Malformed();
  return r.payload[0] != 0;
}

absl::StatusOr<bool> TcpStore::Delete(absl::string_view key) {
  RETURN_IF_ERROR(CheckKey(key));
  std::string request = BeginRequest(Op::kDelete);
  PutStr(request, key);
  ASSIGN_OR_RETURN(Response r,
                   Call(FinishRequest(request), absl::ZeroDuration()));
  if (r.payload.size() != 1) return Malformed();
  return r.payload[0] != 0;
}

}  // namespace tp
