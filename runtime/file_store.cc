#include "runtime/file_store.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <random>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/hash_store.h"
#include "runtime/status_macros.h"

namespace tp {
namespace {

absl::Status ErrnoError(absl::string_view what, const std::string& path,
                        int err) {
  return absl::InternalError(
      absl::StrCat("FileStore: ", what, " '", path, "': ", std::strerror(err)));
}

// A name part that differs between processes and hosts, for temporaries.
const std::string& ProcessTag() {
  static const std::string* tag = [] {
    char host[256] = {};
    if (gethostname(host, sizeof(host) - 1) != 0) host[0] = '\0';
    std::random_device rd;
    uint64_t nonce = (static_cast<uint64_t>(rd()) << 32) ^ rd();
    return new std::string(
        absl::StrCat(FileStore::EncodeKey(host), ".", getpid(), ".", nonce));
  }();
  return *tag;
}

// Exclusive flock() on the store's lock file, released by the destructor
// (and by the kernel if the process dies).
class FileLock {
 public:
  static absl::StatusOr<FileLock> Acquire(const std::string& path,
                                          absl::Duration timeout) {
    int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return ErrnoError("cannot open lock file", path, errno);
    const absl::Time deadline = absl::Now() + timeout;
    absl::Duration backoff = absl::Microseconds(100);
    while (flock(fd, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      if (err != EWOULDBLOCK && err != EINTR) {
        close(fd);
        return ErrnoError("cannot flock", path, err);
      }
      const absl::Time now = absl::Now();
      if (now >= deadline) {
        close(fd);
        return absl::DeadlineExceededError(
            absl::StrCat("FileStore: lock '", path, "' not acquired within ",
                         absl::FormatDuration(timeout)));
      }
      absl::SleepFor(std::min(backoff, deadline - now));
      backoff = std::min(backoff * 2, absl::Milliseconds(5));
    }
    return FileLock(fd);
  }
  FileLock(FileLock&& other) : fd_(std::exchange(other.fd_, -1)) {}
  FileLock& operator=(FileLock&&) = delete;
  ~FileLock() {
    if (fd_ >= 0) close(fd_);  // Closing the descriptor drops the flock.
  }

 private:
  explicit FileLock(int fd) : fd_(fd) {}
  int fd_;
};

bool IsUnreserved(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
         (c >= '0' && c <= '9') || c == '_' || c == '-';
}

}  // namespace

std::string FileStore::EncodeKey(absl::string_view key) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out = "k";
  out.reserve(1 + key.size());
  for (char c : key) {
    if (IsUnreserved(c)) {
      out.push_back(c);
    } else {
      const auto b = static_cast<unsigned char>(c);
      out.push_back('%');
      out.push_back(kHex[b >> 4]);
      out.push_back(kHex[b & 0xF]);
    }
  }
  return out;
}

absl::StatusOr<std::unique_ptr<FileStore>> FileStore::Create(
    absl::string_view path) {
  FileStoreOptions options;
  options.path = std::string(path);
  return Create(options);
}

absl::StatusOr<std::unique_ptr<FileStore>> FileStore::Create(
    const FileStoreOptions& options) {
  if (options.path.empty()) {
    return absl::InvalidArgumentError("FileStore::Create: empty path");
  }
  std::error_code ec;
  std::filesystem::create_directories(options.path, ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("FileStore::Create: cannot create '", options.path,
                     "': ", ec.message()));
  }
  struct stat st;
  if (stat(options.path.c_str(), &st) != 0) {
    return ErrnoError("cannot stat", options.path, errno);
  }
  if (!S_ISDIR(st.st_mode)) {
    return absl::InternalError(absl::StrCat(
        "FileStore::Create: '", options.path, "' is not a directory"));
  }
  if (access(options.path.c_str(), W_OK | X_OK) != 0) {
    return ErrnoError("directory not writable", options.path, errno);
  }
  return std::unique_ptr<FileStore>(new FileStore(options));
}

FileStore::FileStore(FileStoreOptions options)
    : options_(std::move(options)), lock_path_(options_.path + "/lock") {
  set_default_timeout(options_.timeout);
}

absl::StatusOr<std::string> FileStore::KeyPath(absl::string_view key) const {
  std::string name = EncodeKey(key);
  if (name.size() > kMaxEncodedKeyLength) {
    return absl::InvalidArgumentError(absl::StrCat(
        "FileStore: key of ", key.size(), " bytes encodes to a ", name.size(),
        "-byte file name; the limit is ", kMaxEncodedKeyLength, " (key '",
        key.substr(0, 64), "...')"));
  }
  return absl::StrCat(options_.path, "/", name);
}

