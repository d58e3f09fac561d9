// Layers benchmark: forward and forward+backward time of ColumnParallelLinear,
// RowParallelLinear and ParallelMLP (GeLU) at TP = the job's size, beside raw
// cblas_sgemm calls of the same local shapes in the same run.
//
//   bazel run //benchmarks:layers                       # TP = 1
//   bazel run //benchmarks:layers -- --nproc=2          # TP = 2, 2 processes
//   bazel run //benchmarks:layers -- --tokens=512 --hidden=4096 --ffn=16384
//       --repeats=3 --warmup=1 --sections=linear,mlp --blas_threads=1
//
// Every rank builds the layers over the job's tensor-parallel communicator
// (gloo backend through the backend registry; ProcessGroupManager's TCP
// store rendezvous; --nproc re-launches this binary through tools/launch.h).
// For each layer and pass, repeats rotate between the layer call and the raw
// GEMMs it contains, each preceded by an untimed barrier, after untimed
// warm-up calls; the table shows each side's median and minimum, each the
// slowest rank's (on a shared machine the minimum is the less disturbed
// figure):
//
//   ColumnParallelLinear  x [T, h] -> [T, f/tp]           raw: 1 sgemm fwd,
//                                                         3 fwd+bwd (fwd, dX,
//                                                         dW += dY^T X)
//   RowParallelLinear     x [T, f/tp] -> [T, h] (+ all-reduce)    same
//   ParallelMLP (GeLU)    column -> GeLU -> row           raw: 2 fwd, 6 fwd+bwd
//
// "overhead" = layer / raw - 1: what the layer adds to its GEMMs at this TP
// (bias, activation, allocation, and at TP > 1 the collectives, which the
// raw side does not do).
//
// With --nproc > 1 and --tp1_baseline (default), rank 0 finally times the
// same MLP at TP = 1 on the threads of the whole job (nproc x blas_threads,
// the other ranks wait in a barrier), and the last line gives the speed of
// TP = N relative to it: the goal is >= 0.9 for 2 processes x 1
// thread against 1 process x 2 threads.
//
// OpenBLAS threads per rank: --blas_threads, else OPENBLAS_NUM_THREADS when
// set, else the cores divided by the ranks on this host (never
// oversubscribed by default).
//
// Results are checked: sampled outputs (and input gradients of the linear
// layers) against float64 dot products over the same data, partial sums
// all-reduced in float64 where the layer reduces; a mismatch beyond 1e-4 of
// the sum of |terms| counts in #wrong and the program exits 1.
#include <cblas.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "comm/communicator.h"
#include "comm/process_group.h"
#include "layers/linear.h"
#include "layers/mlp.h"
#include "runtime/init.h"
#include "runtime/ops.h"
#include "runtime/status_macros.h"
#include "runtime/tensor.h"
#include "tools/launch.h"

ABSL_FLAG(int, nproc, 1, "Ranks to start on this host (re-launches self).");
ABSL_FLAG(int64_t, tokens, 512, "Tokens T (rows of the activations).");
ABSL_FLAG(int64_t, hidden, 4096, "Model width h.");
ABSL_FLAG(int64_t, ffn, 16384, "MLP / linear intermediate width f.");
ABSL_FLAG(int, repeats, 5, "Timed repeats per layer and pass (median).");
ABSL_FLAG(int, warmup, 1, "Untimed calls of each side before timing.");
ABSL_FLAG(std::string, sections, "elementwise,linear,mlp",
          "Comma list: elementwise (the non-GEMM ops inside the layers), "
          "linear, mlp.");
ABSL_FLAG(int, blas_threads, 0,
          "OpenBLAS threads per rank; 0: OPENBLAS_NUM_THREADS if set, else "
          "cores / local ranks.");
ABSL_FLAG(bool, tp1_baseline, true,
          "With more than one rank: rank 0 also times the MLP at TP = 1 on all "
          "the job's threads, for the speed ratio.");

