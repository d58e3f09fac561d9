// HashStore: an in-process Store (a mutex-protected hash map).
//
// For ranks that are threads of one process: tests, the thread-per-rank
// harness, single-process runs. Every method is thread-safe; Get and Wait
// block on a condition variable (no polling) and are bounded by their
// timeout. Nothing ever fails with kUnavailable: the store is always there.
//
// The lock is std::mutex, not absl::Mutex: Debian's Abseil is a prebuilt,
// uninstrumented shared library, so ThreadSanitizer cannot see absl::Mutex
// and reports false races; std::mutex goes through pthread, which it sees.
//
// Example:
//   tp::HashStore store;
//   std::thread peer([&] { CHECK(store.Set("ready", "1").ok()); });
//   absl::StatusOr<std::string> v = store.Get("ready", absl::Seconds(5));
//   peer.join();
#ifndef TENSOR_PARALLEL_RUNTIME_HASH_STORE_H_
#define TENSOR_PARALLEL_RUNTIME_HASH_STORE_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "runtime/store.h"

namespace tp {

class HashStore : public Store {
 public:
  HashStore() = default;
  ~HashStore() override = default;

  using Store::Get;
  using Store::Wait;

  // Always OK.
  absl::Status Set(absl::string_view key, absl::string_view value) override;
  // The value, or kDeadlineExceeded naming the key after `timeout` (a zero or
  // negative timeout checks once).
  absl::StatusOr<std::string> Get(absl::string_view key,
                                  absl::Duration timeout) override;
  // The new value; kInvalidArgument when the stored value is not a decimal
  // int64 or the sum overflows. The counter is stored as its decimal text, so
  // Get returns e.g. "3".
  absl::StatusOr<int64_t> Add(absl::string_view key, int64_t delta) override;
  // OK when all keys exist; kDeadlineExceeded listing the missing keys.
  absl::Status Wait(absl::Span<const std::string> keys,
                    absl::Duration timeout) override;
  absl::StatusOr<bool> Check(absl::Span<const std::string> keys) override;
  absl::StatusOr<bool> Delete(absl::string_view key) override;

  // Number of keys currently stored (for tests).
  int64_t NumKeys() const;

 private:
  bool HasAll(absl::Span<const std::string> keys) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable std::mutex mu_;
  std::condition_variable changed_;  // Notified when a key is added.
  absl::flat_hash_map<std::string, std::string> data_ ABSL_GUARDED_BY(mu_);
};

// Shared by the store implementations: the new counter value for Add, given
// the current value (nullptr when absent). kInvalidArgument naming the key
// when `current` is not a decimal int64 or when the sum overflows.
absl::StatusOr<int64_t> StoreAddToValue(absl::string_view key,
                                        const std::string* current,
                                        int64_t delta);

// Shared by the store implementations: the steady-clock time `timeout` from
// now, for condition-variable waits. Negative timeouts count as zero; very
// long ones (e.g. absl::InfiniteDuration()) are capped at ten years.
std::chrono::steady_clock::time_point StoreDeadlineFromNow(
    absl::Duration timeout);

}  // namespace tp

#endif  // TENSOR_PARALLEL_RUNTIME_HASH_STORE_H_
