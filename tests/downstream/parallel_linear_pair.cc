// A downstream program: uses tensor_parallel through @tensor_parallel only
// (public headers, the //:tensor_parallel bundle, //tools:launch).
//
//   bazel run //:parallel_linear_pair -- --nproc=2
//
// Every rank runs a Megatron column -> row linear pair over the tensor-parallel
// group of ProcessGroupManager (Gloo backend) and checks it twice:
//   1. Constant weights: output, input gradient and every weight/bias gradient
//      shard against closed forms (see ClosedFormCheck).
//   2. Random weights with a GeLU between the layers: output and input
//      gradient against the same pair at TP = 1 (a group of this rank alone).
// Each rank prints one line ending in "-> OK" or "-> MISMATCH"; the program
// exits non-zero on a mismatch or any error.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "comm/process_group.h"
#include "glog/logging.h"
#include "layers/linear.h"
#include "runtime/init.h"
#include "runtime/ops.h"
#include "runtime/status_macros.h"
#include "runtime/tensor.h"
#include "tools/launch.h"

ABSL_FLAG(int, nproc, 1, "ranks to start on this host (re-launches itself)");
ABSL_FLAG(std::string, backend, "gloo", "communication backend");
ABSL_FLAG(int64_t, tokens, 5, "rows of the input");
ABSL_FLAG(int64_t, in, 12, "input features");
ABSL_FLAG(int64_t, ffn, 16, "features between the layers (divisible by nproc)");
ABSL_FLAG(int64_t, out, 6, "output features");
ABSL_FLAG(int, job_timeout_s, 120, "wall-clock limit of the whole job");

namespace {

// Largest |a - b| over max(|b|, 1): relative for large values, absolute near 0.
double MaxDiff(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return INFINITY;
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    worst =
        std::max(worst, std::abs(a[i] - b[i]) / std::max(std::abs(b[i]), 1.0));
  }
  return worst;
}

// Compares `t` with `expected` (row-major, same shape); appends a message to
// `errors` on a shape or value mismatch.
void Expect(const std::string& what, const tp::Tensor& t,
            const tp::Shape& shape, const std::vector<double>& expected,
            std::string* errors) {
  if (t.shape() != shape) {
    absl::StrAppend(errors, " ", what, " shape ", tp::ShapeToString(t.shape()),
                    " != ", tp::ShapeToString(shape), ";");
    return;
  }
  const double diff = MaxDiff(t.ToDoubles(), expected);
  if (!(diff < 1e-5)) {
    absl::StrAppend(errors, " ", what, " off by ", diff, ";");
  }
}

