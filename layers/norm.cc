#include "layers/norm.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/ops.h"
#include "runtime/status_macros.h"

namespace tp {
namespace {

absl::Status Annotate(const absl::Status& s, absl::string_view layer) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(layer, ": ", s.message()));
}

absl::Status CheckInput(const NormOptions& o, absl::string_view what,
                        const Tensor& x) {
  if (!x.defined()) {
    return absl::InvalidArgumentError(
        absl::StrCat(o.name, ": ", what, " is undefined"));
  }
  if (x.dtype() != o.dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat(o.name, ": ", what, " dtype is ", DTypeName(x.dtype()),
                     ", the layer's is ", DTypeName(o.dtype)));
  }
  if (x.ndim() < 1 || x.dim(-1) != o.hidden) {
    return absl::InvalidArgumentError(
        absl::StrCat(o.name, ": ", what, " shape ", ShapeToString(x.shape()),
                     " must end in hidden = ", o.hidden));
  }
  return absl::OkStatus();
}

}  // namespace

absl::string_view NormKindName(NormKind kind) {
  return kind == NormKind::kLayerNorm ? "layer_norm" : "rms_norm";
}

absl::StatusOr<std::unique_ptr<Norm>> Norm::Create(Communicator& comm,
                                                   Options options) {
  if (options.hidden <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        options.name, ": hidden (", options.hidden, ") must be positive"));
  }
  if (!(options.eps >= 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        options.name, ": eps (", options.eps, ") must be >= 0"));
  }
  if (!IsFloatingPoint(options.dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat(options.name, ": dtype ", DTypeName(options.dtype),
                     " is not a floating dtype"));
  }
  std::unique_ptr<Norm> n(new Norm(comm, std::move(options)));
  const Options& o = n->options_;
  n->weight_ = Tensor::Full({o.hidden}, 1.0, o.dtype);
  n->weight_grad_ = Tensor::Zeros({o.hidden}, o.dtype);
  if (o.kind == NormKind::kLayerNorm) {
    n->bias_ = Tensor::Zeros({o.hidden}, o.dtype);
    n->bias_grad_ = Tensor::Zeros({o.hidden}, o.dtype);
  }
  return n;
}

absl::StatusOr<Tensor> Norm::Forward(const Tensor& x) {
  const Options& o = options_;
  RETURN_IF_ERROR(CheckInput(o, "input", x));
  absl::StatusOr<ops::NormOutput> out =
      o.kind == NormKind::kLayerNorm
          ? ops::LayerNorm(x, weight_, bias_, o.eps)
          : ops::RMSNorm(x, weight_, o.eps);
  RETURN_IF_ERROR(Annotate(out.status(), o.name));
  cached_x_ = x;
  cached_mean_ = out->mean;
  cached_rstd_ = out->rstd;
  return std::move(out->y);
}

absl::StatusOr<Tensor> Norm::Backward(const Tensor& grad_out) {
  const Options& o = options_;
  if (!cached_x_.defined()) {
    return absl::FailedPreconditionError(
        absl::StrCat(o.name, ": Backward without a preceding Forward"));
  }
  RETURN_IF_ERROR(CheckInput(o, "grad_out", grad_out));
  if (grad_out.shape() != cached_x_.shape()) {
    return absl::InvalidArgumentError(absl::StrCat(
        o.name, ": grad_out shape ", ShapeToString(grad_out.shape()),
        " differs from the forward output shape ",
        ShapeToString(cached_x_.shape())));
  }
  absl::StatusOr<ops::NormGrads> g =
      o.kind == NormKind::kLayerNorm
          ? ops::LayerNormBackward(grad_out, cached_x_, weight_, cached_mean_,
                                   cached_rstd_)
          : ops::RMSNormBackward(grad_out, cached_x_, weight_, cached_rstd_);
  RETURN_IF_ERROR(Annotate(g.status(), o.name));
  Tensor dgamma = g->dgamma, dbeta = g->dbeta;
  if (o.sequence_parallel && comm_.size() > 1) {
    // One all-reduce for both vectors: [dgamma; dbeta].
    Tensor both = dgamma;  // owned: ops return fresh tensors
    if (o.kind == NormKind::kLayerNorm) {
      ASSIGN_OR_RETURN(both, ops::Concat({dgamma, dbeta}, 0));
    }
    RETURN_IF_ERROR(Annotate(comm_.AllReduce(both, ReduceOp::kSum), o.name));
    ASSIGN_OR_RETURN(dgamma, both.Narrow(0, 0, o.hidden));
    if (o.kind == NormKind::kLayerNorm) {
      ASSIGN_OR_RETURN(dbeta, both.Narrow(0, o.hidden, o.hidden));
    }
  }
  RETURN_IF_ERROR(ops::AddInPlace(weight_grad_, dgamma));
  if (o.kind == NormKind::kLayerNorm) {
    RETURN_IF_ERROR(ops::AddInPlace(bias_grad_, dbeta));
  }
  cached_x_ = Tensor();
  cached_mean_ = Tensor();
  cached_rstd_ = Tensor();
  return std::move(g->dx);
}

std::vector<ParameterShard> Norm::parameters() const {
  std::vector<ParameterShard> out;
  out.push_back({"weight", weight_, {options_.hidden}, -1, 0});
  if (bias_.defined()) out.push_back({"bias", bias_, {options_.hidden}, -1, 0});
  return out;
}

std::vector<ParameterShard> Norm::grads() const {
  std::vector<ParameterShard> out = parameters();
  out[0].tensor = weight_grad_;
  if (bias_.defined()) out[1].tensor = bias_grad_;
  return out;
}

void Norm::ZeroGrad() {
  for (Tensor* t : {&weight_grad_, &bias_grad_}) {
    if (t->defined() && t->numel() > 0) std::memset(t->raw_data(), 0, t->nbytes());
  }
}

}  // namespace tp