namespace tp {
namespace {

using Clock = std::chrono::steady_clock;

struct Env {
  Communicator* tp = nullptr;
  ProcessGroupManager* pg = nullptr;
  int threads = 1;  // OpenBLAS threads of this rank
  int64_t T = 0, h = 0, f = 0;
  int repeats = 1, warmup = 0;
  int64_t wrong = 0;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The largest value of `v` over the ranks of `comm`.
absl::StatusOr<double> MaxOverRanks(Communicator& comm, double v) {
  Tensor t = Tensor::Full({1}, v, DType::kFloat64);
  RETURN_IF_ERROR(comm.AllReduce(t, ReduceOp::kMax));
  return t.data<double>()[0];
}

// Median and minimum (ms) of one side, each the slowest rank's.
struct Timing {
  double median = 0, min = 0;
};

// Runs warm-up calls of each side, then `repeats` rounds timing one call of
// each (each after a barrier); returns {layer, raw}.
absl::StatusOr<std::pair<Timing, Timing>> TimePair(
    Env& env, const std::function<absl::Status()>& layer,
    const std::function<void()>& raw) {
  for (int i = 0; i < env.warmup; ++i) {
    RETURN_IF_ERROR(layer());
    raw();
  }
  std::vector<double> lt, rt;
  for (int i = 0; i < env.repeats; ++i) {
    RETURN_IF_ERROR(env.tp->Barrier());
    Clock::time_point t0 = Clock::now();
    RETURN_IF_ERROR(layer());
    lt.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0)
                     .count());
    RETURN_IF_ERROR(env.tp->Barrier());
    t0 = Clock::now();
    raw();
    rt.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0)
                     .count());
  }
  std::pair<Timing, Timing> out;
  ASSIGN_OR_RETURN(out.first.median, MaxOverRanks(*env.tp, Median(lt)));
  ASSIGN_OR_RETURN(out.first.min,
                   MaxOverRanks(*env.tp, *std::min_element(lt.begin(), lt.end())));
  ASSIGN_OR_RETURN(out.second.median, MaxOverRanks(*env.tp, Median(rt)));
  ASSIGN_OR_RETURN(out.second.min,
                   MaxOverRanks(*env.tp, *std::min_element(rt.begin(), rt.end())));
  return out;
}

absl::StatusOr<Tensor> RandomTensor(Shape shape, uint64_t seed) {
  return InitTensor(InitSpec::Uniform(-1.0, 1.0, seed), shape,
                    DType::kFloat32);
}

// C[M, N] (+)= A[M, K] op(B), row-major, B is [N, K] when trans_b.
void Sgemm(const float* a, const float* b, float* c, int64_t m, int64_t k,
           int64_t n, bool trans_a, bool trans_b, float beta) {
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, m, n, k, 1.0f, a,
              trans_a ? m : k, b, trans_b ? k : n, beta, c, n);
}

// Checks sampled entries of `got` [rows, cols] against float64 sums of
// products: want(i, j) = sum over the group of partial(i, j), where
// `partial` returns this rank's {sum, sum of |terms|}. `reduce` all-reduces
// the partials over the TP group first. Returns the number of mismatches
// (the same on every rank).
absl::StatusOr<int64_t> CheckSamples(
    Env& env, const Tensor& got, bool reduce,
    const std::function<std::pair<double, double>(int64_t, int64_t)>& partial,
    const std::function<double(int64_t, int64_t, double)>& finish =
        nullptr) {
  const int64_t rows = got.dim(0), cols = got.dim(1);
  const std::vector<std::pair<int64_t, int64_t>> at = {
      {0, 0}, {rows - 1, cols - 1}, {rows / 2, cols / 3}, {rows / 3, cols / 2}};
  Tensor sums = Tensor::Zeros({static_cast<int64_t>(2 * at.size())},
                              DType::kFloat64);
  double* s = sums.data<double>();
  for (size_t k = 0; k < at.size(); ++k) {
    std::tie(s[2 * k], s[2 * k + 1]) = partial(at[k].first, at[k].second);
  }
  if (reduce) RETURN_IF_ERROR(env.tp->AllReduce(sums, ReduceOp::kSum));
  const float* g = got.data<float>();
  int64_t wrong = 0;
  for (size_t k = 0; k < at.size(); ++k) {
    const auto [i, j] = at[k];
    const double want = finish ? finish(i, j, s[2 * k]) : s[2 * k];
    if (!(std::fabs(g[i * cols + j] - want) <= 1e-4 * s[2 * k + 1] + 1e-6)) {
      ++wrong;
      std::cerr << absl::StrFormat(
          "rank %d: wrong element (%d, %d): %.8g, float64 %.8g\n",
          env.tp->rank(), i, j, g[i * cols + j], want);
    }
  }
  return wrong;
}

