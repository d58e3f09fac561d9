#include "layers/optimizer.h"

#include <cmath>
#include <cstring>
#include <map>
#include <type_traits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/dtype.h"
#include "runtime/ops.h"
#include "runtime/status_macros.h"

namespace tp {
namespace {

// float64 state for float64 parameters, float32 for the other float types.
DType StateDType(DType param) {
  return param == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
}

double SumOfSquares(const Tensor& t) {
  return DispatchDType(t.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* p = t.data<T>();
    double s = 0.0;
    for (int64_t i = 0; i < t.numel(); ++i) {
      const double v = ElementToDouble(p[i]);
      s += v * v;
    }
    return s;
  });
}

void ScaleInPlace(Tensor& t, double c) {
  DispatchDType(t.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* p = t.data<T>();
    for (int64_t i = 0; i < t.numel(); ++i) {
      p[i] = ElementFromDouble<T>(ElementToDouble(p[i]) * c);
    }
  });
}

absl::Status CheckFinite(absl::string_view who, absl::string_view what,
                         double v, double min) {
  if (!std::isfinite(v) || v < min) {
    return absl::InvalidArgumentError(absl::StrCat(
        who, ": ", what, " = ", v, " must be finite and >= ", min));
  }
  return absl::OkStatus();
}

absl::Status CheckBeta(absl::string_view who, absl::string_view what,
                       double v) {
  if (!(v >= 0.0 && v < 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat(who, ": ", what, " = ", v, " must be in [0, 1)"));
  }
  return absl::OkStatus();
}

}  // namespace

// ---------------------------------------------------------------------------
// Optimizer
// ---------------------------------------------------------------------------

Optimizer::Optimizer(std::vector<ParameterShard> params,
                     std::vector<ParameterShard> grads, ParallelGroups groups,
                     double lr, double max_grad_norm)
    : params_(std::move(params)),
      grads_(std::move(grads)),
      groups_(groups),
      lr_(lr),
      max_grad_norm_(max_grad_norm) {}

absl::Status Optimizer::Validate(absl::string_view who,
                                 const std::vector<ParameterShard>& params,
                                 const std::vector<ParameterShard>& grads) {
  if (params.size() != grads.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(who, ": ", params.size(), " parameters but ",
                     grads.size(), " gradients"));
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const ParameterShard& p = params[i];
    const ParameterShard& g = grads[i];
    if (p.name != g.name) {
      return absl::InvalidArgumentError(
          absl::StrCat(who, ": parameter ", i, " is \"", p.name,
                       "\" but gradient ", i, " is \"", g.name, "\""));
    }
    if (!p.tensor.defined() || !g.tensor.defined()) {
      return absl::InvalidArgumentError(
          absl::StrCat(who, ": ", p.name, ": undefined parameter or gradient"));
    }
    if (!IsFloatingPoint(p.tensor.dtype())) {
      return absl::InvalidArgumentError(
          absl::StrCat(who, ": ", p.name, ": dtype ",
                       DTypeName(p.tensor.dtype()), " is not floating"));
    }
    if (p.tensor.dtype() != g.tensor.dtype() ||
        p.tensor.shape() != g.tensor.shape()) {
      return absl::InvalidArgumentError(absl::StrCat(
          who, ": ", p.name, ": parameter ", ShapeToString(p.tensor.shape()),
          " ", DTypeName(p.tensor.dtype()), " but gradient ",
          ShapeToString(g.tensor.shape()), " ", DTypeName(g.tensor.dtype())));
    }
    if (!p.tensor.device().is_cpu() || !p.tensor.is_contiguous() ||
        !g.tensor.is_contiguous()) {
      return absl::InvalidArgumentError(
          absl::StrCat(who, ": ", p.name,
                       ": parameter and gradient must be contiguous CPU "
                       "tensors"));
    }
    if (p.tensor.SharesStorageWith(g.tensor)) {
      return absl::InvalidArgumentError(absl::StrCat(
          who, ": ", p.name, ": parameter and gradient share storage"));
    }
    if (p.full_shape != g.full_shape || p.split_dim != g.split_dim ||
        p.offset != g.offset) {
      return absl::InvalidArgumentError(absl::StrCat(
          who, ": ", p.name,
          ": parameter and gradient shard metadata differ"));
    }
  }
  return absl::OkStatus();
}

absl::Status Optimizer::set_lr(double lr) {
  RETURN_IF_ERROR(CheckFinite("Optimizer::set_lr", "lr", lr, 0.0));
  lr_ = lr;
  return absl::OkStatus();
}

void Optimizer::ZeroGrad() {
  for (ParameterShard& g : grads_) {
    if (g.tensor.numel() > 0) std::memset(g.tensor.raw_data(), 0, g.tensor.nbytes());
  }
}

