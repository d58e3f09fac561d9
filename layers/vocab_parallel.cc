#include "layers/vocab_parallel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "layers/mappings.h"
#include "runtime/ops.h"
#include "runtime/status_macros.h"

namespace tp {
namespace {

absl::Status Annotate(const absl::Status& s, absl::string_view name) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(name, ": ", s.message()));
}

bool IsIntegerDType(DType d) {
  return d == DType::kInt32 || d == DType::kInt64;
}

// Reads integer ids (int32/int64, any shape and layout) and checks that every
// one lies in [0, vocab). The error names the first offending id and its
// flat position.
absl::StatusOr<std::vector<int64_t>> ReadCheckedIds(absl::string_view name,
                                                    absl::string_view what,
                                                    const Tensor& ids,
                                                    int64_t vocab) {
  if (!ids.defined()) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": ", what, " is undefined"));
  }
  if (!IsIntegerDType(ids.dtype())) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": ", what, " must be int32 or int64, got ",
                     DTypeName(ids.dtype())));
  }
  ASSIGN_OR_RETURN(Tensor as64, ops::Cast(ids, DType::kInt64));
  ASSIGN_OR_RETURN(std::vector<int64_t> v, as64.ToVector<int64_t>());
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i] < 0 || v[i] >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": token id ", v[i], " at position ", i, " of ",
                       what, " ", ShapeToString(ids.shape()),
                       " is outside the vocabulary [0, ", vocab, ")"));
    }
  }
  return v;
}

void ZeroFill(Tensor& t) {
  if (t.defined() && t.numel() > 0) std::memset(t.raw_data(), 0, t.nbytes());
}

}  // namespace

// ---------------------------------------------------------------------------
// VocabParallelEmbedding
// ---------------------------------------------------------------------------

VocabParallelEmbedding::VocabParallelEmbedding(Communicator& comm,
                                               Options options)
    : comm_(comm), options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<VocabParallelEmbedding>>
VocabParallelEmbedding::Create(Communicator& comm, Options options) {
  const std::string& name = options.name;
  if (options.vocab_size <= 0 || options.hidden_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": vocab_size (", options.vocab_size, ") and hidden_size (",
        options.hidden_size, ") must be positive"));
  }
  if (!IsFloatingPoint(options.dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": dtype ",
                                                   DTypeName(options.dtype),
                                                   " is not a floating dtype"));
  }
  const int tp = comm.size();
  if (tp < 1 || options.vocab_size % tp != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": vocab_size ", options.vocab_size,
                     " is not divisible by the tensor-parallel size ", tp));
  }
  std::unique_ptr<VocabParallelEmbedding> layer(
      new VocabParallelEmbedding(comm, std::move(options)));
  const Options& o = layer->options_;
  layer->local_vocab_ = o.vocab_size / tp;
  layer->vocab_start_ = comm.rank() * layer->local_vocab_;
  auto w = InitShard(o.init, {o.vocab_size, o.hidden_size}, 0,
                     layer->vocab_start_, layer->local_vocab_, o.dtype);
  RETURN_IF_ERROR(Annotate(w.status(), absl::StrCat(o.name, ".weight")));
  layer->weight_ = *std::move(w);
  layer->weight_grad_ = Tensor::Zeros(layer->weight_.shape(), o.dtype);
  return layer;
}

absl::StatusOr<Tensor> VocabParallelEmbedding::Forward(const Tensor& ids) {
  const Options& o = options_;
  ASSIGN_OR_RETURN(std::vector<int64_t> v,
                   ReadCheckedIds(o.name, "ids", ids, o.vocab_size));
  const int tp = comm_.size();
  if (o.sequence_parallel && tp > 1 &&
      (ids.ndim() < 1 || ids.dim(0) % tp != 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat(o.name,
                     ": sequence_parallel needs ids whose dim 0 divides by the "
                     "tensor-parallel size ",
                     tp, "; got shape ", ShapeToString(ids.shape())));
  }
  const int64_t n = static_cast<int64_t>(v.size());
  // Local rows; ids owned by another rank point at the sentinel row
  // local_vocab_ (looked up as row 0 and zeroed; dropped in Backward).
  std::vector<int64_t> local(v.size());
  std::vector<int64_t> lookup(v.size());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = v[i] - vocab_start_;
    const bool mine = r >= 0 && r < local_vocab_;
    local[i] = mine ? r : local_vocab_;
    lookup[i] = mine ? r : 0;
  }
  ASSIGN_OR_RETURN(Tensor lookup_t,
                   Tensor::FromVector<int64_t>(lookup, Shape{n}));
  ASSIGN_OR_RETURN(Tensor out, ops::Embedding(weight_, lookup_t));  // [n, H]
  const size_t row_bytes =
      static_cast<size_t>(o.hidden_size) * out.element_size();
  char* base = static_cast<char*>(out.raw_data());
  for (int64_t i = 0; i < n; ++i) {
    if (local[i] == local_vocab_)
      std::memset(base + i * row_bytes, 0, row_bytes);
  }
  Shape out_shape = ids.shape();
  out_shape.push_back(o.hidden_size);
  ASSIGN_OR_RETURN(out, out.Reshape(out_shape));
  if (o.sequence_parallel) {
    auto rs = ReduceScatterToSequenceParallel::Forward(comm_, out);
    RETURN_IF_ERROR(Annotate(rs.status(), o.name));
    out = *std::move(rs);
  } else if (tp > 1) {
    RETURN_IF_ERROR(Annotate(comm_.AllReduce(out, ReduceOp::kSum), o.name));
  }
  ASSIGN_OR_RETURN(cached_ids_, Tensor::FromVector<int64_t>(local, Shape{n}));
  cached_ids_shape_ = ids.shape();
  return out;
}

