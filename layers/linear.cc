#include "layers/linear.h"

#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "layers/mappings.h"
#include "runtime/ops.h"
#include "runtime/status_macros.h"

namespace tp {
namespace internal_linear {

// Prefixes a non-OK status with the layer name, keeping its code.
absl::Status Annotate(const absl::Status& s, absl::string_view layer) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(layer, ": ", s.message()));
}

absl::Status CheckCommon(absl::string_view layer, int64_t in, int64_t out,
                         DType dtype, const Communicator& comm) {
  if (in <= 0 || out <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(layer, ": in_features (", in,
                                                   ") and out_features (", out,
                                                   ") must be positive"));
  }
  if (!IsFloatingPoint(dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(
        layer, ": dtype ", DTypeName(dtype), " is not a floating dtype"));
  }
  if (comm.size() < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(layer, ": communicator size ", comm.size(), " < 1"));
  }
  return absl::OkStatus();
}

// Checks x against the expected dtype and last dimension and returns it
// flattened to [rows, features] (a view when x is contiguous).
absl::StatusOr<Tensor> FlattenInput(absl::string_view layer,
                                    absl::string_view what, const Tensor& x,
                                    int64_t features, DType dtype) {
  if (!x.defined()) {
    return absl::InvalidArgumentError(
        absl::StrCat(layer, ": ", what, " is undefined"));
  }
  if (x.dtype() != dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat(layer, ": ", what, " dtype is ", DTypeName(x.dtype()),
                     ", the layer's is ", DTypeName(dtype)));
  }
  if (x.ndim() < 1 || x.dim(-1) != features) {
    return absl::InvalidArgumentError(
        absl::StrCat(layer, ": ", what, " shape ", ShapeToString(x.shape()),
                     " must end in ", features, " features"));
  }
  const int64_t rows = x.numel() / features;
  return x.Contiguous().Reshape({rows, features});
}

// x's shape with the last dimension replaced.
Shape WithLastDim(Shape shape, int64_t last) {
  shape.back() = last;
  return shape;
}

absl::Status CheckGradShape(absl::string_view layer, const Tensor& grad,
                            const Shape& expected, DType dtype) {
  if (!grad.defined()) {
    return absl::InvalidArgumentError(
        absl::StrCat(layer, ": grad_out is undefined"));
  }
  if (grad.dtype() != dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat(layer, ": grad_out dtype is ", DTypeName(grad.dtype()),
                     ", the layer's is ", DTypeName(dtype)));
  }
  if (grad.shape() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        layer, ": grad_out shape ", ShapeToString(grad.shape()),
        " differs from the forward output shape ", ShapeToString(expected)));
  }
  return absl::OkStatus();
}

// Zeroes a contiguous tensor this library allocated (all-zero bits are 0 in
// every dtype).
void ZeroFill(Tensor& t) {
  if (t.defined() && t.numel() > 0) std::memset(t.raw_data(), 0, t.nbytes());
}

// Accumulates the gradients of y = x W^T (+ b) from dy [rows, out] and
// x [rows, in] into weight_grad [out, in] (and bias_grad [out]). The bias
// gradient is computed before anything is written, so an error leaves both
// as they were.
absl::Status AccumulateLinearGrads(const Tensor& dy, const Tensor& x,
                                   Tensor& weight_grad, Tensor* bias_grad) {
  Tensor db;
  if (bias_grad != nullptr) {
    ASSIGN_OR_RETURN(db, ops::BiasGrad(dy));
  }
  RETURN_IF_ERROR(
      ops::MatMulInto(dy, x, weight_grad, /*trans_a=*/true, false, 1.0, 1.0));
  if (bias_grad != nullptr) RETURN_IF_ERROR(ops::AddInPlace(*bias_grad, db));
  return absl::OkStatus();
}

// Whether Forward fuses the bias into the GEMM: for float32/float64, whose
// GEMM accumulates in place. fp16/bf16 GEMMs go through float32 buffers, so
// there a fused bias would cost more passes than a separate AddBias.
bool FusesBias(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat64;
}