absl::Status Optimizer::Step() {
  const size_t n = grads_.size();
  // 1. Data-parallel average into flat per-dtype buffers (the gradients
  //    themselves are written only after every collective succeeded).
  std::vector<Tensor> final_grads(n);
  Communicator* dp = groups_.data_parallel;
  const bool average = dp != nullptr && dp->size() > 1;
  if (average) {
    std::map<DType, std::vector<size_t>> by_dtype;
    for (size_t i = 0; i < n; ++i) by_dtype[grads_[i].tensor.dtype()].push_back(i);
    for (const auto& [dtype, indices] : by_dtype) {
      std::vector<Tensor> pieces;
      pieces.reserve(indices.size());
      for (size_t i : indices) {
        ASSIGN_OR_RETURN(Tensor flat, grads_[i].tensor.Reshape({-1}));
        pieces.push_back(std::move(flat));
      }
      ASSIGN_OR_RETURN(Tensor buffer, ops::Concat(pieces, 0));
      RETURN_IF_ERROR(dp->AllReduce(buffer, ReduceOp::kAvg));
      int64_t offset = 0;
      for (size_t i : indices) {
        const Tensor& g = grads_[i].tensor;
        ASSIGN_OR_RETURN(Tensor slice, buffer.Narrow(0, offset, g.numel()));
        ASSIGN_OR_RETURN(final_grads[i], slice.Reshape(g.shape()));
        offset += g.numel();
      }
    }
  } else {
    for (size_t i = 0; i < n; ++i) final_grads[i] = grads_[i].tensor;
  }

  // 2. Global norm: sharded squares summed over TP, replicated ones once.
  double sq_sharded = 0.0, sq_replicated = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double s = SumOfSquares(final_grads[i]);
    if (grads_[i].replicated()) {
      sq_replicated += s;
    } else {
      sq_sharded += s;
    }
  }
  Communicator* tpc = groups_.tensor_parallel;
  if (tpc != nullptr && tpc->size() > 1) {
    Tensor t = Tensor::Full({1}, sq_sharded, DType::kFloat64);
    RETURN_IF_ERROR(tpc->AllReduce(t, ReduceOp::kSum));
    sq_sharded = t.data<double>()[0];
  }
  const double norm = std::sqrt(sq_sharded + sq_replicated);

  // Every collective succeeded: commit.
  if (average) {
    for (size_t i = 0; i < n; ++i) {
      RETURN_IF_ERROR(grads_[i].tensor.CopyFrom(final_grads[i]));
    }
  }
  // 3. Clipping.
  if (max_grad_norm_ > 0.0 && norm > max_grad_norm_) {
    const double coef = max_grad_norm_ / (norm + 1e-6);
    for (size_t i = 0; i < n; ++i) ScaleInPlace(grads_[i].tensor, coef);
  }
  // 4. Updates.
  ++step_;
  for (size_t i = 0; i < n; ++i) Update(i, step_);
  last_grad_norm_ = norm;
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// SGD
// ---------------------------------------------------------------------------

SGD::SGD(std::vector<ParameterShard> params, std::vector<ParameterShard> grads,
         SGDOptions options, ParallelGroups groups)
    : Optimizer(std::move(params), std::move(grads), groups, options.lr,
                options.max_grad_norm),
      options_(options) {}

absl::StatusOr<std::unique_ptr<SGD>> SGD::Create(
    std::vector<ParameterShard> params, std::vector<ParameterShard> grads,
    SGDOptions options, ParallelGroups groups) {
  RETURN_IF_ERROR(CheckFinite("SGD", "lr", options.lr, 0.0));
  RETURN_IF_ERROR(CheckBeta("SGD", "momentum", options.momentum));
  RETURN_IF_ERROR(CheckFinite("SGD", "weight_decay", options.weight_decay, 0.0));
  if (std::isnan(options.max_grad_norm)) {
    return absl::InvalidArgumentError("SGD: max_grad_norm is NaN");
  }
  RETURN_IF_ERROR(Validate("SGD", params, grads));
  std::unique_ptr<SGD> sgd(
      new SGD(std::move(params), std::move(grads), options, groups));
  if (options.momentum > 0.0) {
    for (const ParameterShard& p : sgd->params_) {
      sgd->momentum_.push_back(
          Tensor::Zeros(p.tensor.shape(), StateDType(p.tensor.dtype())));
    }
  }
  return sgd;
}