std::string Shape3(int64_t m, int64_t k, int64_t n) {
  return absl::StrCat(m, "x", k, "x", n);
}

void PrintHeader(const Env& env) {
  if (env.tp->rank() != 0) return;
  std::cout << absl::StrFormat(
      "%-22s %-8s %-30s %9s %9s %9s %9s %8s %8s %9s %6s\n", "# layer", "pass",
      "local GEMMs (MxKxN)", "layer_ms", "(min)", "sgemm_ms", "(min)",
      "overhead", "(min)", "GF/s/rank", "#wrong");
}

void PrintRow(const Env& env, const std::string& layer, const std::string& pass,
              const std::string& shapes, const Timing& l, const Timing& r,
              double flops, int64_t wrong) {
  if (env.tp->rank() != 0) return;
  std::cout << absl::StrFormat(
                   "%-22s %-8s %-30s %9.1f %9.1f %9.1f %9.1f %7.1f%% %7.1f%% "
                   "%9.1f %6d\n",
                   layer, pass, shapes, l.median, l.min, r.median, r.min,
                   100.0 * (l.median / r.median - 1.0),
                   100.0 * (l.min / r.min - 1.0), flops / l.median * 1e-6,
                   wrong)
            << std::flush;
}

// ---- Linear layers ----

absl::Status BenchColumn(Env& env) {
  const int tp = env.tp->size();
  const int64_t T = env.T, h = env.h, fl = env.f / tp;
  ColumnParallelLinear::Options o;
  o.in_features = h;
  o.out_features = env.f;
  o.gather_output = false;
  o.weight_init = InitSpec::Uniform(-0.05, 0.05, SeedFor(7, "column.weight"));
  o.bias_init = InitSpec::Uniform(-0.5, 0.5, SeedFor(7, "column.bias"));
  o.name = "column";
  ASSIGN_OR_RETURN(auto layer, ColumnParallelLinear::Create(*env.tp, o));
  ASSIGN_OR_RETURN(Tensor x, RandomTensor({T, h}, 11));
  ASSIGN_OR_RETURN(Tensor dy, RandomTensor({T, fl}, 12 + env.tp->rank()));
  Tensor c1 = Tensor::Zeros({T, fl}, DType::kFloat32);
  Tensor c2 = Tensor::Zeros({T, h}, DType::kFloat32);
  Tensor c3 = Tensor::Zeros({fl, h}, DType::kFloat32);
  const float* w = layer->weight().data<float>();
  Tensor y, dx;
  auto fwd = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(y, layer->Forward(x));
    return absl::OkStatus();
  };
  auto fwd_bwd = [&]() -> absl::Status {
    RETURN_IF_ERROR(fwd());
    ASSIGN_OR_RETURN(dx, layer->Backward(dy));
    return absl::OkStatus();
  };
  auto raw_fwd = [&] {
    Sgemm(x.data<float>(), w, c1.data<float>(), T, h, fl, false, true, 0.0f);
  };
  auto raw_fwd_bwd = [&] {
    raw_fwd();
    Sgemm(dy.data<float>(), w, c2.data<float>(), T, fl, h, false, false, 0.0f);
    Sgemm(dy.data<float>(), x.data<float>(), c3.data<float>(), fl, T, h, true,
          false, 1.0f);
  };
  ASSIGN_OR_RETURN(auto tf, TimePair(env, fwd, raw_fwd));
  const float* b = layer->bias().data<float>();
  const float* xp = x.data<float>();
  ASSIGN_OR_RETURN(
      int64_t wf,
      CheckSamples(env, y, false, [&](int64_t i, int64_t j) {
        double s = b[j], a = std::fabs(b[j]);
        for (int64_t k = 0; k < h; ++k) {
          const double t = double(xp[i * h + k]) * w[j * h + k];
          s += t;
          a += std::fabs(t);
        }
        return std::make_pair(s, a);
      }));
  ASSIGN_OR_RETURN(auto tb, TimePair(env, fwd_bwd, raw_fwd_bwd));
  const float* dyp = dy.data<float>();
  ASSIGN_OR_RETURN(
      int64_t wb,
      CheckSamples(env, dx, true, [&](int64_t i, int64_t j) {
        double s = 0, a = 0;
        for (int64_t k = 0; k < fl; ++k) {
          const double t = double(dyp[i * fl + k]) * w[k * h + j];
          s += t;
          a += std::fabs(t);
        }
        return std::make_pair(s, a);
      }));
  env.wrong += wf + wb;
  const double gemm = 2.0 * T * h * fl;
  PrintRow(env, "ColumnParallelLinear", "fwd", Shape3(T, h, fl), tf.first,
           tf.second, gemm, wf);
  PrintRow(env, "ColumnParallelLinear", "fwd+bwd",
           absl::StrCat(Shape3(T, h, fl), " +2"), tb.first, tb.second,
           3 * gemm, wb);
  return absl::OkStatus();
}

