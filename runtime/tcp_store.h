// TcpStore: a Store served over TCP by one process (usually rank 0, at
// MASTER_ADDR:MASTER_PORT) to every rank, c10d-style.
//
// Written directly on POSIX sockets: Debian ships no library that offers a
// c10d-like key-value rendezvous server (Gloo's rendezvous has only
// file/hash/prefix stores plus a Redis client), and the protocol is small.
//
// Roles. TcpStore::Create with `is_server = true` starts the server in a
// thread of the calling process and then connects to it like every other
// rank; with `is_server = false` it only connects. Destroying the server's
// TcpStore stops the server: every connection is closed, so clients see
// kUnavailable (not a hang).
//
// Protocol (little-endian). Request: u32 magic 'TPS1', u32 payload length,
// payload = u8 op, then the op's fields (strings as u32 length + bytes, ints
// as i64). Response: u32 payload length, payload = u8 absl::StatusCode, then
// the op's results (OK) or a message string (error). Size limits:
// kMaxKeyBytes per key, kMaxValueBytes per value, kMaxKeysPerRequest keys
// per Wait/Check, kMaxFrameBytes per frame. A client refuses to send
// anything over a limit (kInvalidArgument); the server closes a connection
// that sends a bad magic, an oversized length, an unknown op or a malformed
// payload, logs the reason, and keeps serving every other connection.
//
// Timeouts. Every wait is bounded: the server answers a Get/Wait with
// kDeadlineExceeded when its timeout passes, and the client additionally
// polls its socket with a deadline (the call's timeout + `response_grace`,
// or `timeout` for calls that do not wait), so a silent server cannot block a
// client. Clients retry connecting with exponential backoff (10 ms doubling
// to 1 s) for up to `connect_timeout` when created, and for up to
// `reconnect_timeout` when a call needs a fresh connection later. A lost
// server gives kUnavailable. SIGPIPE is never raised (MSG_NOSIGNAL).
//
// Thread safety: all methods may be called concurrently. Each call borrows a
// connection from a small pool (opening a new one when all are busy), so a
// thread blocked in Get never delays another thread's Set.
//
// Example (every rank):
//   tp::TcpStoreOptions options;
//   options.host = master_addr;  options.port = master_port;
//   options.is_server = (rank == 0);
//   ASSIGN_OR_RETURN(std::unique_ptr<tp::TcpStore> store,
//                    tp::TcpStore::Create(options));
//   RETURN_IF_ERROR(store->Set(absl::StrCat("addr/", rank), my_address));
//   ASSIGN_OR_RETURN(int64_t arrived, store->Add("arrived", 1));
#ifndef TENSOR_PARALLEL_RUNTIME_TCP_STORE_H_
#define TENSOR_PARALLEL_RUNTIME_TCP_STORE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "runtime/store.h"

namespace tp {

struct TcpStoreOptions {
  // Address clients connect to (name or numeric IPv4/IPv6). The server
  // connects to it too. Default "127.0.0.1".
  std::string host = "127.0.0.1";
  // TCP port. 0 with is_server: the kernel picks a free port; read it back
  // with TcpStore::port() and hand it to the clients. Clients need a real
  // port. Default 0.
  int port = 0;
  // Start the server in this process (exactly one rank does).
  bool is_server = false;
  // Address the server binds; "" binds every interface (needed when ranks
  // run on other hosts; the store has no authentication, so on shared
  // networks bind a private interface). Default "".
  std::string bind_host;
  // Default timeout of Get/Wait without a timeout argument, and the deadline
  // of calls that do not wait (Set, Add, Check, Delete). Default 300 s.
  absl::Duration timeout = absl::Seconds(300);
  // How long Create retries connecting (the server may start later than its
  // clients). Default 60 s.
  absl::Duration connect_timeout = absl::Seconds(60);
  // How long a later call retries opening an extra connection before it
  // returns kUnavailable. Short, so a dead server is reported promptly.
  // Default 2 s.
  absl::Duration reconnect_timeout = absl::Seconds(2);
  // Extra time a client waits for the server's answer beyond a Get/Wait
  // timeout before it gives up on the connection. Default 2 s.
  absl::Duration response_grace = absl::Seconds(2);
};

class TcpStore : public Store {
 public:
  // Protocol limits (see the file comment).
  static constexpr size_t kMaxKeyBytes = 4 << 10;        // 4 KiB
  static constexpr size_t kMaxValueBytes = 64 << 20;     // 64 MiB
  static constexpr size_t kMaxKeysPerRequest = 1 << 16;  // 65536
  static constexpr size_t kMaxFrameBytes = kMaxValueBytes + (1 << 20);
  // Connections the server serves at once; more are refused (closed).
  static constexpr int kMaxServerConnections = 4096;

  // Starts the server (is_server) and connects. kInvalidArgument for a bad
  // port or a client without a port; kUnavailable when the server cannot
  // bind (naming the address and errno text) or when no connection is made
  // within connect_timeout.
  static absl::StatusOr<std::unique_ptr<TcpStore>> Create(
      const TcpStoreOptions& options);

  // Stops the server (when hosting) after closing this client's connections.
  ~TcpStore() override;

  using Store::Get;
  using Store::Wait;

  // Every method: kInvalidArgument when a key/value/key count exceeds the
  // limits; kUnavailable when the server is unreachable or the connection
  // breaks; kDeadlineExceeded when no answer comes in time.
  absl::Status Set(absl::string_view key, absl::string_view value) override;
  absl::StatusOr<std::string> Get(absl::string_view key,
                                  absl::Duration timeout) override;
  absl::StatusOr<int64_t> Add(absl::string_view key, int64_t delta) override;
  absl::Status Wait(absl::Span<const std::string> keys,
                    absl::Duration timeout) override;
  absl::StatusOr<bool> Check(absl::Span<const std::string> keys) override;
  absl::StatusOr<bool> Delete(absl::string_view key) override;

  // The server's port (the one picked by the kernel for port 0).
  int port() const { return port_; }
  const std::string& host() const { return options_.host; }
  bool is_server() const { return server_ != nullptr; }

  class Server;  // Defined in tcp_store.cc.

 private:
  struct Response;
  explicit TcpStore(const TcpStoreOptions& options);

  // Sends one request frame and reads its response on a pooled connection;
  // the connection is dropped on any transport error. `wait` is the time the
  // server may legitimately take before answering.
  absl::StatusOr<Response> Call(const std::string& request,
                                absl::Duration wait);
  absl::StatusOr<int> Connect(absl::Duration timeout);
  absl::StatusOr<int> AcquireConnection();
  void ReleaseConnection(int fd);

  TcpStoreOptions options_;
  int port_ = 0;
  std::unique_ptr<Server> server_;
  std::mutex mu_;  // Not absl::Mutex: see runtime/hash_store.h (TSan).
  std::vector<int> idle_fds_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tp

#endif  // TENSOR_PARALLEL_RUNTIME_TCP_STORE_H_