absl::Status VocabParallelEmbedding::Backward(const Tensor& grad_out) {
  const Options& o = options_;
  if (!cached_ids_.defined()) {
    return absl::FailedPreconditionError(
        absl::StrCat(o.name, ": Backward without a preceding Forward"));
  }
  Shape out_shape = cached_ids_shape_;
  out_shape.push_back(o.hidden_size);
  if (o.sequence_parallel) out_shape[0] /= comm_.size();
  if (!grad_out.defined() || grad_out.dtype() != o.dtype ||
      grad_out.shape() != out_shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        o.name, ": grad_out must be ", DTypeName(o.dtype), " ",
        ShapeToString(out_shape), ", got ",
        grad_out.defined() ? absl::StrCat(DTypeName(grad_out.dtype()), " ",
                                          ShapeToString(grad_out.shape()))
                           : std::string("an undefined tensor")));
  }
  Tensor g = grad_out;
  if (o.sequence_parallel) {
    auto gathered = ReduceScatterToSequenceParallel::Backward(comm_, grad_out);
    RETURN_IF_ERROR(Annotate(gathered.status(), o.name));
    g = *std::move(gathered);
  }
  ASSIGN_OR_RETURN(
      Tensor g2, g.Contiguous().Reshape({cached_ids_.numel(), o.hidden_size}));
  ASSIGN_OR_RETURN(Tensor dtable,
                   ops::EmbeddingBackward(g2, cached_ids_, local_vocab_ + 1));
  ASSIGN_OR_RETURN(Tensor owned, dtable.Narrow(0, 0, local_vocab_));
  RETURN_IF_ERROR(ops::AddInPlace(weight_grad_, owned));
  cached_ids_ = Tensor();
  return absl::OkStatus();
}

std::vector<ParameterShard> VocabParallelEmbedding::parameters() const {
  return {{"weight",
           weight_,
           {options_.vocab_size, options_.hidden_size},
           0,
           vocab_start_}};
}

std::vector<ParameterShard> VocabParallelEmbedding::grads() const {
  std::vector<ParameterShard> out = parameters();
  out[0].tensor = weight_grad_;
  return out;
}

void VocabParallelEmbedding::ZeroGrad() { ZeroFill(weight_grad_); }

// ---------------------------------------------------------------------------
// VocabParallelCrossEntropy
// ---------------------------------------------------------------------------

namespace {

// Row max of z [t, v] into mx [t].
template <typename T>
void RowMax(const Tensor& z, Tensor& mx) {
  const int64_t t = z.dim(0), v = z.dim(1);
  const T* zp = z.data<T>();
  T* mp = mx.data<T>();
  for (int64_t i = 0; i < t; ++i) {
    T m = -std::numeric_limits<T>::infinity();
    const T* row = zp + i * v;
    for (int64_t j = 0; j < v; ++j) m = std::max(m, row[j]);
    mp[i] = m;
  }
}

// For each row i: stats[i] = sum_j exp(z_ij - mx_i) (z overwritten with the
// exponentials) and stats[t + i] = z_i[local_target_i] (0 when the target is
// on another rank), read before the overwrite.
template <typename T>
void ExpSumAndTarget(Tensor& z, const Tensor& mx,
                     const std::vector<int64_t>& local_target, Tensor& stats) {
  const int64_t t = z.dim(0), v = z.dim(1);
  T* zp = z.data<T>();
  const T* mp = mx.data<T>();
  T* sp = stats.data<T>();
  for (int64_t i = 0; i < t; ++i) {
    T* row = zp + i * v;
    sp[t + i] = local_target[i] >= 0 ? row[local_target[i]] : T(0);
    T s = 0;
    for (int64_t j = 0; j < v; ++j) {
      row[j] = std::exp(row[j] - mp[i]);
      s += row[j];
    }
    sp[i] = s;
  }
}

// z [t, v] of exponentials -> softmax (divided by the global sums); returns
// per-token losses log(sum) + max - target_logit.
template <typename T>
std::vector<double> Finish(Tensor& z, const Tensor& mx, const Tensor& stats) {
  const int64_t t = z.dim(0), v = z.dim(1);
  T* zp = z.data<T>();
  const T* mp = mx.data<T>();
  const T* sp = stats.data<T>();
  std::vector<double> losses(t);
  for (int64_t i = 0; i < t; ++i) {
    const T inv = T(1) / sp[i];
    T* row = zp + i * v;
    for (int64_t j = 0; j < v; ++j) row[j] *= inv;
    losses[i] = static_cast<double>(std::log(sp[i]) + mp[i] - sp[t + i]);
  }
  return losses;
}

template <typename T>
void SoftmaxGrad(Tensor& g, const std::vector<int64_t>& local_target,
                 double scale) {
  const int64_t t = g.dim(0), v = g.dim(1);
  T* gp = g.data<T>();
  const T s = static_cast<T>(scale);
  for (int64_t i = 0; i < t; ++i) {
    T* row = gp + i * v;
    for (int64_t j = 0; j < v; ++j) row[j] *= s;
    if (local_target[i] >= 0) row[local_target[i]] -= s;
  }
}

}  // namespace