// x [rows, in] times weight [out, in] transposed, plus `fused_bias` [out]
// when given: the output starts as the bias in every row and the product is
// accumulated onto it (beta = 1), with no separate AddBias pass and no
// second output. Callers pass a bias only where FusesBias holds.
absl::StatusOr<Tensor> LinearProduct(const Tensor& x, const Tensor& weight,
                                     const Tensor* fused_bias) {
  if (fused_bias == nullptr) return ops::MatMul(x, weight, false, true);
  const Tensor b = fused_bias->Contiguous();
  Tensor y = Tensor::Empty({x.dim(0), b.dim(0)}, b.dtype());
  const size_t row_bytes = b.nbytes();
  char* dst = static_cast<char*>(y.raw_data());
  for (int64_t r = 0; row_bytes > 0 && r < x.dim(0); ++r) {
    std::memcpy(dst + static_cast<size_t>(r) * row_bytes, b.raw_data(),
                row_bytes);
  }
  RETURN_IF_ERROR(ops::MatMulInto(x, weight, y, false, true, 1.0, 1.0));
  return y;
}

}  // namespace internal_linear

using internal_linear::AccumulateLinearGrads;
using internal_linear::Annotate;
using internal_linear::CheckCommon;
using internal_linear::CheckGradShape;
using internal_linear::FlattenInput;
using internal_linear::FusesBias;
using internal_linear::LinearProduct;
using internal_linear::WithLastDim;
using internal_linear::ZeroFill;

// ---------------------------------------------------------------------------
// ColumnParallelLinear
// ---------------------------------------------------------------------------

ColumnParallelLinear::ColumnParallelLinear(Communicator& comm, Options options)
    : comm_(comm), options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<ColumnParallelLinear>>
ColumnParallelLinear::Create(Communicator& comm, Options options) {
  const std::string& name = options.name;
  RETURN_IF_ERROR(CheckCommon(name, options.in_features, options.out_features,
                              options.dtype, comm));
  const int tp = comm.size();
  if (options.out_features % tp != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": out_features ", options.out_features,
                     " is not divisible by the tensor-parallel size ", tp));
  }
  if (options.sequence_parallel && options.gather_output) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": sequence_parallel requires gather_output = false"));
  }
  std::unique_ptr<ColumnParallelLinear> layer(
      new ColumnParallelLinear(comm, std::move(options)));
  const Options& o = layer->options_;
  layer->local_out_ = o.out_features / tp;
  layer->out_offset_ = comm.rank() * layer->local_out_;
  auto w = InitShard(o.weight_init, {o.out_features, o.in_features}, 0,
                     layer->out_offset_, layer->local_out_, o.dtype);
  RETURN_IF_ERROR(Annotate(w.status(), absl::StrCat(o.name, ".weight")));
  layer->weight_ = *std::move(w);
  layer->weight_grad_ = Tensor::Zeros(layer->weight_.shape(), o.dtype);
  if (o.bias) {
    auto b = InitShard(o.bias_init, {o.out_features}, 0, layer->out_offset_,
                       layer->local_out_, o.dtype);
    RETURN_IF_ERROR(Annotate(b.status(), absl::StrCat(o.name, ".bias")));
    layer->bias_ = *std::move(b);
    layer->bias_grad_ = Tensor::Zeros(layer->bias_.shape(), o.dtype);
  }
  return layer;
}

