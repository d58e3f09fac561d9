#include "layers/attention.h"

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "layers/attention_core.h"
#include "runtime/init.h"
#include "runtime/ops.h"
#include "runtime/status_macros.h"

namespace tp {

absl::StatusOr<std::unique_ptr<ParallelSelfAttention>>
ParallelSelfAttention::Create(Communicator& comm, Options options) {
  const std::string& name = options.name;
  const int tp = comm.size();
  if (options.hidden <= 0 || options.num_heads <= 0 ||
      options.num_kv_heads < 0 || options.head_dim < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": hidden (", options.hidden, ") and num_heads (",
                     options.num_heads, ") must be positive, num_kv_heads (",
                     options.num_kv_heads, ") and head_dim (", options.head_dim,
                     ") non-negative"));
  }
  if (!IsFloatingPoint(options.dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": dtype ",
                                                   DTypeName(options.dtype),
                                                   " is not a floating dtype"));
  }
  const int64_t heads = options.num_heads;
  const int64_t kv = options.num_kv_heads == 0 ? heads : options.num_kv_heads;
  if (heads % kv != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": num_heads ", heads, " is not divisible by num_kv_heads ", kv));
  }
  if (kv % tp != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": num_kv_heads ", kv, " (num_heads ", heads,
                     ") is not divisible by the tensor-parallel size ", tp));
  }
  int64_t head_dim = options.head_dim;
  if (head_dim == 0) {
    if (options.hidden % heads != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          name, ": hidden ", options.hidden, " is not divisible by num_heads ",
          heads, "; set head_dim"));
    }
    head_dim = options.hidden / heads;
  }
  std::unique_ptr<ParallelSelfAttention> a(
      new ParallelSelfAttention(comm, std::move(options)));
  Options& o = a->options_;
  o.num_kv_heads = kv;
  o.head_dim = head_dim;
  a->head_dim_ = head_dim;
  a->local_heads_ = heads / tp;
  a->local_kv_heads_ = kv / tp;

  ColumnParallelLinear::Options qkv;
  qkv.in_features = o.hidden;
  qkv.out_features = (heads + 2 * kv) * head_dim;
  qkv.bias = o.bias;
  qkv.gather_output = false;
  qkv.sequence_parallel = o.sequence_parallel;
  qkv.dtype = o.dtype;
  qkv.weight_init = InitSpec::Normal(
      0.0, o.init_std, SeedFor(o.seed, o.name + ".qkv_proj.weight"));
  qkv.name = o.name + ".qkv_proj";
  ASSIGN_OR_RETURN(a->qkv_proj_, ColumnParallelLinear::Create(comm, qkv));

  RowParallelLinear::Options out;
  out.in_features = heads * head_dim;
  out.out_features = o.hidden;
  out.bias = o.bias;
  out.input_is_parallel = true;
  out.sequence_parallel = o.sequence_parallel;
  out.dtype = o.dtype;
  out.weight_init = InitSpec::Normal(
      0.0, o.init_std, SeedFor(o.seed, o.name + ".o_proj.weight"));
  out.name = o.name + ".o_proj";
  ASSIGN_OR_RETURN(a->o_proj_, RowParallelLinear::Create(comm, out));
  return a;
}

