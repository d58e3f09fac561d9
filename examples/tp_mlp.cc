// A tensor-parallel MLP block (Megatron: column -> GeLU -> row), forward and
// backward on every rank of the job, checked against the same block at TP = 1.
//
//   bazel run //examples:tp_mlp -- --nproc=2
//
// Each rank builds only its shard of the weights (the sliceable initialiser
// makes the shards equal the slices of the TP = 1 weights), runs the block,
// then builds the TP = 1 block on its own and compares outputs and input
// gradients. Runs unchanged under tprun, torchrun, mpirun and srun.
#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "comm/process_group.h"
#include "glog/logging.h"
#include "layers/mlp.h"
#include "runtime/init.h"
#include "runtime/ops.h"
#include "runtime/status_macros.h"
#include "tools/launch.h"

ABSL_FLAG(int, nproc, 1, "ranks to start on this host (re-launches itself)");
ABSL_FLAG(std::string, backend, "auto", "communication backend");
ABSL_FLAG(int64_t, hidden, 1024, "model width");
ABSL_FLAG(int64_t, ffn, 4096, "MLP intermediate width (divisible by nproc)");
ABSL_FLAG(int64_t, tokens, 64, "tokens in the batch");
ABSL_FLAG(int, steps, 3, "timed forward+backward repetitions");

namespace {

double MaxRelDiff(const tp::Tensor& a, const tp::Tensor& b) {
  const std::vector<double> x = a.ToDoubles(), y = b.ToDoubles();
  double max_diff = 0, max_ref = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    max_diff = std::max(max_diff, std::abs(x[i] - y[i]));
    max_ref = std::max(max_ref, std::abs(y[i]));
  }
  return max_ref == 0 ? max_diff : max_diff / max_ref;
}

absl::Status Run() {
  ASSIGN_OR_RETURN(tp::TensorParallelConfig config,
                   tp::TensorParallelConfig::FromEnv());
  config.backend = absl::GetFlag(FLAGS_backend);
  ASSIGN_OR_RETURN(std::unique_ptr<tp::ProcessGroupManager> pg,
                   tp::ProcessGroupManager::Init(config));
  const int rank = pg->rank();
  const int tp_size = pg->tensor_parallel_size();

  tp::ParallelMLPOptions options;
  options.hidden = absl::GetFlag(FLAGS_hidden);
  options.ffn = absl::GetFlag(FLAGS_ffn);
  options.seed = 42;
  ASSIGN_OR_RETURN(std::unique_ptr<tp::ParallelMLP> mlp,
                   tp::ParallelMLP::Create(pg->tensor_parallel(), options));

  // The same input and output gradient on every rank (from the initialiser).
  const tp::Shape shape = {absl::GetFlag(FLAGS_tokens), options.hidden};
  ASSIGN_OR_RETURN(tp::Tensor x,
                   tp::InitTensor(tp::InitSpec::Normal(0, 1, 7), shape,
                                  tp::DType::kFloat32));
  ASSIGN_OR_RETURN(tp::Tensor dy,
                   tp::InitTensor(tp::InitSpec::Normal(0, 1, 8), shape,
                                  tp::DType::kFloat32));

  tp::Tensor y, dx;
  std::vector<double> forward_ms, backward_ms;
  for (int step = 0; step < absl::GetFlag(FLAGS_steps); ++step) {
    const absl::Time t0 = absl::Now();
    ASSIGN_OR_RETURN(y, mlp->Forward(x));
    const absl::Time t1 = absl::Now();
    ASSIGN_OR_RETURN(dx, mlp->Backward(dy));
    const absl::Time t2 = absl::Now();
    forward_ms.push_back(absl::ToDoubleMilliseconds(t1 - t0));
    backward_ms.push_back(absl::ToDoubleMilliseconds(t2 - t1));
  }

  // The TP = 1 block on this rank alone: a group of one.
  ASSIGN_OR_RETURN(std::unique_ptr<tp::Communicator> alone, pg->NewGroup({rank}));
  ASSIGN_OR_RETURN(std::unique_ptr<tp::ParallelMLP> serial,
                   tp::ParallelMLP::Create(*alone, options));
  ASSIGN_OR_RETURN(tp::Tensor y1, serial->Forward(x));
  ASSIGN_OR_RETURN(tp::Tensor dx1, serial->Backward(dy));
  const double y_err = MaxRelDiff(y, y1), dx_err = MaxRelDiff(dx, dx1);
  const bool ok = y_err < 1e-5 && dx_err < 1e-5;

  std::sort(forward_ms.begin(), forward_ms.end());
  std::sort(backward_ms.begin(), backward_ms.end());
  const std::vector<tp::ParameterShard> params = mlp->parameters();
  std::string shards;
  for (const tp::ParameterShard& p : params) {
    absl::StrAppend(&shards, " ", p.name, tp::ShapeToString(p.tensor.shape()));
  }
  std::cout << absl::StrFormat(
                   "rank %d/%d (tp %d, %s): shards%s\n"
                   "rank %d: forward %.2f ms, backward %.2f ms (median of %d); "
                   "max rel diff vs TP=1: output %.2e, input grad %.2e -> %s\n",
                   rank, pg->world_size(), tp_size, pg->backend(), shards, rank,
                   forward_ms[forward_ms.size() / 2],
                   backward_ms[backward_ms.size() / 2],
                   static_cast<int>(forward_ms.size()), y_err, dx_err,
                   ok ? "OK" : "MISMATCH")
            << std::flush;
  RETURN_IF_ERROR(pg->world().Barrier());
  if (!ok) return absl::InternalError("TP result differs from TP = 1");
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  google::InitGoogleLogging(argv[0]);
  FLAGS_logtostderr = true;
  absl::StatusOr<std::optional<int>> job =
      tp::MaybeRelaunchSelf(absl::GetFlag(FLAGS_nproc), argc, argv);
  if (!job.ok()) {
    std::cerr << job.status() << "\n";
    return 2;
  }
  if (job->has_value()) return **job;
  absl::Status status = Run();
  if (!status.ok()) {
    std::cerr << "tp_mlp: " << status << "\n";
    return 1;
  }
  return 0;
}
