// Key-value stores used for rendezvous between ranks (the role of c10d's
// Store and Gloo's rendezvous::Store).
//
// A Store maps string keys to byte values. Get and Wait block until the keys
// exist or the timeout passes (kDeadlineExceeded); Add is an atomic counter.
// Implementations:
//   HashStore    in-process (threads of one process), for tests and RunRanks.
//   FileStore    a directory on a filesystem shared by the ranks; safe across
//                processes (atomic rename for Set, a lock file for Add).
//   TcpStore     a server thread in the hosting rank (rank 0) at
//                MASTER_ADDR:MASTER_PORT and a client per rank.
//   PrefixStore  namespaces the keys of another store ("group3/").
//
// Thread safety: every method of every store may be called concurrently.
// Timeouts: every call that waits on another rank is bounded by its `timeout`
// argument, or by the store's default timeout when the argument is omitted.
//
// Example:
//   ASSIGN_OR_RETURN(std::unique_ptr<tp::Store> store,
//                    tp::TcpStore::Create({.host = "10.0.0.1", .port = 29500,
//                                          .is_server = rank == 0}));
//   RETURN_IF_ERROR(store->Set("addr/" + std::to_string(rank), my_addr));
//   ASSIGN_OR_RETURN(std::string peer, store->Get("addr/0", absl::Seconds(30)));
#ifndef TENSOR_PARALLEL_RUNTIME_STORE_H_
#define TENSOR_PARALLEL_RUNTIME_STORE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

namespace tp {

class Store {
 public:
  virtual ~Store() = default;
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  // Sets `key` to `value`, replacing any previous value, and wakes waiters.
  virtual absl::Status Set(absl::string_view key, absl::string_view value) = 0;

  // Returns the value of `key`, waiting until it is set. kDeadlineExceeded
  // naming the key when `timeout` passes first; kUnavailable when the store
  // cannot be reached.
  virtual absl::StatusOr<std::string> Get(absl::string_view key,
                                          absl::Duration timeout) = 0;
  absl::StatusOr<std::string> Get(absl::string_view key) {
    return Get(key, default_timeout());
  }

  // Atomically adds `delta` to the integer stored at `key` (0 when absent)
  // and returns the new value. kInvalidArgument when the existing value is not
  // an integer.
  virtual absl::StatusOr<int64_t> Add(absl::string_view key, int64_t delta) = 0;

  // Waits until every key in `keys` exists. kDeadlineExceeded listing the
  // missing keys when `timeout` passes first.
  virtual absl::Status Wait(absl::Span<const std::string> keys,
                            absl::Duration timeout) = 0;
  absl::Status Wait(absl::Span<const std::string> keys) {
    return Wait(keys, default_timeout());
  }

  // True when every key in `keys` exists now (never waits).
  virtual absl::StatusOr<bool> Check(absl::Span<const std::string> keys) = 0;

  // Removes `key`; returns whether it existed.
  virtual absl::StatusOr<bool> Delete(absl::string_view key) = 0;

  // The timeout used by the overloads without one.
  absl::Duration default_timeout() const { return default_timeout_; }
  void set_default_timeout(absl::Duration timeout) { default_timeout_ = timeout; }

 protected:
  Store() = default;

 private:
  absl::Duration default_timeout_ = absl::Seconds(300);
};

}  // namespace tp

#endif  // TENSOR_PARALLEL_RUNTIME_STORE_H_
