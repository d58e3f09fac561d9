#include "runtime/prefix_store.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "glog/logging.h"

namespace tp {

PrefixStore::PrefixStore(std::string prefix, Store& base)
    : prefix_(std::move(prefix)), base_(&base) {
  set_default_timeout(base_->default_timeout());
}

PrefixStore::PrefixStore(std::string prefix, std::shared_ptr<Store> base)
    : prefix_(std::move(prefix)), owned_(std::move(base)), base_(owned_.get()) {
  CHECK(base_ != nullptr) << "PrefixStore: null base store";
  set_default_timeout(base_->default_timeout());
}

std::string PrefixStore::FullKey(absl::string_view key) const {
  return absl::StrCat(prefix_, "/", key);
}

std::vector<std::string> PrefixStore::FullKeys(
    absl::Span<const std::string> keys) const {
  std::vector<std::string> out;
  out.reserve(keys.size());
  for (const std::string& key : keys) out.push_back(FullKey(key));
  return out;
}

absl::Status PrefixStore::Set(absl::string_view key, absl::string_view value) {
  return base_->Set(FullKey(key), value);
}

absl::StatusOr<std::string> PrefixStore::Get(absl::string_view key,
                                             absl::Duration timeout) {
  return base_->Get(FullKey(key), timeout);
}

absl::StatusOr<int64_t> PrefixStore::Add(absl::string_view key, int64_t delta) {
  return base_->Add(FullKey(key), delta);
}

absl::Status PrefixStore::Wait(absl::Span<const std::string> keys,
                               absl::Duration timeout) {
  return base_->Wait(FullKeys(keys), timeout);
}

absl::StatusOr<bool> PrefixStore::Check(absl::Span<const std::string> keys) {
  return base_->Check(FullKeys(keys));
}

absl::StatusOr<bool> PrefixStore::Delete(absl::string_view key) {
  return base_->Delete(FullKey(key));
}

}  // namespace tp