absl::Status BenchRow(Env& env) {
  const int tp = env.tp->size();
  const int64_t T = env.T, h = env.h, fl = env.f / tp;
  RowParallelLinear::Options o;
  o.in_features = env.f;
  o.out_features = h;
  o.input_is_parallel = true;
  o.weight_init = InitSpec::Uniform(-0.05, 0.05, SeedFor(7, "row.weight"));
  o.bias_init = InitSpec::Uniform(-0.5, 0.5, SeedFor(7, "row.bias"));
  o.name = "row";
  ASSIGN_OR_RETURN(auto layer, RowParallelLinear::Create(*env.tp, o));
  ASSIGN_OR_RETURN(Tensor x, RandomTensor({T, fl}, 21 + env.tp->rank()));
  ASSIGN_OR_RETURN(Tensor dy, RandomTensor({T, h}, 22));
  Tensor c1 = Tensor::Zeros({T, h}, DType::kFloat32);
  Tensor c2 = Tensor::Zeros({T, fl}, DType::kFloat32);
  Tensor c3 = Tensor::Zeros({h, fl}, DType::kFloat32);
  const float* w = layer->weight().data<float>();  // [h, fl]
  Tensor y, dx;
  auto fwd = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(y, layer->Forward(x));
    return absl::OkStatus();
  };
  auto fwd_bwd = [&]() -> absl::Status {
    RETURN_IF_ERROR(fwd());
    ASSIGN_OR_RETURN(dx, layer->Backward(dy));
    return absl::OkStatus();
  };
  auto raw_fwd = [&] {
    Sgemm(x.data<float>(), w, c1.data<float>(), T, fl, h, false, true, 0.0f);
  };
  auto raw_fwd_bwd = [&] {
    raw_fwd();
    Sgemm(dy.data<float>(), w, c2.data<float>(), T, h, fl, false, false, 0.0f);
    Sgemm(dy.data<float>(), x.data<float>(), c3.data<float>(), h, T, fl, true,
          false, 1.0f);
  };
  ASSIGN_OR_RETURN(auto tf, TimePair(env, fwd, raw_fwd));
  const float* b = layer->bias().data<float>();
  const float* xp = x.data<float>();
  ASSIGN_OR_RETURN(
      int64_t wf,
      CheckSamples(
          env, y, true,
          [&](int64_t i, int64_t j) {
            double s = 0, a = 0;
            for (int64_t k = 0; k < fl; ++k) {
              const double t = double(xp[i * fl + k]) * w[j * fl + k];
              s += t;
              a += std::fabs(t);
            }
            return std::make_pair(s, a);
          },
          [&](int64_t, int64_t j, double s) { return s + b[j]; }));
  ASSIGN_OR_RETURN(auto tb, TimePair(env, fwd_bwd, raw_fwd_bwd));
  const float* dyp = dy.data<float>();
  ASSIGN_OR_RETURN(
      int64_t wb,
      CheckSamples(env, dx, false, [&](int64_t i, int64_t j) {
        double s = 0, a = 0;
        for (int64_t k = 0; k < h; ++k) {
          const double t = double(dyp[i * h + k]) * w[k * fl + j];
          s += t;
          a += std::fabs(t);
        }
        return std::make_pair(s, a);
      }));
  env.wrong += wf + wb;
  const double gemm = 2.0 * T * h * fl;
  PrintRow(env, "RowParallelLinear", "fwd", Shape3(T, fl, h), tf.first,
           tf.second, gemm, wf);
  PrintRow(env, "RowParallelLinear", "fwd+bwd",
           absl::StrCat(Shape3(T, fl, h), " +2"), tb.first, tb.second, 3 * gemm,
           wb);
  return absl::OkStatus();
}

