// PrefixStore: a view of another Store whose keys all start with
// "<prefix>/", so that groups (or repeated rendezvous) sharing one store do
// not see each other's keys.
//
// Every call forwards to the base store with the prefixed key(s) and returns
// its result unchanged (error messages name the full, prefixed keys). The
// default timeout starts as the base store's. Thread safety is the base
// store's (all stores in this project are thread-safe).
//
// Example:
//   tp::PrefixStore group_store("group3", *world_store);  // borrows
//   RETURN_IF_ERROR(group_store.Set("ready", "1"));  // key "group3/ready"
#ifndef TENSOR_PARALLEL_RUNTIME_PREFIX_STORE_H_
#define TENSOR_PARALLEL_RUNTIME_PREFIX_STORE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "runtime/store.h"

namespace tp {

class PrefixStore : public Store {
 public:
  // Borrows `base`, which must outlive this store.
  PrefixStore(std::string prefix, Store& base);
  // Shares ownership of `base` (must not be null).
  PrefixStore(std::string prefix, std::shared_ptr<Store> base);
  ~PrefixStore() override = default;

  using Store::Get;
  using Store::Wait;

  absl::Status Set(absl::string_view key, absl::string_view value) override;
  absl::StatusOr<std::string> Get(absl::string_view key,
                                  absl::Duration timeout) override;
  absl::StatusOr<int64_t> Add(absl::string_view key, int64_t delta) override;
  absl::Status Wait(absl::Span<const std::string> keys,
                    absl::Duration timeout) override;
  absl::StatusOr<bool> Check(absl::Span<const std::string> keys) override;
  absl::StatusOr<bool> Delete(absl::string_view key) override;

  const std::string& prefix() const { return prefix_; }
  Store& base() const { return *base_; }

  // The key the base store sees: "<prefix>/<key>".
  std::string FullKey(absl::string_view key) const;

 private:
  std::vector<std::string> FullKeys(absl::Span<const std::string> keys) const;

  const std::string prefix_;
  std::shared_ptr<Store> owned_;  // Null when borrowing.
  Store* const base_;
};

}  // namespace tp

#endif  // TENSOR_PARALLEL_RUNTIME_PREFIX_STORE_H_
