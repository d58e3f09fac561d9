#include "layers/mlp.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/init.h"
#include "runtime/ops.h"
#include "runtime/status_macros.h"

namespace tp {
namespace {

Shape WithLastDim(Shape shape, int64_t last) {
  shape.back() = last;
  return shape;
}

}  // namespace

absl::string_view MlpActivationName(MlpActivation a) {
  return a == MlpActivation::kGeLU ? "gelu" : "swiglu";
}

absl::StatusOr<std::unique_ptr<ParallelMLP>> ParallelMLP::Create(
    Communicator& comm, Options options) {
  const std::string& name = options.name;
  if (options.hidden <= 0 || options.ffn <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": hidden (", options.hidden, ") and ffn (",
                     options.ffn, ") must be positive"));
  }
  if (options.ffn % comm.size() != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": ffn ", options.ffn,
                     " is not divisible by the tensor-parallel size ",
                     comm.size()));
  }
  std::unique_ptr<ParallelMLP> m(new ParallelMLP(std::move(options)));
  const Options& o = m->options_;
  const bool swiglu = o.activation == MlpActivation::kSwiGLU;
  const std::string up_name = swiglu ? "gate_up_proj" : "up_proj";

  ColumnParallelLinear::Options up;
  up.in_features = o.hidden;
  up.out_features = swiglu ? 2 * o.ffn : o.ffn;
  up.bias = o.bias;
  up.gather_output = false;
  up.sequence_parallel = o.sequence_parallel;
  up.dtype = o.dtype;
  up.weight_init = InitSpec::Normal(
      0.0, o.init_std, SeedFor(o.seed, absl::StrCat(o.name, ".", up_name, ".weight")));
  up.name = absl::StrCat(o.name, ".", up_name);
  ASSIGN_OR_RETURN(m->up_proj_, ColumnParallelLinear::Create(comm, up));

  RowParallelLinear::Options down;
  down.in_features = o.ffn;
  down.out_features = o.hidden;
  down.bias = o.bias;
  down.input_is_parallel = true;
  down.sequence_parallel = o.sequence_parallel;
  down.dtype = o.dtype;
  down.weight_init = InitSpec::Normal(
      0.0, o.init_std, SeedFor(o.seed, absl::StrCat(o.name, ".down_proj.weight")));
  down.name = absl::StrCat(o.name, ".down_proj");
  ASSIGN_OR_RETURN(m->down_proj_, RowParallelLinear::Create(comm, down));
  return m;
}

absl::StatusOr<Tensor> ParallelMLP::Forward(const Tensor& x) {
  pre_act_ = silu_ = Tensor();
  ASSIGN_OR_RETURN(Tensor h, up_proj_->Forward(x));
  Tensor act;
  if (options_.activation == MlpActivation::kGeLU) {
    ASSIGN_OR_RETURN(act, ops::GeLU(h));
    pre_act_ = h;
  } else {
    const int64_t f = h.dim(-1) / 2;
    const int64_t rows = h.numel() / h.dim(-1);
    ASSIGN_OR_RETURN(Tensor pairs, h.Reshape({rows, f, 2}));
    ASSIGN_OR_RETURN(Tensor gate, pairs.Narrow(2, 0, 1));
    ASSIGN_OR_RETURN(Tensor upv, pairs.Narrow(2, 1, 1));
    ASSIGN_OR_RETURN(Tensor silu, ops::SiLU(gate));
    ASSIGN_OR_RETURN(act, ops::Mul(silu, upv));
    ASSIGN_OR_RETURN(act, act.Reshape(WithLastDim(h.shape(), f)));
    pre_act_ = pairs;
    silu_ = silu;
  }
  absl::StatusOr<Tensor> y = down_proj_->Forward(act);
  if (!y.ok()) pre_act_ = silu_ = Tensor();
  return y;
}

absl::StatusOr<Tensor> ParallelMLP::Backward(const Tensor& grad_out) {
  if (!pre_act_.defined()) {
    return absl::FailedPreconditionError(absl::StrCat(
        options_.name, ": Backward without a preceding Forward"));
  }
  ASSIGN_OR_RETURN(Tensor dact, down_proj_->Backward(grad_out));
  Tensor dh;
  if (options_.activation == MlpActivation::kGeLU) {
    ASSIGN_OR_RETURN(dh, ops::GeLUBackward(dact, pre_act_));
  } else {
    const int64_t rows = pre_act_.dim(0), f = pre_act_.dim(1);
    ASSIGN_OR_RETURN(Tensor gate, pre_act_.Narrow(2, 0, 1));
    ASSIGN_OR_RETURN(Tensor upv, pre_act_.Narrow(2, 1, 1));
    const Shape act_shape = dact.shape();
    ASSIGN_OR_RETURN(Tensor d3, dact.Reshape({rows, f, 1}));
    ASSIGN_OR_RETURN(Tensor dup, ops::Mul(d3, silu_));
    ASSIGN_OR_RETURN(Tensor dsilu, ops::Mul(d3, upv));
    ASSIGN_OR_RETURN(Tensor dgate, ops::SiLUBackward(dsilu, gate));
    ASSIGN_OR_RETURN(dh, ops::Concat({dgate, dup}, 2));  // [rows, f, 2]
    ASSIGN_OR_RETURN(dh, dh.Reshape(WithLastDim(act_shape, 2 * f)));
  }
  ASSIGN_OR_RETURN(Tensor dx, up_proj_->Backward(dh));
  pre_act_ = silu_ = Tensor();
  return dx;
}

std::vector<ParameterShard> ParallelMLP::parameters() const {
  std::vector<ParameterShard> out = PrefixNames(
      options_.activation == MlpActivation::kSwiGLU ? "gate_up_proj" : "up_proj",
      up_proj_->parameters());
  for (auto& p : PrefixNames("down_proj", down_proj_->parameters())) {
    out.push_back(p);
  }
  return out;
}

std::vector<ParameterShard> ParallelMLP::grads() const {
  std::vector<ParameterShard> out = PrefixNames(
      options_.activation == MlpActivation::kSwiGLU ? "gate_up_proj" : "up_proj",
      up_proj_->grads());
  for (auto& p : PrefixNames("down_proj", down_proj_->grads())) out.push_back(p);
  return out;
}

void ParallelMLP::ZeroGrad() {
  up_proj_->ZeroGrad();
  down_proj_->ZeroGrad();
}

}  // namespace tp