// ---- MLP ----

double Gelu(double x) {
  const double c = std::sqrt(2.0 / M_PI);
  return 0.5 * x * (1.0 + std::tanh(c * (x + 0.044715 * x * x * x)));
}

// Times the GeLU MLP over `comm` (whose size is the TP degree); returns the
// fwd+bwd layer timing.
absl::StatusOr<Timing> BenchMlp(Env& env, const std::string& label) {
  const int tp = env.tp->size();
  const int64_t T = env.T, h = env.h, fl = env.f / tp;
  ParallelMLP::Options o;
  o.hidden = h;
  o.ffn = env.f;
  o.activation = MlpActivation::kGeLU;
  o.seed = 7;
  o.init_std = 0.02;
  o.name = "mlp";
  ASSIGN_OR_RETURN(auto mlp, ParallelMLP::Create(*env.tp, o));
  ASSIGN_OR_RETURN(Tensor x, RandomTensor({T, h}, 31));
  ASSIGN_OR_RETURN(Tensor dy, RandomTensor({T, h}, 32));
  const float* w1 = mlp->up_proj().weight().data<float>();    // [fl, h]
  const float* b1 = mlp->up_proj().bias().data<float>();      // [fl]
  const float* w2 = mlp->down_proj().weight().data<float>();  // [h, fl]
  const float* b2 = mlp->down_proj().bias().data<float>();    // [h]
  Tensor a1 = Tensor::Zeros({T, fl}, DType::kFloat32);
  Tensor a2 = Tensor::Zeros({T, h}, DType::kFloat32);
  Tensor g1 = Tensor::Zeros({T, fl}, DType::kFloat32);
  Tensor g2 = Tensor::Zeros({T, h}, DType::kFloat32);
  Tensor dw1 = Tensor::Zeros({fl, h}, DType::kFloat32);
  Tensor dw2 = Tensor::Zeros({h, fl}, DType::kFloat32);
  Tensor y, dx;
  auto fwd = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(y, mlp->Forward(x));
    return absl::OkStatus();
  };
  auto fwd_bwd = [&]() -> absl::Status {
    RETURN_IF_ERROR(fwd());
    ASSIGN_OR_RETURN(dx, mlp->Backward(dy));
    return absl::OkStatus();
  };
  auto raw_fwd = [&] {
    Sgemm(x.data<float>(), w1, a1.data<float>(), T, h, fl, false, true, 0.0f);
    Sgemm(a1.data<float>(), w2, a2.data<float>(), T, fl, h, false, true, 0.0f);
  };
  auto raw_fwd_bwd = [&] {
    raw_fwd();
    // down: dA1 = dY W2, dW2 += dY^T A1; up: dX = dA1 W1, dW1 += dA1^T X.
    Sgemm(dy.data<float>(), w2, g1.data<float>(), T, h, fl, false, false, 0.0f);
    Sgemm(dy.data<float>(), a1.data<float>(), dw2.data<float>(), h, T, fl, true,
          false, 1.0f);
    Sgemm(g1.data<float>(), w1, g2.data<float>(), T, fl, h, false, false, 0.0f);
    Sgemm(g1.data<float>(), x.data<float>(), dw1.data<float>(), fl, T, h, true,
          false, 1.0f);
  };
  ASSIGN_OR_RETURN(auto tf, TimePair(env, fwd, raw_fwd));
  // Check y on sampled rows: y = sum_ranks gelu(x W1l^T + b1l) W2l^T + b2.
  const float* xp = x.data<float>();
  std::vector<std::vector<double>> act_cache(T);
  auto act_row = [&](int64_t i) -> const std::vector<double>& {
    if (act_cache[i].empty()) {
      act_cache[i].resize(fl);
      for (int64_t u = 0; u < fl; ++u) {
        double s = b1[u];
        for (int64_t k = 0; k < h; ++k) s += double(xp[i * h + k]) * w1[u * h + k];
        act_cache[i][u] = Gelu(s);
      }
    }
    return act_cache[i];
  };
  ASSIGN_OR_RETURN(
      int64_t wf,
      CheckSamples(
          env, y, true,
          [&](int64_t i, int64_t j) {
            const std::vector<double>& a = act_row(i);
            double s = 0, abs_sum = 0;
            for (int64_t u = 0; u < fl; ++u) {
              const double t = a[u] * w2[j * fl + u];
              s += t;
              abs_sum += std::fabs(t);
            }
            return std::make_pair(s, abs_sum);
          },
          [&](int64_t, int64_t j, double s) { return s + b2[j]; }));
  ASSIGN_OR_RETURN(auto tb, TimePair(env, fwd_bwd, raw_fwd_bwd));
  bool finite = true;
  for (double v : {dx.data<float>()[0], dx.data<float>()[dx.numel() - 1]}) {
    finite = finite && std::isfinite(v);
  }
  const int64_t wb = finite ? 0 : 1;
  env.wrong += wf + wb;
  const double gemm = 2.0 * T * h * fl;
  const std::string shapes =
      absl::StrCat(Shape3(T, h, fl), ",", Shape3(T, fl, h));
  PrintRow(env, label, "fwd", shapes, tf.first, tf.second, 2 * gemm, wf);
  PrintRow(env, label, "fwd+bwd", absl::StrCat(shapes, " +4"), tb.first,
           tb.second, 6 * gemm, wb);
  return tb.first;
}