// Constant weights make every result a closed form. With x [T, in],
// W1 = c1 (column layer, [ffn, in]), b1 = d1, W2 = c2 (row layer, [out, ffn]),
// b2 = d2, no activation, grad_out = 1, and s_t = sum_i x[t, i]:
//   h[t, j]   = c1 s_t + d1                  (this rank's [T, ffn/tp])
//   y[t, k]   = ffn c2 h_t + d2              (b2 added once, after the reduce)
//   dh[t, j]  = out c2
//   dx[t, i]  = ffn out c1 c2                (the column layer's all-reduce)
//   dW2[k, j] = sum_t h_t,  db2[k] = T
//   dW1[j, i] = out c2 sum_t x[t, i],  db1[j] = T out c2
absl::Status ClosedFormCheck(tp::Communicator& group, std::string* errors) {
  const int64_t tokens = absl::GetFlag(FLAGS_tokens),
                in = absl::GetFlag(FLAGS_in), ffn = absl::GetFlag(FLAGS_ffn),
                out = absl::GetFlag(FLAGS_out);
  const double c1 = 0.25, d1 = 0.5, c2 = -0.125, d2 = 1.5;

  tp::ColumnParallelLinear::Options up;
  up.in_features = in;
  up.out_features = ffn;
  up.gather_output = false;
  up.weight_init = tp::InitSpec::Constant(c1);
  up.bias_init = tp::InitSpec::Constant(d1);
  up.name = "up";
  ASSIGN_OR_RETURN(std::unique_ptr<tp::ColumnParallelLinear> fc1,
                   tp::ColumnParallelLinear::Create(group, up));
  tp::RowParallelLinear::Options down;
  down.in_features = ffn;
  down.out_features = out;
  down.input_is_parallel = true;
  down.weight_init = tp::InitSpec::Constant(c2);
  down.bias_init = tp::InitSpec::Constant(d2);
  down.name = "down";
  ASSIGN_OR_RETURN(std::unique_ptr<tp::RowParallelLinear> fc2,
                   tp::RowParallelLinear::Create(group, down));

  // x[t, i] = (t + 1) / 8 - i / 16: distinct rows and columns, exact in fp32.
  std::vector<double> xs(tokens * in), col_sum(in, 0.0), row_sum(tokens, 0.0);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < in; ++i) {
      xs[t * in + i] = (t + 1) / 8.0 - i / 16.0;
      row_sum[t] += xs[t * in + i];
      col_sum[i] += xs[t * in + i];
    }
  }
  ASSIGN_OR_RETURN(tp::Tensor x, tp::Tensor::FromDoubles(xs, {tokens, in},
                                                         tp::DType::kFloat32));
  const int64_t local_ffn = ffn / group.size();

  ASSIGN_OR_RETURN(tp::Tensor h, fc1->Forward(x));
  ASSIGN_OR_RETURN(tp::Tensor y, fc2->Forward(h));
  const tp::Tensor dy =
      tp::Tensor::Full({tokens, out}, 1.0, tp::DType::kFloat32);
  ASSIGN_OR_RETURN(tp::Tensor dh, fc2->Backward(dy));
  ASSIGN_OR_RETURN(tp::Tensor dx, fc1->Backward(dh));

  std::vector<double> h_ref, y_ref, dw2_ref, dw1_ref;
  double h_sum = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    const double ht = c1 * row_sum[t] + d1;
    h_sum += ht;
    h_ref.insert(h_ref.end(), local_ffn, ht);
    y_ref.insert(y_ref.end(), out, ffn * c2 * ht + d2);
  }
  for (int64_t k = 0; k < out; ++k)
    dw2_ref.insert(dw2_ref.end(), local_ffn, h_sum);
  for (int64_t j = 0; j < local_ffn; ++j) {
    for (int64_t i = 0; i < in; ++i) dw1_ref.push_back(out * c2 * col_sum[i]);
  }
  Expect("h", h, {tokens, local_ffn}, h_ref, errors);
  Expect("y", y, {tokens, out}, y_ref, errors);
  Expect("dh", dh, {tokens, local_ffn},
         std::vector<double>(tokens * local_ffn, out * c2), errors);
  Expect("dx", dx, {tokens, in},
         std::vector<double>(tokens * in, ffn * out * c1 * c2), errors);
  Expect("row weight grad", fc2->weight_grad(), {out, local_ffn}, dw2_ref,
         errors);
  Expect("row bias grad", fc2->bias_grad(), {out},
         std::vector<double>(out, tokens), errors);
  Expect("column weight grad", fc1->weight_grad(), {local_ffn, in}, dw1_ref,
         errors);
  Expect("column bias grad", fc1->bias_grad(), {local_ffn},
         std::vector<double>(local_ffn, tokens * out * c2), errors);
  if (fc1->out_offset() != group.rank() * local_ffn ||
      fc2->in_offset() != group.rank() * local_ffn) {
    absl::StrAppend(errors, " shard offsets ", fc1->out_offset(), "/",
                    fc2->in_offset(), " != ", group.rank() * local_ffn, ";");
  }
  return absl::OkStatus();
}

struct PairResult {
  tp::Tensor y, dx;
};

