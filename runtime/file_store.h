// FileStore: a Store kept in a directory on a filesystem that every rank can
// see (a local disk for ranks on one host, NFS/Lustre/GPFS across hosts).
//
// Layout: one file per key, named "k" + the key percent-encoded (bytes other
// than [A-Za-z0-9_-] become %XX), so any byte string is a valid key; a file
// "lock" serializes writers; temporaries are named "t.<host>.<pid>.<n>".
//   Set     writes a temporary file, fsyncs it and rename()s it over the key's
//           file: readers see the old or the new value, never a torn one.
//   Add     read-modify-write under flock() of the lock file (Set and Delete
//           take the same lock, so the three are linearizable).
//   Get     polls for the key's file with a short backoff (1 ms doubling up to
//   Wait    `max_poll_interval`) until it exists or the timeout passes.
//   Check   stat()s, Delete unlink()s.
// The lock is an flock(); it is released by the kernel when a process dies,
// so a crashed rank never wedges the others. Acquiring it is bounded by the
// store's default timeout (kDeadlineExceeded).
//
// Thread safety: all methods may be called concurrently, from any number of
// threads and processes, each with its own FileStore on the same directory.
// The directory is not cleaned up: use a fresh one per job (or Delete keys).
//
// Errors: kInvalidArgument for a key whose encoded file name exceeds
// kMaxEncodedKeyLength bytes or an Add on a non-integer value;
// kDeadlineExceeded for timeouts; kInternal for a filesystem error (naming
// the path and errno text).
//
// Example:
//   ASSIGN_OR_RETURN(std::unique_ptr<tp::FileStore> store,
//                    tp::FileStore::Create("/shared/job42/store"));
//   RETURN_IF_ERROR(store->Set("rank/3", "ready"));
//   RETURN_IF_ERROR(store->Wait({"rank/0", "rank/1"}, absl::Seconds(60)));
#ifndef TENSOR_PARALLEL_RUNTIME_FILE_STORE_H_
#define TENSOR_PARALLEL_RUNTIME_FILE_STORE_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "runtime/store.h"

namespace tp {

struct FileStoreOptions {
  // Directory holding the store; created (with parents) if missing.
  // Required. Every rank must name the same directory.
  std::string path;
  // Default timeout of Get/Wait without a timeout argument and bound on
  // acquiring the writer lock. Default 300 s.
  absl::Duration timeout = absl::Seconds(300);
  // Longest sleep between two polls of Get/Wait. Default 10 ms: shorter
  // answers sooner, longer costs fewer stat() calls on a network filesystem.
  absl::Duration max_poll_interval = absl::Milliseconds(10);
};

class FileStore : public Store {
 public:
  // Longest encoded key (file name) accepted, in bytes (most filesystems
  // allow 255; one byte goes to the "k" prefix).
  static constexpr size_t kMaxEncodedKeyLength = 250;

  // Opens (creating if needed) the store in `options.path`.
  // kInvalidArgument for an empty path; kInternal when the directory cannot
  // be created or is not writable.
  static absl::StatusOr<std::unique_ptr<FileStore>> Create(
      const FileStoreOptions& options);
  static absl::StatusOr<std::unique_ptr<FileStore>> Create(
      absl::string_view path);

  ~FileStore() override = default;

  using Store::Get;
  using Store::Wait;

  absl::Status Set(absl::string_view key, absl::string_view value) override;
  absl::StatusOr<std::string> Get(absl::string_view key,
                                  absl::Duration timeout) override;
  // The counter is stored as decimal text.
  absl::StatusOr<int64_t> Add(absl::string_view key, int64_t delta) override;
  absl::Status Wait(absl::Span<const std::string> keys,
                    absl::Duration timeout) override;
  absl::StatusOr<bool> Check(absl::Span<const std::string> keys) override;
  absl::StatusOr<bool> Delete(absl::string_view key) override;

  const std::string& path() const { return options_.path; }

  // The file name used for `key` (exposed for tests): "k" + percent-encoding.
  static std::string EncodeKey(absl::string_view key);

 private:
  explicit FileStore(FileStoreOptions options);

  // Full path of the key's file, or kInvalidArgument when too long.
  absl::StatusOr<std::string> KeyPath(absl::string_view key) const;
  // Writes `value` to `path` atomically (temporary + fsync + rename).
  absl::Status WriteAtomically(const std::string& path,
                               absl::string_view value);
  // Reads the whole file; kNotFound when it does not exist.
  absl::StatusOr<std::string> ReadFile(const std::string& path) const;

  const FileStoreOptions options_;
  const std::string lock_path_;
};

}  // namespace tp

#endif  // TENSOR_PARALLEL_RUNTIME_FILE_STORE_H_