VocabParallelCrossEntropy::VocabParallelCrossEntropy(Communicator& comm,
                                                     std::string name)
    : comm_(comm), name_(std::move(name)) {}

absl::StatusOr<double> VocabParallelCrossEntropy::Forward(
    const Tensor& logits, const Tensor& targets) {
  if (!logits.defined() || !IsFloatingPoint(logits.dtype()) ||
      logits.ndim() < 1 || logits.dim(-1) < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        name_,
        ": logits must be a floating tensor [..., vocab/tp] with "
        "vocab/tp >= 1, got ",
        logits.defined() ? absl::StrCat(DTypeName(logits.dtype()), " ",
                                        ShapeToString(logits.shape()))
                         : std::string("an undefined tensor")));
  }
  const int64_t local_vocab = logits.dim(-1);
  const int64_t tokens = logits.numel() / local_vocab;
  if (tokens == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        name_, ": logits ", ShapeToString(logits.shape()), " hold no tokens"));
  }
  const int64_t vocab = local_vocab * comm_.size();
  ASSIGN_OR_RETURN(std::vector<int64_t> tgt,
                   ReadCheckedIds(name_, "targets", targets, vocab));
  if (static_cast<int64_t>(tgt.size()) != tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat(name_, ": targets ", ShapeToString(targets.shape()),
                     " hold ", tgt.size(), " ids for ", tokens,
                     " tokens of logits ", ShapeToString(logits.shape())));
  }
  const int64_t start = comm_.rank() * local_vocab;
  std::vector<int64_t> local_target(tokens);
  for (int64_t i = 0; i < tokens; ++i) {
    const int64_t r = tgt[i] - start;
    local_target[i] = (r >= 0 && r < local_vocab) ? r : -1;
  }

  const DType cd =
      logits.dtype() == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
  // Cast always copies, so z is ours to overwrite.
  ASSIGN_OR_RETURN(Tensor z, ops::Cast(logits, cd));
  ASSIGN_OR_RETURN(z, z.Reshape({tokens, local_vocab}));
  Tensor mx = Tensor::Empty({tokens}, cd);
  Tensor stats = Tensor::Empty({2 * tokens}, cd);
  const bool f64 = cd == DType::kFloat64;
  f64 ? RowMax<double>(z, mx) : RowMax<float>(z, mx);
  if (comm_.size() > 1) {
    RETURN_IF_ERROR(Annotate(comm_.AllReduce(mx, ReduceOp::kMax), name_));
  }
  f64 ? ExpSumAndTarget<double>(z, mx, local_target, stats)
      : ExpSumAndTarget<float>(z, mx, local_target, stats);
  if (comm_.size() > 1) {
    RETURN_IF_ERROR(Annotate(comm_.AllReduce(stats, ReduceOp::kSum), name_));
  }
  std::vector<double> losses =
      f64 ? Finish<double>(z, mx, stats) : Finish<float>(z, mx, stats);
  double total = 0;
  for (double l : losses) total += l;
  ASSIGN_OR_RETURN(Tensor token_losses,
                   Tensor::FromVector<double>(losses, Shape{tokens}));

  softmax_ = std::move(z);
  local_target_ = std::move(local_target);
  logits_shape_ = logits.shape();
  logits_dtype_ = logits.dtype();
  token_losses_ = std::move(token_losses);
  return total / static_cast<double>(tokens);
}

absl::StatusOr<Tensor> VocabParallelCrossEntropy::Backward(double grad_loss) {
  if (!softmax_.defined()) {
    return absl::FailedPreconditionError(
        absl::StrCat(name_, ": Backward without a preceding Forward"));
  }
  const double scale = grad_loss / static_cast<double>(softmax_.dim(0));
  Tensor g = softmax_.Clone();
  if (g.dtype() == DType::kFloat64) {
    SoftmaxGrad<double>(g, local_target_, scale);
  } else {
    SoftmaxGrad<float>(g, local_target_, scale);
  }
  if (logits_dtype_ != g.dtype()) {
    ASSIGN_OR_RETURN(g, ops::Cast(g, logits_dtype_));
  }
  return g.Reshape(logits_shape_);
}

}  // namespace tp
