#include "benchmarks/store_latency.h"

#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tp {
namespace {

using ::testing::HasSubstr;
using ::testing::MatchesRegex;

TEST(StoreLatencyTest, PrintsOneCheckedRowPerOperation) {
  std::ostringstream out;
  TcpStoreLatencyOptions options;
  options.num_ops = 100;
  options.warmup_ops = 70;  // set+warm-up > 64 keys, and < 64: both covered.
  const absl::Status status = RunTcpStoreLatency(options, out);
  ASSERT_TRUE(status.ok()) << status;
  const std::string table = out.str();
  for (const char* op : {"set", "get", "add", "check", "wait", "tcp_echo"}) {
    // op, count 100, bytes, median, p99, zero wrong.
    EXPECT_THAT(table,
                MatchesRegex(absl::StrCat(
                    "(.|\n)*\n", op,
                    "[ a-z()]* +100 +[0-9]+ +[0-9.]+ +[0-9.]+ +0\n(.|\n)*")))
        << table;
  }
  EXPECT_THAT(table, HasSubstr("median_us"));
}

TEST(StoreLatencyTest, FewOpsStillReadOnlyWrittenKeys) {
  std::ostringstream out;
  TcpStoreLatencyOptions options;
  options.num_ops = 5;
  options.warmup_ops = 0;
  EXPECT_TRUE(RunTcpStoreLatency(options, out).ok()) << out.str();
}

TEST(StoreLatencyTest, RejectsBadOptions) {
  std::ostringstream out;
  TcpStoreLatencyOptions options;
  options.num_ops = 0;
  EXPECT_EQ(RunTcpStoreLatency(options, out).code(),
            absl::StatusCode::kInvalidArgument);
  options.num_ops = 1;
  options.warmup_ops = -1;
  EXPECT_EQ(RunTcpStoreLatency(options, out).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tp