void SGD::Update(size_t i, int64_t step) {
  Tensor& param = params_[i].tensor;
  const Tensor& grad = grads_[i].tensor;
  const double lr = this->lr(), mu = options_.momentum,
               wd = options_.weight_decay;
  DispatchDType(param.dtype(), [&](auto tag) {
    using T = decltype(tag);
    using S = std::conditional_t<std::is_same_v<T, double>, double, float>;
    T* p = param.data<T>();
    const T* g = grad.data<T>();
    S* buf = momentum_.empty() ? nullptr : momentum_[i].data<S>();
    for (int64_t j = 0; j < param.numel(); ++j) {
      const double pj = ElementToDouble(p[j]);
      double d = ElementToDouble(g[j]) + wd * pj;
      if (buf != nullptr) {
        d = step == 1 ? d : mu * static_cast<double>(buf[j]) + d;
        buf[j] = static_cast<S>(d);
      }
      p[j] = ElementFromDouble<T>(pj - lr * d);
    }
  });
}

std::vector<ParameterShard> SGD::state() const {
  std::vector<ParameterShard> out;
  for (size_t i = 0; i < momentum_.size(); ++i) {
    ParameterShard s = params_[i];
    s.name += ".momentum_buffer";
    s.tensor = momentum_[i];
    out.push_back(std::move(s));
  }
  return out;
}

// ---------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------

AdamW::AdamW(std::vector<ParameterShard> params,
             std::vector<ParameterShard> grads, AdamWOptions options,
             ParallelGroups groups)
    : Optimizer(std::move(params), std::move(grads), groups, options.lr,
                options.max_grad_norm),
      options_(options) {}

absl::StatusOr<std::unique_ptr<AdamW>> AdamW::Create(
    std::vector<ParameterShard> params, std::vector<ParameterShard> grads,
    AdamWOptions options, ParallelGroups groups) {
  RETURN_IF_ERROR(CheckFinite("AdamW", "lr", options.lr, 0.0));
  RETURN_IF_ERROR(CheckBeta("AdamW", "beta1", options.beta1));
  RETURN_IF_ERROR(CheckBeta("AdamW", "beta2", options.beta2));
  if (!(options.eps > 0.0) || !std::isfinite(options.eps)) {
    return absl::InvalidArgumentError(
        absl::StrCat("AdamW: eps = ", options.eps, " must be finite and > 0"));
  }
  RETURN_IF_ERROR(
      CheckFinite("AdamW", "weight_decay", options.weight_decay, 0.0));
  if (std::isnan(options.max_grad_norm)) {
    return absl::InvalidArgumentError("AdamW: max_grad_norm is NaN");
  }
  RETURN_IF_ERROR(Validate("AdamW", params, grads));
  std::unique_ptr<AdamW> adam(
      new AdamW(std::move(params), std::move(grads), options, groups));
  for (const ParameterShard& p : adam->params_) {
    const DType s = StateDType(p.tensor.dtype());
    adam->exp_avg_.push_back(Tensor::Zeros(p.tensor.shape(), s));
    adam->exp_avg_sq_.push_back(Tensor::Zeros(p.tensor.shape(), s));
  }
  return adam;
}

void AdamW::Update(size_t i, int64_t step) {
  Tensor& param = params_[i].tensor;
  const Tensor& grad = grads_[i].tensor;
  const double lr = this->lr(), b1 = options_.beta1, b2 = options_.beta2;
  const double eps = options_.eps, wd = options_.weight_decay;
  const double bc1 = 1.0 - std::pow(b1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(b2, static_cast<double>(step));
  const double step_size = lr / bc1;
  const double sqrt_bc2 = std::sqrt(bc2);
  DispatchDType(param.dtype(), [&](auto tag) {
    using T = decltype(tag);
    using S = std::conditional_t<std::is_same_v<T, double>, double, float>;
    T* p = param.data<T>();
    const T* g = grad.data<T>();
    S* m = exp_avg_[i].data<S>();
    S* v = exp_avg_sq_[i].data<S>();
    for (int64_t j = 0; j < param.numel(); ++j) {
      const double gj = ElementToDouble(g[j]);
      double pj = ElementToDouble(p[j]) * (1.0 - lr * wd);
      const double mj = b1 * static_cast<double>(m[j]) + (1.0 - b1) * gj;
      const double vj = b2 * static_cast<double>(v[j]) + (1.0 - b2) * gj * gj;
      m[j] = static_cast<S>(mj);
      v[j] = static_cast<S>(vj);
      pj -= step_size * mj / (std::sqrt(vj) / sqrt_bc2 + eps);
      p[j] = ElementFromDouble<T>(pj);
    }
  });
}

std::vector<ParameterShard> AdamW::state() const {
  std::vector<ParameterShard> out;
  for (size_t i = 0; i < exp_avg_.size(); ++i) {
    ParameterShard m = params_[i];
    m.name += ".exp_avg";
    m.tensor = exp_avg_[i];
    out.push_back(std::move(m));
    ParameterShard v = params_[i];
    v.name += ".exp_avg_sq";
    v.tensor = exp_avg_sq_[i];
    out.push_back(std::move(v));
  }
  return out;
}

}  // namespace tp