absl::Status FileStore::WriteAtomically(const std::string& path,
                                        absl::string_view value) {
  static std::atomic<uint64_t> counter{0};
  const std::string tmp = absl::StrCat(options_.path, "/t.", ProcessTag(), ".",
                                       counter.fetch_add(1));
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError("cannot create", tmp, errno);
  size_t done = 0;
  while (done < value.size()) {
    ssize_t n = write(fd, value.data() + done, value.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      close(fd);
      unlink(tmp.c_str());
      return ErrnoError("cannot write", tmp, err);
    }
    done += static_cast<size_t>(n);
  }
  if (fsync(fd) != 0) {
    const int err = errno;
    close(fd);
    unlink(tmp.c_str());
    return ErrnoError("cannot fsync", tmp, err);
  }
  if (close(fd) != 0) {
    const int err = errno;
    unlink(tmp.c_str());
    return ErrnoError("cannot close", tmp, err);
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    unlink(tmp.c_str());
    return ErrnoError("cannot rename to", path, err);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> FileStore::ReadFile(const std::string& path) const {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return absl::NotFoundError(path);
    return ErrnoError("cannot open", path, errno);
  }
  std::string out;
  char buf[1 << 16];
  while (true) {
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      close(fd);
      return ErrnoError("cannot read", path, err);
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return out;
}

absl::Status FileStore::Set(absl::string_view key, absl::string_view value) {
  ASSIGN_OR_RETURN(std::string path, KeyPath(key));
  ASSIGN_OR_RETURN(FileLock lock,
                   FileLock::Acquire(lock_path_, default_timeout()));
  return WriteAtomically(path, value);
}

absl::StatusOr<std::string> FileStore::Get(absl::string_view key,
                                           absl::Duration timeout) {
  ASSIGN_OR_RETURN(std::string path, KeyPath(key));
  const absl::Time deadline =
      absl::Now() + std::max(timeout, absl::ZeroDuration());
  absl::Duration backoff = absl::Milliseconds(1);
  while (true) {
    absl::StatusOr<std::string> value = ReadFile(path);
    if (value.ok() || !absl::IsNotFound(value.status())) return value;
    const absl::Time now = absl::Now();
    if (now >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "FileStore::Get: key '", key, "' not set within ",
          absl::FormatDuration(timeout), " in '", options_.path, "'"));
    }
    absl::SleepFor(std::min(backoff, deadline - now));
    backoff = std::min(backoff * 2, options_.max_poll_interval);
  }
}

absl::StatusOr<int64_t> FileStore::Add(absl::string_view key, int64_t delta) {
  ASSIGN_OR_RETURN(std::string path, KeyPath(key));
  ASSIGN_OR_RETURN(FileLock lock,
                   FileLock::Acquire(lock_path_, default_timeout()));
  absl::StatusOr<std::string> current = ReadFile(path);
  if (!current.ok() && !absl::IsNotFound(current.status())) {
    return current.status();
  }
  ASSIGN_OR_RETURN(
      int64_t result,
      StoreAddToValue(key, current.ok() ? &*current : nullptr, delta));
  RETURN_IF_ERROR(WriteAtomically(path, absl::StrCat(result)));
  return result;
}

absl::Status FileStore::Wait(absl::Span<const std::string> keys,
                             absl::Duration timeout) {
  std::vector<std::string> paths;
  paths.reserve(keys.size());
  for (const std::string& key : keys) {
    ASSIGN_OR_RETURN(std::string path, KeyPath(key));
    paths.push_back(std::move(path));
  }
  const absl::Time deadline =
      absl::Now() + std::max(timeout, absl::ZeroDuration());
  absl::Duration backoff = absl::Milliseconds(1);
  while (true) {
    std::vector<absl::string_view> missing;
    for (size_t i = 0; i < paths.size(); ++i) {
      struct stat st;
      if (stat(paths[i].c_str(), &st) != 0) {
        if (errno != ENOENT) return ErrnoError("cannot stat", paths[i], errno);
        missing.push_back(keys[i]);
      }
    }
    if (missing.empty()) return absl::OkStatus();
    const absl::Time now = absl::Now();
    if (now >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("FileStore::Wait: keys not set within ",
                       absl::FormatDuration(timeout), " in '", options_.path,
                       "': ", absl::StrJoin(missing, ", ")));
    }
    absl::SleepFor(std::min(backoff, deadline - now));
    backoff = std::min(backoff * 2, options_.max_poll_interval);
  }
}

absl::StatusOr<bool> FileStore::Check(absl::Span<const std::string> keys) {
  for (const std::string& key : keys) {
    ASSIGN_OR_RETURN(std::string path, KeyPath(key));
    struct stat st;
    if (stat(path.c_str(), &st) != 0) {
      if (errno == ENOENT) return false;
      return ErrnoError("cannot stat", path, errno);
    }
  }
  return true;
}

absl::StatusOr<bool> FileStore::Delete(absl::string_view key) {
  ASSIGN_OR_RETURN(std::string path, KeyPath(key));
  ASSIGN_OR_RETURN(FileLock lock,
                   FileLock::Acquire(lock_path_, default_timeout()));
  if (unlink(path.c_str()) == 0) return true;
  if (errno == ENOENT) return false;
  return ErrnoError("cannot unlink", path, errno);
}

}  // namespace tp