absl::StatusOr<Tensor> ColumnParallelLinear::Forward(const Tensor& x) {
  const Options& o = options_;
  // Validate before any communication so that a bad input fails alike on
  // every rank without a collective.
  RETURN_IF_ERROR(
      FlattenInput(o.name, "input", x, o.in_features, o.dtype).status());
  if (o.sequence_parallel && comm_.size() > 1 && x.ndim() < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        o.name,
        ": sequence_parallel needs an input of rank >= 2 split along "
        "dim 0; got shape ",
        ShapeToString(x.shape())));
  }
  Tensor full_x = x;
  if (o.sequence_parallel) {
    auto gathered = GatherFromSequenceParallel::Forward(comm_, x);
    RETURN_IF_ERROR(Annotate(gathered.status(), o.name));
    full_x = *std::move(gathered);
  }
  ASSIGN_OR_RETURN(Tensor flat, FlattenInput(o.name, "input", full_x,
                                             o.in_features, o.dtype));
  const bool add_bias = o.bias && !o.skip_bias_add;
  const bool fuse_bias = add_bias && FusesBias(o.dtype);
  ASSIGN_OR_RETURN(Tensor y,
                   LinearProduct(flat, weight_, fuse_bias ? &bias_ : nullptr));
  if (add_bias && !fuse_bias) {
    ASSIGN_OR_RETURN(y, ops::AddBias(y, bias_));
  }
  Shape out_shape = WithLastDim(full_x.shape(), local_out_);
  ASSIGN_OR_RETURN(y, y.Reshape(out_shape));
  if (o.gather_output) {
    auto gathered = GatherFromTensorParallel::Forward(comm_, y);
    RETURN_IF_ERROR(Annotate(gathered.status(), o.name));
    y = *std::move(gathered);
  }
  cached_input_ = flat;
  cached_in_shape_ = x.shape();
  pending_grad_ = Tensor();
  return y;
}

absl::StatusOr<std::pair<Tensor, Tensor>> ColumnParallelLinear::LocalInputGrad(
    const Tensor& grad_out) {
  const Options& o = options_;
  pending_grad_ = Tensor();
  if (!cached_input_.defined()) {
    return absl::FailedPreconditionError(
        absl::StrCat(o.name, ": Backward without a preceding Forward"));
  }
  Shape gathered_in_shape = cached_in_shape_;
  gathered_in_shape[0] *= o.sequence_parallel ? comm_.size() : 1;
  const Shape out_shape = WithLastDim(
      gathered_in_shape, o.gather_output ? o.out_features : local_out_);
  RETURN_IF_ERROR(CheckGradShape(o.name, grad_out, out_shape, o.dtype));

  Tensor g = grad_out;
  if (o.gather_output) {
    auto own = GatherFromTensorParallel::Backward(comm_, grad_out);
    RETURN_IF_ERROR(Annotate(own.status(), o.name));
    g = *std::move(own);
  }
  const int64_t rows = cached_input_.dim(0);
  ASSIGN_OR_RETURN(Tensor g2, g.Contiguous().Reshape({rows, local_out_}));
  ASSIGN_OR_RETURN(Tensor dx, ops::MatMul(g2, weight_));  // [rows, in]
  ASSIGN_OR_RETURN(dx, dx.Reshape(gathered_in_shape));
  return std::make_pair(std::move(g2), std::move(dx));
}

absl::StatusOr<Tensor> ColumnParallelLinear::Backward(const Tensor& grad_out) {
  const Options& o = options_;
  ASSIGN_OR_RETURN(auto local, LocalInputGrad(grad_out));
  auto& [g2, dx] = local;
  if (o.sequence_parallel) {
    auto rs = GatherFromSequenceParallel::Backward(comm_, dx);
    RETURN_IF_ERROR(Annotate(rs.status(), o.name));
    dx = *std::move(rs);
  } else if (comm_.size() > 1) {
    // dx is ours: reduce in place rather than through a copying mapping.
    RETURN_IF_ERROR(Annotate(comm_.AllReduce(dx, ReduceOp::kSum), o.name));
  }
  // Every collective succeeded: commit the gradients.
  RETURN_IF_ERROR(AccumulateLinearGrads(g2, cached_input_, weight_grad_,
                                        o.bias ? &bias_grad_ : nullptr));
  cached_input_ = Tensor();
  return std::move(dx);
}

absl::StatusOr<Tensor> ColumnParallelLinear::BackwardPartial(
    const Tensor& grad_out) {
  if (options_.sequence_parallel) {
    return absl::InvalidArgumentError(absl::StrCat(
        options_.name,
        ": BackwardPartial needs sequence_parallel = false (the input "
        "gradient is reduce-scattered, use Backward)"));
  }
  ASSIGN_OR_RETURN(auto local, LocalInputGrad(grad_out));
  pending_grad_ = std::move(local.first);
  return std::move(local.second);
}

