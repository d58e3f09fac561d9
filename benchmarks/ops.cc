// CPU ops benchmark: tp::ops::MatMul beside raw cblas_sgemm on the same
// shapes in the same run, so the table shows what the Tensor layer costs on
// top of OpenBLAS (checks, output allocation, dispatch).
//
//   bazel run //benchmarks:ops
//   bazel run //benchmarks:ops -- --shapes=1024x1024x1024,4096x4096x4096:nt
//       --repeats=9 --warmup=2   (one command line)
//
// For each shape (M x K x N; ":nt" multiplies by B^T stored [N, K], the
// [out, in] weight layout) three calls rotate, each repeat timing one call
// of each, after untimed warm-up calls: raw cblas_sgemm into a preallocated
// buffer (the reference), ops::MatMul (which also allocates its output, as
// every op does) and ops::MatMulInto (preallocated output, like the raw
// call). The table prints the medians and each op's overhead over the raw
// call. Results are checked: both ops must equal the raw sgemm output, and
// sampled entries must match a float64 dot product within a rounding bound;
// #wrong counts failures and the program exits non-zero if any.
//
// main() runs one section per table; sections are independent functions
// that print their own header and return a Status.
#include <cblas.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "benchmarks/store_latency.h"
#include "runtime/ops.h"
#include "runtime/status_macros.h"
#include "runtime/tensor.h"

ABSL_FLAG(std::string, shapes,
          "512x512x512,1024x1024x1024,1024x1024x1024:nt,2048x4096x1024,"
          "512x4096x16384",
          "Comma-separated MxKxN GEMM shapes; suffix ':nt' for B transposed "
          "(stored [N, K]).");
ABSL_FLAG(int, repeats, 7,
          "Timed repeats per shape (minimum; small shapes repeat until about "
          "--min_seconds of timing per side).");
ABSL_FLAG(double, min_seconds, 0.5,
          "Minimum timed seconds per side and shape for small shapes.");
ABSL_FLAG(int, warmup, 2, "Untimed calls of each side before timing.");
ABSL_FLAG(int64_t, store_ops, 10000,
          "TcpStore round trips timed per operation (0 skips the table).");

