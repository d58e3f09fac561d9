// Informal measurement: the time GlooCommunicator::AllReduce adds over raw
// gloo::allreduce (same ring algorithm, same float32 buffers) at world size 2,
// from 4 B to 64 MB, with the consistency check on (default) and off.
//
// Two processes (fork) on this host, rendezvous through a FileStore in a
// fresh temporary directory. The three variants are interleaved round by
// round (a raw Gloo barrier before each timed block); each cell is the median
// over rounds of the mean time per call. Results are checked.
//
//   bazel run -c opt //tests/backends/gloo:allreduce_overhead -- [rounds
//   [max_bytes]]
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "backends/gloo/gloo_communicator.h"
#include "glog/logging.h"
#include "gloo/allreduce.h"
#include "gloo/barrier.h"
#include "gloo/math.h"
#include "gloo/rendezvous/context.h"
#include "gloo/rendezvous/file_store.h"
#include "gloo/transport/tcp/device.h"
#include "runtime/file_store.h"

namespace tp {
namespace {

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int RunRank(int rank, const std::string& dir, int rounds, size_t max_bytes) {
  constexpr int kWorld = 2;
  auto make = [&](const std::string& sub, bool check) {
    auto store = FileStore::Create(dir + "/" + sub);
    CHECK(store.ok()) << store.status();
    BackendContext ctx;
    ctx.rank = rank;
    ctx.size = kWorld;
    ctx.store = std::shared_ptr<Store>(std::move(store).value());
    ctx.timeout = absl::Seconds(60);
    GlooOptions options;
    options.check_consistency =
        check ? ConsistencyCheck::kAlways : ConsistencyCheck::kOff;
    auto comm = GlooCommunicator::Create(ctx, options);
    CHECK(comm.ok()) << comm.status();
    return std::move(comm).value();
  };
  std::unique_ptr<GlooCommunicator> checked = make("checked", true);
  std::unique_ptr<GlooCommunicator> unchecked = make("unchecked", false);

  gloo::rendezvous::FileStore raw_store(dir + "/raw");
  gloo::transport::tcp::attr attr("127.0.0.1");
  auto device = gloo::transport::tcp::CreateDevice(attr);
  auto raw = std::make_shared<gloo::rendezvous::Context>(rank, kWorld);
  raw->setTimeout(std::chrono::seconds(60));
  raw->connectFullMesh(raw_store, device);
  auto raw_barrier = [&] {
    gloo::BarrierOptions opts(raw);
    opts.setTag(7);
    gloo::barrier(opts);
  };

  if (rank == 0) {
    std::printf(
        "world 2, float32 sum, %d rounds; us per call: median (min) over "
        "rounds of the round's mean\n",
        rounds);
    std::printf("%10s %18s %18s %18s %9s %9s %8s\n", "bytes", "raw gloo",
                "checked", "unchecked", "chk-raw", "unchk-raw", "chk/raw");
  }
  int wrong = 0;
  for (size_t bytes = 4; bytes <= max_bytes; bytes *= 4) {
    const int64_t n = static_cast<int64_t>(bytes / 4);
    // Short blocks (tens of ms), many rounds: the load of other processes
    // on this host changes on a scale of seconds and hits every variant.
    const int iters =
        static_cast<int>(std::clamp<size_t>((size_t{4} << 20) / bytes, 1, 100));
    Tensor t = Tensor::Full({n}, 1, DType::kFloat32);
    std::vector<std::vector<double>> us(3);
    for (int round = 0; round < rounds + 1; ++round) {  // round 0: warm-up
      for (int variant = 0; variant < 3; ++variant) {
        raw_barrier();
        float* p = t.data<float>();
        std::fill(p, p + n, 1.0f);
        const auto start = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; ++i) {
          if (variant == 0) {
            gloo::AllreduceOptions opts(raw);
            opts.setOutput<float>(p, static_cast<size_t>(n));
            opts.setReduceFunction(
                static_cast<void (*)(void*, const void*, const void*, size_t)>(
                    &gloo::sum<float>));
            gloo::allreduce(opts);
          } else {
            absl::Status s = (variant == 1 ? checked : unchecked)->AllReduce(t);
            CHECK(s.ok()) << s;
          }
        }
        const double elapsed = std::chrono::duration<double, std::micro>(
                                   std::chrono::steady_clock::now() - start)
                                   .count();
        // 1 * 2^iters, exact in float32 up to 2^127: check the first value.
        const double expected = std::ldexp(1.0, std::min(iters, 120));
        if (iters <= 120 && (p[0] != expected || p[n - 1] != expected)) ++wrong;
        if (round > 0) us[variant].push_back(elapsed / iters);
      }
    }
    if (rank == 0) {
      const double r = Median(us[0]), c = Median(us[1]), u = Median(us[2]);
      auto min = [](const std::vector<double>& v) {
        return *std::min_element(v.begin(), v.end());
      };
      std::printf(
          "%10zu %9.1f (%6.1f) %9.1f (%6.1f) %9.1f (%6.1f) %9.1f %9.1f %8.3f\n",
          bytes, r, min(us[0]), c, min(us[1]), u, min(us[2]), c - r, u - r,
          c / r);
      std::fflush(stdout);
    }
  }
  raw_barrier();
  if (wrong > 0)
    std::fprintf(stderr, "rank %d: %d wrong results\n", rank, wrong);
  return wrong == 0 ? 0 : 1;
}

}  // namespace
}  // namespace tp

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 5;
  const size_t max_bytes =
      argc > 2 ? static_cast<size_t>(std::atoll(argv[2])) : (size_t{64} << 20);
  char pattern[] = "/tmp/tp_allreduce_overhead_XXXXXX";
  const char* dir = mkdtemp(pattern);
  CHECK(dir != nullptr);
  CHECK_EQ(mkdir(absl::StrCat(dir, "/raw").c_str(), 0700), 0);
  const pid_t child = fork();
  CHECK_GE(child, 0);
  if (child == 0) _exit(tp::RunRank(1, dir, rounds, max_bytes));
  const int rc0 = tp::RunRank(0, dir, rounds, max_bytes);
  int status = 0;
  waitpid(child, &status, 0);
  const int rc1 = WIFEXITED(status) ? WEXITSTATUS(status) : 1;
  if (std::system(absl::StrCat("rm -rf ", dir).c_str()) != 0) {
    std::fprintf(stderr, "could not remove %s\n", dir);
  }
  return rc0 != 0 || rc1 != 0 ? 1 : 0;
}