// The non-GEMM work inside the layers, on this rank's [T, f/tp] activation:
// where a layer's overhead over its GEMMs goes.
absl::Status BenchElementwise(Env& env) {
  const int64_t T = env.T, fl = env.f / env.tp->size();
  ASSIGN_OR_RETURN(Tensor a, RandomTensor({T, fl}, 41));
  ASSIGN_OR_RETURN(Tensor g, RandomTensor({T, fl}, 42));
  ASSIGN_OR_RETURN(Tensor b, RandomTensor({fl}, 43));
  struct Item {
    const char* name;
    std::function<absl::Status()> fn;
  };
  const std::vector<Item> items = {
      {"ops::AddBias", [&] { return ops::AddBias(a, b).status(); }},
      {"ops::BiasGrad", [&] { return ops::BiasGrad(g).status(); }},
      {"ops::GeLU", [&] { return ops::GeLU(a).status(); }},
      {"ops::GeLUBackward", [&] { return ops::GeLUBackward(g, a).status(); }},
      {"Tensor::Empty+fill", [&] {
         Tensor t = Tensor::Empty({T, fl}, DType::kFloat32);
         std::fill_n(t.data<float>(), t.numel(), 1.0f);
         return absl::OkStatus();
       }},
  };
  for (const Item& item : items) {
    std::vector<double> ms;
    for (int i = 0; i < env.warmup + env.repeats; ++i) {
      const Clock::time_point t0 = Clock::now();
      RETURN_IF_ERROR(item.fn());
      if (i >= env.warmup) {
        ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0)
                         .count());
      }
    }
    ASSIGN_OR_RETURN(double med, MaxOverRanks(*env.tp, Median(ms)));
    ASSIGN_OR_RETURN(double mn, MaxOverRanks(*env.tp,
                                             *std::min_element(ms.begin(), ms.end())));
    if (env.tp->rank() == 0) {
      std::cout << absl::StrFormat("# %-20s on [%d, %d]: %8.1f ms (min %.1f)\n",
                                   item.name, T, fl, med, mn);
    }
  }
  return absl::OkStatus();
}

int ThreadsPerRank(int local_ranks) {
  if (absl::GetFlag(FLAGS_blas_threads) > 0) return absl::GetFlag(FLAGS_blas_threads);
  const char* env = std::getenv("OPENBLAS_NUM_THREADS");
  if (env != nullptr && std::atoi(env) > 0) return std::atoi(env);
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  return std::max(1, cores / std::max(1, local_ranks));
}

