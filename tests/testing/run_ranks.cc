#include "tests/testing/run_ranks.h"

#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "glog/logging.h"
#include "runtime/hash_store.h"

namespace tp {

std::vector<absl::Status> RunRanks(int world_size, const RankFn& fn,
                                   const RunRanksOptions& options) {
  CHECK_GE(world_size, 1) << "RunRanks: world_size must be >= 1";
  auto store = std::make_shared<HashStore>();
  std::vector<absl::Status> statuses(world_size);
  // std::mutex rather than absl::Mutex: Debian's Abseil is not built with
  // ThreadSanitizer, which then cannot see absl::Mutex's synchronization.
  std::mutex mu;
  std::condition_variable cv;
  std::vector<char> done(world_size, 0);
  int remaining = world_size;

  std::vector<std::thread> threads;
  threads.reserve(world_size);
  for (int rank = 0; rank < world_size; ++rank) {
    threads.emplace_back([&, rank] {
      absl::Status s = fn(rank, store);
      std::lock_guard<std::mutex> lock(mu);
      statuses[rank] = std::move(s);
      done[rank] = 1;
      if (--remaining == 0) cv.notify_all();
    });
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, absl::ToChronoMilliseconds(options.watchdog),
                     [&] { return remaining == 0; })) {
      std::vector<int> running;
      for (int r = 0; r < world_size; ++r) {
        if (!done[r]) running.push_back(r);
      }
      LOG(FATAL) << "RunRanks: rank(s) " << absl::StrJoin(running, ", ")
                 << " of " << world_size << " still running after "
                 << absl::FormatDuration(options.watchdog)
                 << " (a hang: a collective without a timeout?)";
    }
  }
  for (std::thread& t : threads) t.join();
  return statuses;
}

absl::Status AllRanksOk(const std::vector<absl::Status>& statuses) {
  int failed = 0;
  int first = -1;
  for (int r = 0; r < static_cast<int>(statuses.size()); ++r) {
    if (!statuses[r].ok()) {
      ++failed;
      if (first < 0) first = r;
    }
  }
  if (failed == 0) return absl::OkStatus();
  return absl::Status(
      statuses[first].code(),
      absl::StrCat("rank ", first, ": ", statuses[first].message(), " (",
                   failed, " of ", statuses.size(), " ranks failed)"));
}

}  // namespace tp