absl::Status ColumnParallelLinear::CommitBackward() {
  if (!pending_grad_.defined() || !cached_input_.defined()) {
    return absl::FailedPreconditionError(absl::StrCat(
        options_.name, ": CommitBackward without a pending BackwardPartial"));
  }
  RETURN_IF_ERROR(AccumulateLinearGrads(pending_grad_, cached_input_,
                                        weight_grad_,
                                        options_.bias ? &bias_grad_ : nullptr));
  pending_grad_ = Tensor();
  cached_input_ = Tensor();
  return absl::OkStatus();
}

std::vector<ParameterShard> ColumnParallelLinear::parameters() const {
  std::vector<ParameterShard> out;
  out.push_back({"weight",
                 weight_,
                 {options_.out_features, options_.in_features},
                 0,
                 out_offset_});
  if (options_.bias) {
    out.push_back({"bias", bias_, {options_.out_features}, 0, out_offset_});
  }
  return out;
}

std::vector<ParameterShard> ColumnParallelLinear::grads() const {
  std::vector<ParameterShard> out = parameters();
  out[0].tensor = weight_grad_;
  if (options_.bias) out[1].tensor = bias_grad_;
  return out;
}

void ColumnParallelLinear::ZeroGrad() {
  ZeroFill(weight_grad_);
  ZeroFill(bias_grad_);
}

// ---------------------------------------------------------------------------
// RowParallelLinear
// ---------------------------------------------------------------------------

RowParallelLinear::RowParallelLinear(Communicator& comm, Options options)
    : comm_(comm), options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<RowParallelLinear>> RowParallelLinear::Create(
    Communicator& comm, Options options) {
  const std::string& name = options.name;
  RETURN_IF_ERROR(CheckCommon(name, options.in_features, options.out_features,
                              options.dtype, comm));
  const int tp = comm.size();
  if (options.in_features % tp != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": in_features ", options.in_features,
                     " is not divisible by the tensor-parallel size ", tp));
  }
  if (options.sequence_parallel && !options.input_is_parallel) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": sequence_parallel requires input_is_parallel = true"));
  }
  std::unique_ptr<RowParallelLinear> layer(
      new RowParallelLinear(comm, std::move(options)));
  const Options& o = layer->options_;
  layer->local_in_ = o.in_features / tp;
  layer->in_offset_ = comm.rank() * layer->local_in_;
  auto w = InitShard(o.weight_init, {o.out_features, o.in_features}, 1,
                     layer->in_offset_, layer->local_in_, o.dtype);
  RETURN_IF_ERROR(Annotate(w.status(), absl::StrCat(o.name, ".weight")));
  layer->weight_ = *std::move(w);
  layer->weight_grad_ = Tensor::Zeros(layer->weight_.shape(), o.dtype);
  if (o.bias) {
    auto b = InitTensor(o.bias_init, {o.out_features}, o.dtype);
    RETURN_IF_ERROR(Annotate(b.status(), absl::StrCat(o.name, ".bias")));
    layer->bias_ = *std::move(b);
    layer->bias_grad_ = Tensor::Zeros(layer->bias_.shape(), o.dtype);
  }
  return layer;
}

