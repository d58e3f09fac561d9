#include "layers/parallel_modules.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/ops.h"
#include "runtime/status_macros.h"

namespace tp {

// ---------------------------------------------------------------------------
// ColumnParallelLinearModule
// ---------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<ColumnParallelLinearModule>>
ColumnParallelLinearModule::Create(Communicator& comm,
                                   ColumnParallelLinear::Options options) {
  if (options.gather_output || options.sequence_parallel) {
    return absl::InvalidArgumentError(absl::StrCat(
        options.name,
        ": ColumnParallelLinearModule needs gather_output = false and "
        "sequence_parallel = false (got gather_output = ",
        options.gather_output,
        ", sequence_parallel = ", options.sequence_parallel, ")"));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<ColumnParallelLinear> layer,
                   ColumnParallelLinear::Create(comm, std::move(options)));
  return std::unique_ptr<ColumnParallelLinearModule>(
      new ColumnParallelLinearModule(comm, std::move(layer)));
}

absl::StatusOr<Tensor> ColumnParallelLinearModule::Forward(const Tensor& x) {
  return layer_->Forward(x);
}

absl::StatusOr<Tensor> ColumnParallelLinearModule::Backward(
    const Tensor& grad_out) {
  return layer_->Backward(grad_out);
}

absl::StatusOr<Tensor> ColumnParallelLinearModule::BackwardPartial(
    const Tensor& grad_out) {
  return layer_->BackwardPartial(grad_out);
}

absl::Status ColumnParallelLinearModule::CommitBackward() {
  return layer_->CommitBackward();
}

std::vector<ParameterShard> ColumnParallelLinearModule::LocalParameters()
    const {
  return layer_->parameters();
}

std::vector<ParameterShard> ColumnParallelLinearModule::LocalGrads() const {
  return layer_->grads();
}

void ColumnParallelLinearModule::ZeroLocalGrad() { layer_->ZeroGrad(); }

std::string ColumnParallelLinearModule::Describe() const {
  const auto& o = layer_->options();
  return absl::StrCat("ColumnParallelLinear(in=", o.in_features,
                      ", out=", o.out_features, " [", layer_->out_offset(),
                      ", ", layer_->out_offset() + layer_->local_out_features(),
                      ") of tp ", comm_.size(),
                      ", bias=", o.bias ? "true" : "false", ")");
}

// ---------------------------------------------------------------------------
// RowParallelLinearModule
// ---------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<RowParallelLinearModule>>
RowParallelLinearModule::Create(Communicator& comm,
                                RowParallelLinear::Options options) {
  if (!options.input_is_parallel || options.sequence_parallel) {
    return absl::InvalidArgumentError(absl::StrCat(
        options.name,
        ": RowParallelLinearModule needs input_is_parallel = true and "
        "sequence_parallel = false (got input_is_parallel = ",
        options.input_is_parallel,
        ", sequence_parallel = ", options.sequence_parallel, ")"));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<RowParallelLinear> layer,
                   RowParallelLinear::Create(comm, std::move(options)));
  return std::unique_ptr<RowParallelLinearModule>(
      new RowParallelLinearModule(comm, std::move(layer)));
}

absl::StatusOr<Tensor> RowParallelLinearModule::Forward(const Tensor& x) {
  return layer_->Forward(x);
}

absl::StatusOr<Tensor> RowParallelLinearModule::Backward(
    const Tensor& grad_out) {
  return layer_->Backward(grad_out);
}

std::vector<ParameterShard> RowParallelLinearModule::LocalParameters() const {
  return layer_->parameters();
}

std::vector<ParameterShard> RowParallelLinearModule::LocalGrads() const {
  return layer_->grads();
}

void RowParallelLinearModule::ZeroLocalGrad() { layer_->ZeroGrad(); }

std::string RowParallelLinearModule::Describe() const {
  const auto& o = layer_->options();
  return absl::StrCat("RowParallelLinear(in=", o.in_features, " [",
                      layer_->in_offset(), ", ",
                      layer_->in_offset() + layer_->local_in_features(),
                      ") of tp ", comm_.size(), ", out=", o.out_features,
                      ", bias=", o.bias ? "true" : "false", ")");
}

// ---------------------------------------------------------------------------
// VocabParallelEmbeddingModule
// ---------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<VocabParallelEmbeddingModule>>
VocabParallelEmbeddingModule::Create(Communicator& comm,
                                     VocabParallelEmbedding::Options options) {
  if (options.sequence_parallel) {
    return absl::InvalidArgumentError(
        absl::StrCat(options.name,
                     ": VocabParallelEmbeddingModule needs sequence_parallel "
                     "= false"));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<VocabParallelEmbedding> layer,
                   VocabParallelEmbedding::Create(comm, std::move(options)));
  return std::unique_ptr<VocabParallelEmbeddingModule>(
      new VocabParallelEmbeddingModule(comm, std::move(layer)));
}

absl::StatusOr<Tensor> VocabParallelEmbeddingModule::Forward(
    const Tensor& ids) {
  return layer_->Forward(ids);
}

absl::StatusOr<Tensor> VocabParallelEmbeddingModule::Backward(
    const Tensor& grad_out) {
  RETURN_IF_ERROR(layer_->Backward(grad_out));
  return Tensor();
}

std::vector<ParameterShard> VocabParallelEmbeddingModule::LocalParameters()
    const {
  return layer_->parameters();
}

std::vector<ParameterShard> VocabParallelEmbeddingModule::LocalGrads() const {
  return layer_->grads();
}

void VocabParallelEmbeddingModule::ZeroLocalGrad() { layer_->ZeroGrad(); }

std::string VocabParallelEmbeddingModule::Describe() const {
  const auto& o = layer_->options();
  return absl::StrCat("VocabParallelEmbedding(vocab=", o.vocab_size, " [",
                      layer_->vocab_start(), ", ",
                      layer_->vocab_start() + layer_->local_vocab_size(),
                      ") of tp ", comm_.size(), ", hidden=", o.hidden_size,
                      ")");
}

// ---------------------------------------------------------------------------
// ColumnSiblingsBackward
// ---------------------------------------------------------------------------

absl::StatusOr<Tensor> ColumnSiblingsBackward(
    const std::vector<std::pair<Module*, Tensor>>& parts) {
  if (parts.empty()) {
    return absl::InvalidArgumentError(
        "ColumnSiblingsBackward: no modules given");
  }
  std::vector<ColumnParallelLinearModule*> columns;
  for (size_t i = 0; i < parts.size(); ++i) {
    Module* module = parts[i].first;
    if (module == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("ColumnSiblingsBackward: module ", i, " is null"));
    }
    for (size_t j = 0; j < i; ++j) {
      if (parts[j].first == module) {
        return absl::InvalidArgumentError(
            absl::StrCat("ColumnSiblingsBackward: ", module->DisplayName(),
                         " is given twice (positions ", j, " and ", i, ")"));
      }
    }
    columns.push_back(dynamic_cast<ColumnParallelLinearModule*>(module));
  }
  bool fused = parts.size() > 1;
  for (ColumnParallelLinearModule* c : columns) {
    fused = fused && c != nullptr &&
            &c->communicator() == &columns[0]->communicator() &&
            !c->layer().options().sequence_parallel;
  }
  if (!fused) {
    Tensor dx;
    for (const auto& [module, grad] : parts) {
      ASSIGN_OR_RETURN(Tensor d, module->Backward(grad));
      if (!dx.defined()) {
        dx = std::move(d);
      } else {
        RETURN_IF_ERROR(ops::AddInPlace(dx, d));
      }
    }
    return dx;
  }
  // Partial input gradients summed locally; nothing is committed yet.
  ASSIGN_OR_RETURN(Tensor dx, columns[0]->BackwardPartial(parts[0].second));
  for (size_t i = 1; i < parts.size(); ++i) {
    ASSIGN_OR_RETURN(Tensor d, columns[i]->BackwardPartial(parts[i].second));
    RETURN_IF_ERROR(ops::AddInPlace(dx, d));
  }
  Communicator& comm = columns[0]->communicator();
  if (comm.size() > 1) {
    absl::Status s = comm.AllReduce(dx, ReduceOp::kSum);
    if (!s.ok()) {
      return absl::Status(s.code(),
                          absl::StrCat(parts[0].first->DisplayName(),
                                       " and its siblings: input-gradient "
                                       "all-reduce: ",
                                       s.message()));
    }
  }
  for (ColumnParallelLinearModule* c : columns) {
    RETURN_IF_ERROR(c->CommitBackward());
  }
  return dx;
}

}  // namespace tp