absl::Status Run() {
  ASSIGN_OR_RETURN(TensorParallelConfig config, TensorParallelConfig::FromEnv());
  config.backend = "gloo";
  ASSIGN_OR_RETURN(std::unique_ptr<ProcessGroupManager> pg,
                   ProcessGroupManager::Init(config));
  Env env;
  env.pg = pg.get();
  env.tp = &pg->tensor_parallel();
  env.T = absl::GetFlag(FLAGS_tokens);
  env.h = absl::GetFlag(FLAGS_hidden);
  env.f = absl::GetFlag(FLAGS_ffn);
  env.repeats = absl::GetFlag(FLAGS_repeats);
  env.warmup = absl::GetFlag(FLAGS_warmup);
  const int tp = env.tp->size();
  if (env.T < 1 || env.h < 1 || env.f < 1 || env.f % tp != 0 ||
      env.repeats < 1 || env.warmup < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "need positive --tokens, --hidden, --ffn with --ffn divisible by the "
        "TP size ", tp, ", --repeats >= 1, --warmup >= 0; got tokens=", env.T,
        " hidden=", env.h, " ffn=", env.f, " repeats=", env.repeats,
        " warmup=", env.warmup));
  }
  const int local_ranks = pg->launch_env().local_world_size;
  env.threads = ThreadsPerRank(local_ranks);
  openblas_set_num_threads(env.threads);
  env.threads = openblas_get_num_threads();

  bool linear = false, mlp = false, elementwise = false;
  for (absl::string_view s :
       absl::StrSplit(absl::GetFlag(FLAGS_sections), ',', absl::SkipEmpty())) {
    if (s == "linear") {
      linear = true;
    } else if (s == "mlp") {
      mlp = true;
    } else if (s == "elementwise") {
      elementwise = true;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "--sections: unknown section '", s, "' (linear, mlp, elementwise)"));
    }
  }
  if (pg->rank() == 0) {
    std::cout << absl::StrFormat(
        "# layers benchmark: world %d, TP %d (gloo), %d process(es) on this "
        "host x %d OpenBLAS thread(s), %d cores; float32; T=%d h=%d f=%d; "
        "median of %d after %d warm-up, slowest rank\n",
        pg->world_size(), tp, local_ranks, env.threads,
        static_cast<int>(std::thread::hardware_concurrency()), env.T, env.h,
        env.f, env.repeats, env.warmup);
  }
  if (elementwise) RETURN_IF_ERROR(BenchElementwise(env));
  PrintHeader(env);
  if (linear) {
    RETURN_IF_ERROR(BenchColumn(env));
    RETURN_IF_ERROR(BenchRow(env));
  }
  Timing mlp_t;
  if (mlp) {
    ASSIGN_OR_RETURN(mlp_t, BenchMlp(env, absl::StrCat("ParallelMLP tp=", tp)));
  }
  if (mlp && pg->world_size() > 1 && absl::GetFlag(FLAGS_tp1_baseline)) {
    // Rank 0 alone, on every thread the job used; the others wait.
    if (pg->rank() == 0) {
      ASSIGN_OR_RETURN(std::unique_ptr<Communicator> solo, pg->NewGroup({0}));
      openblas_set_num_threads(env.threads * local_ranks);
      const int all_threads = openblas_get_num_threads();
      Env base = env;
      base.tp = solo.get();
      ASSIGN_OR_RETURN(Timing base_t,
                       BenchMlp(base, absl::StrCat("ParallelMLP tp=1 x",
                                                   all_threads, "thr")));
      env.wrong = base.wrong;
      std::cout << absl::StrFormat(
          "# MLP fwd+bwd speed, TP=%d (%d processes x %d threads) relative to "
          "TP=1 (1 process x %d threads): %.3f by medians, %.3f by minima "
          "(goal >= 0.9)\n",
          tp, local_ranks, env.threads, all_threads,
          base_t.median / mlp_t.median, base_t.min / mlp_t.min);
    }
    RETURN_IF_ERROR(pg->world().Barrier());
  }
  ASSIGN_OR_RETURN(double wrong, MaxOverRanks(pg->world(), env.wrong));
  if (pg->rank() == 0) {
    std::cout << absl::StrFormat("# #wrong total: %d %s\n",
                                 static_cast<int64_t>(wrong),
                                 wrong == 0 ? "OK" : "FAILED")
              << std::flush;
  }
  if (wrong > 0) return absl::InternalError("wrong results");
  return absl::OkStatus();
}

}  // namespace
}  // namespace tp

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  absl::StatusOr<std::optional<int>> job =
      tp::MaybeRelaunchSelf(absl::GetFlag(FLAGS_nproc), argc, argv);
  if (!job.ok()) {
    std::cerr << "layers: " << job.status() << "\n";
    return 2;
  }
  if (job->has_value()) return **job;
  absl::Status s = tp::Run();
  if (!s.ok()) {
    std::cerr << "layers: " << s << "\n";
    return 1;
  }
  return 0;
}