absl::StatusOr<Tensor> RowParallelLinear::Forward(const Tensor& x) {
  const Options& o = options_;
  const int64_t expected_in = o.input_is_parallel ? local_in_ : o.in_features;
  RETURN_IF_ERROR(
      FlattenInput(o.name, "input", x, expected_in, o.dtype).status());
  if (o.sequence_parallel && comm_.size() > 1 &&
      (x.ndim() < 2 || x.dim(0) % comm_.size() != 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        o.name,
        ": sequence_parallel needs an input of rank >= 2 whose dim 0 "
        "divides by the tensor-parallel size ",
        comm_.size(), "; got shape ", ShapeToString(x.shape())));
  }
  Tensor xl = x;
  if (!o.input_is_parallel) {
    auto own = ScatterToTensorParallel::Forward(comm_, x);
    RETURN_IF_ERROR(Annotate(own.status(), o.name));
    xl = *std::move(own);
  }
  ASSIGN_OR_RETURN(Tensor flat,
                   FlattenInput(o.name, "input", xl, local_in_, o.dtype));
  // With one rank there is no reduction to add the bias after: fuse it into
  // the GEMM as the column layer does.
  const bool add_bias = o.bias && !o.skip_bias_add;
  const bool fuse_bias = add_bias && comm_.size() == 1 && FusesBias(o.dtype);
  ASSIGN_OR_RETURN(Tensor y,
                   LinearProduct(flat, weight_, fuse_bias ? &bias_ : nullptr));
  ASSIGN_OR_RETURN(y, y.Reshape(WithLastDim(x.shape(), o.out_features)));
  if (o.sequence_parallel) {
    auto rs = ReduceScatterToSequenceParallel::Forward(comm_, y);
    RETURN_IF_ERROR(Annotate(rs.status(), o.name));
    y = *std::move(rs);
  } else if (comm_.size() > 1) {
    RETURN_IF_ERROR(Annotate(comm_.AllReduce(y, ReduceOp::kSum), o.name));
  }
  if (add_bias && !fuse_bias) {
    ASSIGN_OR_RETURN(y, ops::AddBias(y, bias_));
  }
  cached_input_ = flat;
  cached_in_shape_ = x.shape();
  return y;
}

absl::StatusOr<Tensor> RowParallelLinear::Backward(const Tensor& grad_out) {
  const Options& o = options_;
  if (!cached_input_.defined()) {
    return absl::FailedPreconditionError(
        absl::StrCat(o.name, ": Backward without a preceding Forward"));
  }
  Shape full_out_shape = WithLastDim(cached_in_shape_, o.out_features);
  Shape out_shape = full_out_shape;
  if (o.sequence_parallel) out_shape[0] /= comm_.size();
  RETURN_IF_ERROR(CheckGradShape(o.name, grad_out, out_shape, o.dtype));

  Tensor g = grad_out;
  if (o.sequence_parallel) {
    auto gathered = ReduceScatterToSequenceParallel::Backward(comm_, grad_out);
    RETURN_IF_ERROR(Annotate(gathered.status(), o.name));
    g = *std::move(gathered);
  }
  const int64_t rows = cached_input_.dim(0);
  ASSIGN_OR_RETURN(Tensor g2, g.Contiguous().Reshape({rows, o.out_features}));
  ASSIGN_OR_RETURN(Tensor dx, ops::MatMul(g2, weight_));  // [rows, in/tp]
  ASSIGN_OR_RETURN(dx, dx.Reshape(WithLastDim(cached_in_shape_, local_in_)));
  if (!o.input_is_parallel) {
    auto gathered = ScatterToTensorParallel::Backward(comm_, dx);
    RETURN_IF_ERROR(Annotate(gathered.status(), o.name));
    dx = *std::move(gathered);
  }
  // Every collective succeeded: commit the gradients.
  RETURN_IF_ERROR(AccumulateLinearGrads(g2, cached_input_, weight_grad_,
                                        o.bias ? &bias_grad_ : nullptr));
  cached_input_ = Tensor();
  return dx;
}

std::vector<ParameterShard> RowParallelLinear::parameters() const {
  std::vector<ParameterShard> out;
  out.push_back({"weight",
                 weight_,
                 {options_.out_features, options_.in_features},
                 1,
                 in_offset_});
  if (options_.bias) {
    out.push_back({"bias", bias_, {options_.out_features}, -1, 0});
  }
  return out;
}

std::vector<ParameterShard> RowParallelLinear::grads() const {
  std::vector<ParameterShard> out = parameters();
  out[0].tensor = weight_grad_;
  if (options_.bias) out[1].tensor = bias_grad_;
  return out;
}

void RowParallelLinear::ZeroGrad() {
  ZeroFill(weight_grad_);
  ZeroFill(bias_grad_);
}

}  // namespace tp