absl::StatusOr<Tensor> ParallelSelfAttention::Forward(const Tensor& x,
                                                      const TokenLayout& layout,
                                                      KVCache* cache) {
  const Options& o = options_;
  const int tp = comm_.size();
  if (!x.defined() || x.ndim() != 2 || x.dim(1) != o.hidden) {
    return absl::InvalidArgumentError(absl::StrCat(
        o.name, ": input must be [tokens, hidden = ", o.hidden, "], got ",
        x.defined() ? ShapeToString(x.shape()) : "undefined"));
  }
  if (x.dtype() != o.dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat(o.name, ": input dtype is ", DTypeName(x.dtype()),
                     ", the layer's is ", DTypeName(o.dtype)));
  }
  const int64_t rows = x.dim(0) * (o.sequence_parallel ? tp : 1);
  if (layout.batch < 1 || layout.seq < 1 || layout.tokens() != rows) {
    return absl::InvalidArgumentError(absl::StrCat(
        o.name, ": layout batch ", layout.batch, " x seq ", layout.seq,
        " does not match the input's ", rows, " rows",
        o.sequence_parallel
            ? absl::StrCat(" (", x.dim(0), " per rank x tp ", tp, ")")
            : ""));
  }
  const int64_t b = layout.batch, s = layout.seq, d = head_dim_;
  const int64_t kv = local_kv_heads_, g = local_heads_ / local_kv_heads_;
  if (cache != nullptr) {
    absl::Status fits = attention_core::CheckCache(*cache, b, kv, d, o.dtype);
    if (!fits.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(o.name, ": ", fits.message()));
    }
  }

  // From here on the previous Forward's activations are stale.
  has_forward_ = false;
  saved_ = attention_core::Saved();
  ASSIGN_OR_RETURN(Tensor qkv, qkv_proj_->Forward(x));  // [T, kv (g+2) d]
  ASSIGN_OR_RETURN(qkv, qkv.Reshape({b, s, kv, g + 2, d}));
  ASSIGN_OR_RETURN(Tensor qv, qkv.Narrow(3, 0, g));
  ASSIGN_OR_RETURN(Tensor kview, qkv.Narrow(3, g, 1));
  ASSIGN_OR_RETURN(Tensor vview, qkv.Narrow(3, g + 1, 1));
  if (cache != nullptr) {
    auto r = attention_core::ForwardCached(qv, kview, vview, *cache);
    if (!r.ok()) {
      return absl::Status(r.status().code(),
                          absl::StrCat(o.name, ": ", r.status().message()));
    }
    ASSIGN_OR_RETURN(Tensor y, o_proj_->Forward(r->ctx));
    *cache = std::move(r->next_cache);  // the step succeeded
    return y;
  }
  ASSIGN_OR_RETURN(attention_core::ForwardResult r,
                   attention_core::Forward(qv, kview, vview));
  ASSIGN_OR_RETURN(Tensor y, o_proj_->Forward(r.ctx));
  layout_ = layout;
  saved_ = std::move(r.saved);
  has_forward_ = true;
  return y;
}

absl::StatusOr<Tensor> ParallelSelfAttention::Backward(const Tensor& grad_out) {
  const Options& o = options_;
  if (!has_forward_) {
    return absl::FailedPreconditionError(absl::StrCat(
        o.name,
        ": Backward without a preceding Forward (a Forward with a KV "
        "cache does not prepare one)"));
  }
  const int64_t b = layout_.batch, s = layout_.seq, d = head_dim_;
  const int64_t kv = local_kv_heads_, g = local_heads_ / local_kv_heads_;
  ASSIGN_OR_RETURN(Tensor dctx, o_proj_->Backward(grad_out));  // [T, h d]
  ASSIGN_OR_RETURN(attention_core::Grads grads,
                   attention_core::Backward(dctx, saved_));
  ASSIGN_OR_RETURN(Tensor dqkv, ops::Concat({grads.dq, grads.dk, grads.dv}, 3));
  ASSIGN_OR_RETURN(dqkv, dqkv.Reshape({b * s, kv * (g + 2) * d}));
  ASSIGN_OR_RETURN(Tensor dx, qkv_proj_->Backward(dqkv));
  has_forward_ = false;
  saved_ = attention_core::Saved();
  return dx;
}

std::vector<ParameterShard> ParallelSelfAttention::parameters() const {
  std::vector<ParameterShard> out =
      PrefixNames("qkv_proj", qkv_proj_->parameters());
  for (auto& p : PrefixNames("o_proj", o_proj_->parameters())) out.push_back(p);
  return out;
}

std::vector<ParameterShard> ParallelSelfAttention::grads() const {
  std::vector<ParameterShard> out = PrefixNames("qkv_proj", qkv_proj_->grads());
  for (auto& p : PrefixNames("o_proj", o_proj_->grads())) out.push_back(p);
  return out;
}

void ParallelSelfAttention::ZeroGrad() {
  qkv_proj_->ZeroGrad();
  o_proj_->ZeroGrad();
}

}  // namespace tp