// Random weights (the same full weights at every TP size), GeLU between.
absl::StatusOr<PairResult> RunRandomPair(tp::Communicator& group,
                                         const tp::Tensor& x,
                                         const tp::Tensor& dy) {
  tp::ColumnParallelLinear::Options up;
  up.in_features = absl::GetFlag(FLAGS_in);
  up.out_features = absl::GetFlag(FLAGS_ffn);
  up.gather_output = false;
  up.weight_init = tp::InitSpec::Normal(0, 0.5, tp::SeedFor(7, "fc1.weight"));
  up.bias_init = tp::InitSpec::Normal(0, 0.5, tp::SeedFor(7, "fc1.bias"));
  ASSIGN_OR_RETURN(auto fc1, tp::ColumnParallelLinear::Create(group, up));
  tp::RowParallelLinear::Options down;
  down.in_features = absl::GetFlag(FLAGS_ffn);
  down.out_features = absl::GetFlag(FLAGS_out);
  down.input_is_parallel = true;
  down.weight_init = tp::InitSpec::Normal(0, 0.5, tp::SeedFor(7, "fc2.weight"));
  down.bias_init = tp::InitSpec::Normal(0, 0.5, tp::SeedFor(7, "fc2.bias"));
  ASSIGN_OR_RETURN(auto fc2, tp::RowParallelLinear::Create(group, down));

  PairResult r;
  ASSIGN_OR_RETURN(tp::Tensor a, fc1->Forward(x));
  ASSIGN_OR_RETURN(tp::Tensor g, tp::ops::GeLU(a));
  ASSIGN_OR_RETURN(r.y, fc2->Forward(g));
  ASSIGN_OR_RETURN(tp::Tensor dg, fc2->Backward(dy));
  ASSIGN_OR_RETURN(tp::Tensor da, tp::ops::GeLUBackward(dg, a));
  ASSIGN_OR_RETURN(r.dx, fc1->Backward(da));
  return r;
}

absl::Status Run() {
  ASSIGN_OR_RETURN(tp::TensorParallelConfig config,
                   tp::TensorParallelConfig::FromEnv());
  config.backend = absl::GetFlag(FLAGS_backend);
  ASSIGN_OR_RETURN(std::unique_ptr<tp::ProcessGroupManager> pg,
                   tp::ProcessGroupManager::Init(config));
  tp::Communicator& group = pg->tensor_parallel();

  std::string errors;
  RETURN_IF_ERROR(ClosedFormCheck(group, &errors));

  const tp::Shape in_shape = {absl::GetFlag(FLAGS_tokens),
                              absl::GetFlag(FLAGS_in)};
  const tp::Shape out_shape = {absl::GetFlag(FLAGS_tokens),
                               absl::GetFlag(FLAGS_out)};
  ASSIGN_OR_RETURN(tp::Tensor x, tp::InitTensor(tp::InitSpec::Normal(0, 1, 1),
                                                in_shape, tp::DType::kFloat32));
  ASSIGN_OR_RETURN(tp::Tensor dy,
                   tp::InitTensor(tp::InitSpec::Normal(0, 1, 2), out_shape,
                                  tp::DType::kFloat32));
  ASSIGN_OR_RETURN(PairResult parallel, RunRandomPair(group, x, dy));
  ASSIGN_OR_RETURN(std::unique_ptr<tp::Communicator> alone,
                   pg->NewGroup({pg->rank()}));
  ASSIGN_OR_RETURN(PairResult serial, RunRandomPair(*alone, x, dy));
  const double y_diff = MaxDiff(parallel.y.ToDoubles(), serial.y.ToDoubles());
  const double dx_diff =
      MaxDiff(parallel.dx.ToDoubles(), serial.dx.ToDoubles());
  if (!(y_diff < 1e-5 && dx_diff < 1e-5)) {
    absl::StrAppend(&errors, " vs TP=1: y off by ", y_diff, ", dx off by ",
                    dx_diff, ";");
  }

  std::cout << absl::StrFormat(
                   "rank %d/%d (tp %d, %s): closed form and TP=1 (max diff "
                   "y %.1e, dx %.1e) ->%s\n",
                   pg->rank(), pg->world_size(), group.size(), pg->backend(),
                   y_diff, dx_diff,
                   errors.empty() ? " OK" : " MISMATCH:" + errors)
            << std::flush;
  RETURN_IF_ERROR(pg->world().Barrier());
  if (!errors.empty()) return absl::InternalError("results differ");
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  google::InitGoogleLogging(argv[0]);
  FLAGS_logtostderr = true;
  tp::LaunchOptions base;
  base.timeout = absl::Seconds(absl::GetFlag(FLAGS_job_timeout_s));
  absl::StatusOr<std::optional<int>> job =
      tp::MaybeRelaunchSelf(absl::GetFlag(FLAGS_nproc), argc, argv, base);
  if (!job.ok()) {
    std::cerr << "parallel_linear_pair: " << job.status() << "\n";
    return 2;
  }
  if (job->has_value()) return **job;
  const absl::Status status = Run();
  if (!status.ok()) {
    std::cerr << "parallel_linear_pair: " << status << "\n";
    return 1;
  }
  return 0;
}
