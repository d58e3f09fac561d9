// Open MPI reference for benchmarks/collectives: MPI_Allreduce (sum) and
// MPI_Allgather of float32 on the same sizes, timed and checked the same way
// (refill untimed, MPI_Barrier, one timed call; the slowest rank's time per
// iteration; median over --iters after --warmup untimed iterations).
//
//   bazel build //benchmarks:mpi_allreduce
//   mpirun --allow-run-as-root --oversubscribe -np 2
//       bazel-bin/benchmarks/mpi_allreduce [--maxbytes=... --iters=...]
//   (one command line)
//
// On one host Open MPI moves the data through shared memory (the vader/sm
// BTL), the gap that Gloo's TCP loopback leaves to close. Results are checked
// exactly against closed forms (rank r puts ((7i + 3r + 5k) mod 32) - 16 at
// element i in iteration k); the program exits 1 on any wrong element.
#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"

ABSL_FLAG(int64_t, minbytes, 4, "Smallest message size in bytes.");
ABSL_FLAG(int64_t, maxbytes, int64_t{64} << 20, "Largest message size in bytes.");
ABSL_FLAG(int, stepfactor, 4, "Size multiplier between rows (2 or more).");
ABSL_FLAG(int, iters, 20, "Timed iterations per size (median reported).");
ABSL_FLAG(int, warmup, 3, "Untimed iterations per size before timing.");

namespace {

inline int Pattern(int rank, int64_t i, int iteration) {
  return static_cast<int>((i * 7 + rank * 3 + iteration * 5) & 31) - 16;
}

void Fill(float* p, int64_t count, int rank, int iteration) {
  for (int64_t i = 0; i < count; ++i) {
    p[i] = static_cast<float>(Pattern(rank, i, iteration));
  }
}

// Median over iterations of the slowest rank's time, in microseconds.
double MedianOfSlowest(std::vector<double> seconds) {
  MPI_Allreduce(MPI_IN_PLACE, seconds.data(), static_cast<int>(seconds.size()),
                MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  std::sort(seconds.begin(), seconds.end());
  const size_t n = seconds.size();
  const double median = n % 2 == 1 ? seconds[n / 2]
                                   : 0.5 * (seconds[n / 2 - 1] + seconds[n / 2]);
  return median * 1e6;
}

int64_t SumOverRanks(int64_t v) {
  MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  absl::ParseCommandLine(argc, argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const int64_t minbytes = absl::GetFlag(FLAGS_minbytes);
  const int64_t maxbytes = absl::GetFlag(FLAGS_maxbytes);
  const int factor = absl::GetFlag(FLAGS_stepfactor);
  const int iters = absl::GetFlag(FLAGS_iters);
  const int warmup = absl::GetFlag(FLAGS_warmup);
  if (minbytes < 1 || maxbytes < minbytes || factor < 2 || iters < 1 ||
      warmup < 0) {
    if (rank == 0) {
      std::fprintf(stderr,
                   "mpi_allreduce: need 1 <= --minbytes <= --maxbytes, "
                   "--stepfactor >= 2, --iters >= 1, --warmup >= 0\n");
    }
    MPI_Finalize();
    return 2;
  }
  if (rank == 0) {
    std::printf(
        "# Open MPI reference: %d ranks, float32, %lld B .. %lld B (x%d), "
        "%d warm-up + %d timed iterations, median of the slowest rank\n",
        size, static_cast<long long>(minbytes),
        static_cast<long long>(maxbytes), factor, warmup, iters);
  }
  int64_t total_wrong = 0;
  for (int op = 0; op < 2; ++op) {
    const double busfactor =
        op == 0 ? 2.0 * (size - 1) / size : static_cast<double>(size - 1) / size;
    if (rank == 0) {
      std::printf(
          "#\n# %s\n#\n# %10s %12s %8s %10s %8s %8s %6s\n"
          "# %10s %12s %8s %10s %8s %8s %6s\n",
          op == 0 ? "MPI_Allreduce (sum)" : "MPI_Allgather", "size", "count",
          "type", "time", "algbw", "busbw", "#wrong", "(B)", "(elements)", "",
          "(us)", "(GB/s)", "(GB/s)", "");
    }
    int64_t last_count = -1;
    for (int64_t bytes = minbytes; bytes <= maxbytes; bytes *= factor) {
      // AllGather: `bytes` is the whole output, `chunk` each rank's input.
      const int64_t chunk =
          op == 0 ? bytes / 4 : bytes / (4 * static_cast<int64_t>(size));
      const int64_t count = op == 0 ? chunk : chunk * size;
      if (chunk == 0 || count == last_count) continue;
      last_count = count;
      std::vector<float> in(chunk), out(count);
      std::vector<double> seconds;
      int64_t wrong = 0;
      for (int k = 0; k < warmup + iters; ++k) {
        Fill(in.data(), chunk, rank, k);
        std::fill(out.begin(), out.end(), 99.0f);
        MPI_Barrier(MPI_COMM_WORLD);
        const double t0 = MPI_Wtime();
        if (op == 0) {
          MPI_Allreduce(in.data(), out.data(), static_cast<int>(count),
                        MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        } else {
          MPI_Allgather(in.data(), static_cast<int>(chunk), MPI_FLOAT,
                        out.data(), static_cast<int>(chunk), MPI_FLOAT,
                        MPI_COMM_WORLD);
        }
        const double t1 = MPI_Wtime();
        if (k >= warmup) seconds.push_back(t1 - t0);
        for (int64_t i = 0; i < count; ++i) {
          int expected = 0;
          if (op == 0) {
            for (int r = 0; r < size; ++r) expected += Pattern(r, i, k);
          } else {
            expected = Pattern(static_cast<int>(i / chunk), i % chunk, k);
          }
          wrong += out[i] != static_cast<float>(expected);
        }
      }
      const double us = MedianOfSlowest(seconds);
      wrong = SumOverRanks(wrong);
      total_wrong += wrong;
      const double algbw = static_cast<double>(count * 4) / us / 1e3;
      if (rank == 0) {
        std::printf("  %10lld %12lld %8s %10.1f %8.3f %8.3f %6lld\n",
                    static_cast<long long>(count * 4),
                    static_cast<long long>(count), "float32", us, algbw,
                    algbw * busfactor, static_cast<long long>(wrong));
        std::fflush(stdout);
      }
    }
  }
  if (rank == 0) {
    std::printf("#\n# Out of bounds values : %lld %s\n",
                static_cast<long long>(total_wrong),
                total_wrong == 0 ? "OK" : "FAILED");
  }
  MPI_Finalize();
  return total_wrong == 0 ? 0 : 1;
}
