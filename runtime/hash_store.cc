#include "runtime/hash_store.h"

#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace tp {

absl::StatusOr<int64_t> StoreAddToValue(absl::string_view key,
                                        const std::string* current,
                                        int64_t delta) {
  int64_t old_value = 0;
  if (current != nullptr && !absl::SimpleAtoi(*current, &old_value)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Store::Add: value of key '", key,
                     "' is not an integer: '", current->substr(0, 64), "'"));
  }
  int64_t result = 0;
  if (__builtin_add_overflow(old_value, delta, &result)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Store::Add: ", old_value, " + ", delta,
                     " overflows int64 for key '", key, "'"));
  }
  return result;
}

std::chrono::steady_clock::time_point StoreDeadlineFromNow(
    absl::Duration timeout) {
  const absl::Duration capped = std::min(
      std::max(timeout, absl::ZeroDuration()), absl::Hours(24 * 365 * 10));
  return std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(capped);
}

absl::Status HashStore::Set(absl::string_view key, absl::string_view value) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    data_[key] = std::string(value);
  }
  changed_.notify_all();
  return absl::OkStatus();
}

absl::StatusOr<std::string> HashStore::Get(absl::string_view key,
                                           absl::Duration timeout) {
  const auto deadline = StoreDeadlineFromNow(timeout);
  std::unique_lock<std::mutex> lock(mu_);
  if (!changed_.wait_until(lock, deadline,
                           [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
                             return data_.contains(key);
                           })) {
    return absl::DeadlineExceededError(
        absl::StrCat("HashStore::Get: key '", key, "' not set within ",
                     absl::FormatDuration(timeout)));
  }
  return data_.find(key)->second;
}

absl::StatusOr<int64_t> HashStore::Add(absl::string_view key, int64_t delta) {
  absl::StatusOr<int64_t> result;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = data_.find(key);
    result =
        StoreAddToValue(key, it == data_.end() ? nullptr : &it->second, delta);
    if (!result.ok()) return result.status();
    data_[key] = absl::StrCat(*result);
  }
  changed_.notify_all();
  return result;
}

bool HashStore::HasAll(absl::Span<const std::string> keys) const {
  for (const std::string& key : keys) {
    if (!data_.contains(key)) return false;
  }
  return true;
}

absl::Status HashStore::Wait(absl::Span<const std::string> keys,
                             absl::Duration timeout) {
  const auto deadline = StoreDeadlineFromNow(timeout);
  std::unique_lock<std::mutex> lock(mu_);
  if (changed_.wait_until(lock, deadline, [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
        return HasAll(keys);
      })) {
    return absl::OkStatus();
  }
  std::vector<absl::string_view> missing;
  for (const std::string& key : keys) {
    if (!data_.contains(key)) missing.push_back(key);
  }
  return absl::DeadlineExceededError(absl::StrCat(
      "HashStore::Wait: keys not set within ", absl::FormatDuration(timeout),
      ": ", absl::StrJoin(missing, ", ")));
}

absl::StatusOr<bool> HashStore::Check(absl::Span<const std::string> keys) {
  std::lock_guard<std::mutex> lock(mu_);
  return HasAll(keys);
}

absl::StatusOr<bool> HashStore::Delete(absl::string_view key) {
  std::lock_guard<std::mutex> lock(mu_);
  return data_.erase(key) > 0;
}

int64_t HashStore::NumKeys() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(data_.size());
}

}  // namespace tp
