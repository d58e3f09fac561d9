#include "layers/transformer_block.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/ops.h"
#include "runtime/status_macros.h"

namespace tp {

absl::StatusOr<std::unique_ptr<TransformerBlock>> TransformerBlock::Create(
    Communicator& comm, Options options) {
  std::unique_ptr<TransformerBlock> blk(
      new TransformerBlock(std::move(options)));
  const Options& o = blk->options_;

  Norm::Options norm;
  norm.hidden = o.hidden;
  norm.kind = o.norm;
  norm.eps = o.norm_eps;
  norm.sequence_parallel = o.sequence_parallel;
  norm.dtype = o.dtype;
  norm.name = absl::StrCat(o.name, ".input_norm");
  ASSIGN_OR_RETURN(blk->input_norm_, Norm::Create(comm, norm));
  norm.name = absl::StrCat(o.name, ".post_attention_norm");
  ASSIGN_OR_RETURN(blk->post_attention_norm_, Norm::Create(comm, norm));

  ParallelSelfAttention::Options attn;
  attn.hidden = o.hidden;
  attn.num_heads = o.num_heads;
  attn.num_kv_heads = o.num_kv_heads;
  attn.head_dim = o.head_dim;
  attn.bias = o.bias;
  attn.sequence_parallel = o.sequence_parallel;
  attn.dtype = o.dtype;
  attn.init_std = o.init_std;
  attn.seed = o.seed;
  attn.name = absl::StrCat(o.name, ".attention");
  ASSIGN_OR_RETURN(blk->attention_, ParallelSelfAttention::Create(comm, attn));

  ParallelMLP::Options mlp;
  mlp.hidden = o.hidden;
  mlp.ffn = o.ffn;
  mlp.activation = o.activation;
  mlp.bias = o.bias;
  mlp.sequence_parallel = o.sequence_parallel;
  mlp.dtype = o.dtype;
  mlp.init_std = o.init_std;
  mlp.seed = o.seed;
  mlp.name = absl::StrCat(o.name, ".mlp");
  ASSIGN_OR_RETURN(blk->mlp_, ParallelMLP::Create(comm, mlp));
  return blk;
}

absl::StatusOr<Tensor> TransformerBlock::Forward(const Tensor& x,
                                                 const TokenLayout& layout,
                                                 KVCache* cache) {
  has_forward_ = false;
  ASSIGN_OR_RETURN(Tensor n1, input_norm_->Forward(x));
  ASSIGN_OR_RETURN(Tensor a, attention_->Forward(n1, layout, cache));
  ASSIGN_OR_RETURN(Tensor h, ops::Add(x, a));
  ASSIGN_OR_RETURN(Tensor n2, post_attention_norm_->Forward(h));
  ASSIGN_OR_RETURN(Tensor m, mlp_->Forward(n2));
  ASSIGN_OR_RETURN(Tensor y, ops::Add(h, m));
  has_forward_ = cache == nullptr;
  return y;
}

absl::StatusOr<Tensor> TransformerBlock::Backward(const Tensor& grad_out) {
  if (!has_forward_) {
    return absl::FailedPreconditionError(absl::StrCat(
        options_.name, ": Backward without a preceding Forward (a Forward "
                       "with a KV cache does not prepare one)"));
  }
  ASSIGN_OR_RETURN(Tensor dn2, mlp_->Backward(grad_out));
  ASSIGN_OR_RETURN(Tensor dh, post_attention_norm_->Backward(dn2));
  RETURN_IF_ERROR(ops::AddInPlace(dh, grad_out));
  ASSIGN_OR_RETURN(Tensor dn1, attention_->Backward(dh));
  ASSIGN_OR_RETURN(Tensor dx, input_norm_->Backward(dn1));
  RETURN_IF_ERROR(ops::AddInPlace(dx, dh));
  has_forward_ = false;
  return dx;
}

std::vector<ParameterShard> TransformerBlock::parameters() const {
  std::vector<ParameterShard> out;
  auto add = [&out](std::vector<ParameterShard> v) {
    for (auto& p : v) out.push_back(std::move(p));
  };
  add(PrefixNames("input_norm", input_norm_->parameters()));
  add(PrefixNames("attention", attention_->parameters()));
  add(PrefixNames("post_attention_norm", post_attention_norm_->parameters()));
  add(PrefixNames("mlp", mlp_->parameters()));
  return out;
}

std::vector<ParameterShard> TransformerBlock::grads() const {
  std::vector<ParameterShard> out;
  auto add = [&out](std::vector<ParameterShard> v) {
    for (auto& p : v) out.push_back(std::move(p));
  };
  add(PrefixNames("input_norm", input_norm_->grads()));
  add(PrefixNames("attention", attention_->grads()));
  add(PrefixNames("post_attention_norm", post_attention_norm_->grads()));
  add(PrefixNames("mlp", mlp_->grads()));
  return out;
}

void TransformerBlock::ZeroGrad() {
  input_norm_->ZeroGrad();
  attention_->ZeroGrad();
  post_attention_norm_->ZeroGrad();
  mlp_->ZeroGrad();
}

}  // namespace tp