namespace tp {
namespace {

using Clock = std::chrono::steady_clock;

struct GemmShape {
  int64_t m = 0, k = 0, n = 0;
  bool trans_b = false;
};

absl::StatusOr<std::vector<GemmShape>> ParseShapes(absl::string_view spec) {
  std::vector<GemmShape> shapes;
  for (absl::string_view item : absl::StrSplit(spec, ',', absl::SkipEmpty())) {
    GemmShape s;
    std::vector<absl::string_view> mode = absl::StrSplit(item, ':');
    if (mode.size() == 2 && mode[1] == "nt") {
      s.trans_b = true;
    } else if (mode.size() != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("--shapes: bad suffix in '", item, "' (only ':nt')"));
    }
    std::vector<absl::string_view> dims = absl::StrSplit(mode[0], 'x');
    if (dims.size() != 3 || !absl::SimpleAtoi(dims[0], &s.m) ||
        !absl::SimpleAtoi(dims[1], &s.k) || !absl::SimpleAtoi(dims[2], &s.n) ||
        s.m < 1 || s.k < 1 || s.n < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("--shapes: '", item, "' is not MxKxN with positive sizes"));
    }
    shapes.push_back(s);
  }
  if (shapes.empty()) return absl::InvalidArgumentError("--shapes is empty");
  return shapes;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

Tensor RandomMatrix(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  Tensor t = Tensor::Empty({rows, cols}, DType::kFloat32);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = dist(gen);
  return t;
}

// Counts wrong entries of `ours` (from ops::MatMul): any difference from the
// raw sgemm result, plus sampled entries off a float64 dot product by more
// than a rounding bound (K * 2^-23 * sum |a b|, generous for float32 sums).
int64_t CountWrong(const GemmShape& s, const Tensor& a, const Tensor& b,
                   const Tensor& ours, const std::vector<float>& raw) {
  int64_t wrong = 0;
  const float* o = ours.data<float>();
  for (int64_t i = 0; i < s.m * s.n; ++i) wrong += o[i] != raw[i];
  const float* pa = a.data<float>();
  const float* pb = b.data<float>();
  std::mt19937 gen(1);
  for (int sample = 0; sample < 64; ++sample) {
    const int64_t i = std::uniform_int_distribution<int64_t>(0, s.m - 1)(gen);
    const int64_t j = std::uniform_int_distribution<int64_t>(0, s.n - 1)(gen);
    double dot = 0, mag = 0;
    for (int64_t p = 0; p < s.k; ++p) {
      const double av = pa[i * s.k + p];
      const double bv = s.trans_b ? pb[j * s.k + p] : pb[p * s.n + j];
      dot += av * bv;
      mag += std::fabs(av * bv);
    }
    const double bound = static_cast<double>(s.k) * std::ldexp(1.0, -23) * mag;
    wrong += std::fabs(o[i * s.n + j] - dot) > bound;
  }
  return wrong;
}

// Section 1: GEMM throughput of ops::MatMul vs raw cblas_sgemm.
absl::Status RunMatMulSection(std::ostream& out) {
  ASSIGN_OR_RETURN(const std::vector<GemmShape> shapes,
                   ParseShapes(absl::GetFlag(FLAGS_shapes)));
  const int repeats = std::max(1, absl::GetFlag(FLAGS_repeats));
  const int warmup = std::max(0, absl::GetFlag(FLAGS_warmup));
  const double min_seconds = absl::GetFlag(FLAGS_min_seconds);
  out << "# MatMul float32: tp::ops::MatMul vs raw cblas_sgemm (reference), "
         "and MatMulInto,\n# same shapes, same run, the three calls rotating; "
         "overhead = (op - raw) / raw\n"
      << "# median of >= " << repeats << " timed calls per side after "
      << warmup << " warm-up calls; GF/s = 2*M*N*K / time\n";
  out << absl::StrFormat(
      "%7s %7s %7s %3s %5s %10s %9s %10s %9s %9s %10s %9s %7s\n", "M", "K", "N",
      "op", "reps", "raw_ms", "raw_GF/s", "MatMul_ms", "GF/s", "overhead",
      "Into_ms", "overhead", "#wrong");
  int64_t total_wrong = 0;
  for (const GemmShape& s : shapes) {
    Tensor a = RandomMatrix(s.m, s.k, 1);
    Tensor b = s.trans_b ? RandomMatrix(s.n, s.k, 2) : RandomMatrix(s.k, s.n, 2);
    std::vector<float> raw_c(static_cast<size_t>(s.m * s.n));
    const auto raw = [&] {
      cblas_sgemm(CblasRowMajor, CblasNoTrans,
                  s.trans_b ? CblasTrans : CblasNoTrans, static_cast<int>(s.m),
                  static_cast<int>(s.n), static_cast<int>(s.k), 1.0f,
                  a.data<float>(), static_cast<int>(s.k), b.data<float>(),
                  static_cast<int>(s.trans_b ? s.k : s.n), 0.0f, raw_c.data(),
                  static_cast<int>(s.n));
    };
    Tensor ours;
    Tensor into = Tensor::Empty({s.m, s.n}, DType::kFloat32);
    // Side 0: raw sgemm; 1: ops::MatMul (allocates its output); 2:
    // ops::MatMulInto (writes a preallocated tensor, like the raw call).
    const auto call = [&](int side) -> absl::Status {
      if (side == 0) {
        raw();
      } else if (side == 1) {
        ASSIGN_OR_RETURN(ours, ops::MatMul(a, b, false, s.trans_b));
      } else {
        RETURN_IF_ERROR(ops::MatMulInto(a, b, into, false, s.trans_b));
      }
      return absl::OkStatus();
    };
    for (int i = 0; i < warmup; ++i) {
      for (int side = 0; side < 3; ++side) RETURN_IF_ERROR(call(side));
    }
    std::vector<double> t[3];
    double spent = 0;
    while (static_cast<int>(t[0].size()) < repeats ||
           (spent < min_seconds && t[0].size() < 200)) {
      // Rotate which side goes first so drift favours none.
      const int first = static_cast<int>(t[0].size() % 3);
      for (int i = 0; i < 3; ++i) {
        const int side = (first + i) % 3;
        const Clock::time_point t0 = Clock::now();
        RETURN_IF_ERROR(call(side));
        const double dt = Seconds(t0, Clock::now());
        t[side].push_back(dt);
        if (side == 0) spent += dt;
      }
    }
    const int64_t wrong = CountWrong(s, a, b, ours, raw_c) +
                          CountWrong(s, a, b, into, raw_c);
    total_wrong += wrong;
    const double flops = 2.0 * s.m * s.n * s.k;
    const double mr = Median(t[0]), mo = Median(t[1]), mi = Median(t[2]);
    out << absl::StrFormat(
        "%7d %7d %7d %3s %5d %10.3f %9.1f %10.3f %9.1f %8.2f%% %10.3f %8.2f%% "
        "%7d\n",
        s.m, s.k, s.n, s.trans_b ? "NT" : "NN", t[0].size(), mr * 1e3,
        flops / mr * 1e-9, mo * 1e3, flops / mo * 1e-9, (mo - mr) / mr * 100.0,
        mi * 1e3, (mi - mr) / mr * 100.0, wrong);
    out.flush();
  }
  if (total_wrong > 0) {
    return absl::InternalError(
        absl::StrCat("MatMul: ", total_wrong, " wrong elements"));
  }
  return absl::OkStatus();
}

// TcpStore set/get/add/check/wait round trips on loopback beside a raw TCP
// echo of the same size (benchmarks/store_latency.h).
absl::Status RunStoreSection(std::ostream& out) {
  TcpStoreLatencyOptions options;
  options.num_ops = absl::GetFlag(FLAGS_store_ops);
  if (options.num_ops == 0) return absl::OkStatus();
  return RunTcpStoreLatency(options, out);
}

void PrintMachine(std::ostream& out) {
  out << "# machine: " << sysconf(_SC_NPROCESSORS_ONLN) << " CPUs online; "
      << "OpenBLAS " << openblas_get_config() << ", "
      << openblas_get_num_threads() << " threads\n";
}

}  // namespace
}  // namespace tp

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  tp::PrintMachine(std::cout);
  // One section per table; each prints its own header and reports failure
  // (a bad flag, an op error or a wrong result) through its Status.
  int rc = 0;
  for (const auto& section : {tp::RunMatMulSection, tp::RunStoreSection}) {
    const absl::Status status = section(std::cout);
    if (!status.ok()) {
      std::cerr << status << "\n";
      rc = 1;
    }
    std::cout << "\n";
  }
  return rc;
}
