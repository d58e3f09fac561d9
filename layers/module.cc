#include "layers/module.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "glog/logging.h"
#include "runtime/ops.h"
#include "runtime/status_macros.h"

namespace tp {

absl::string_view ParallelStyleName(ParallelStyle style) {
  switch (style) {
    case ParallelStyle::kReplicate:
      return "replicate";
    case ParallelStyle::kColwise:
      return "colwise";
    case ParallelStyle::kRowwise:
      return "rowwise";
    case ParallelStyle::kVocabParallel:
      return "vocab_parallel";
  }
  return "unknown";
}

// ---------------------------------------------------------------------------
// Module
// ---------------------------------------------------------------------------

Module::~Module() = default;

std::string Module::DisplayName() const {
  return path_.empty() ? absl::StrCat("<", type_, ">") : path_;
}

std::vector<std::pair<std::string, Module*>> Module::children() const {
  std::vector<std::pair<std::string, Module*>> out;
  out.reserve(children_.size());
  for (const auto& c : children_) out.emplace_back(c.first, c.second.get());
  return out;
}

Module* Module::child(absl::string_view name) const {
  for (const auto& c : children_) {
    if (c.first == name) return c.second.get();
  }
  return nullptr;
}

absl::StatusOr<Module*> Module::Find(absl::string_view path) const {
  Module* m = const_cast<Module*>(this);
  if (path.empty()) return m;
  std::string walked;
  for (absl::string_view part : absl::StrSplit(path, '.')) {
    Module* next = m->child(part);
    if (next == nullptr) {
      return absl::NotFoundError(absl::StrCat(
          DisplayName(), ": no module \"", path, "\": ",
          walked.empty() ? "the root" : absl::StrCat("\"", walked, "\""),
          " has no child \"", part, "\""));
    }
    absl::StrAppend(&walked, walked.empty() ? "" : ".", part);
    m = next;
  }
  return m;
}

std::vector<std::pair<std::string, Module*>> Module::NamedModules() const {
  std::vector<std::pair<std::string, Module*>> out;
  // Iterative pre-order walk (explicit stack, children pushed in reverse).
  std::vector<std::pair<std::string, Module*>> stack;
  stack.emplace_back("", const_cast<Module*>(this));
  while (!stack.empty()) {
    auto [path, m] = stack.back();
    stack.pop_back();
    out.emplace_back(path, m);
    for (auto it = m->children_.rbegin(); it != m->children_.rend(); ++it) {
      stack.emplace_back(
          path.empty() ? it->first : absl::StrCat(path, ".", it->first),
          it->second.get());
    }
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Module>> Module::ReplaceChild(
    absl::string_view name, std::unique_ptr<Module> replacement) {
  if (replacement == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        DisplayName(), ": ReplaceChild(\"", name, "\") with a null module"));
  }
  for (auto& c : children_) {
    if (c.first == name) {
      std::unique_ptr<Module> old = std::move(c.second);
      c.second = std::move(replacement);
      c.second->SetPath(path_.empty() ? c.first
                                      : absl::StrCat(path_, ".", c.first));
      old->SetPath("");
      return old;
    }
  }
  return absl::NotFoundError(absl::StrCat(DisplayName(), " (", type_,
                                          ") has no child \"", name, "\""));
}

std::vector<ParameterShard> Module::NamedParameters() const {
  std::vector<ParameterShard> out;
  for (const auto& [path, m] : NamedModules()) {
    for (ParameterShard& p : PrefixNames(path, m->LocalParameters())) {
      out.push_back(std::move(p));
    }
  }
  return out;
}

std::vector<ParameterShard> Module::NamedGrads() const {
  std::vector<ParameterShard> out;
  for (const auto& [path, m] : NamedModules()) {
    for (ParameterShard& p : PrefixNames(path, m->LocalGrads())) {
      out.push_back(std::move(p));
    }
  }
  return out;
}

void Module::ZeroGrad() {
  for (const auto& entry : NamedModules()) entry.second->ZeroLocalGrad();
}

int64_t Module::CountParameters() const {
  int64_t n = 0;
  for (const ParameterShard& p : NamedParameters())
    n += NumElements(p.full_shape);
  return n;
}

std::vector<ParameterShard> Module::LocalParameters() const { return {}; }
std::vector<ParameterShard> Module::LocalGrads() const { return {}; }
void Module::ZeroLocalGrad() {}

absl::StatusOr<Tensor> Module::Forward(const Tensor&) {
  return absl::UnimplementedError(
      absl::StrCat(DisplayName(), ": a ", type_, " has no one-tensor Forward"));
}

absl::StatusOr<Tensor> Module::Backward(const Tensor&) {
  return absl::UnimplementedError(absl::StrCat(DisplayName(), ": a ", type_,
                                               " has no one-tensor Backward"));
}

absl::Status Module::CheckChildStyles(
    const std::map<std::string, ParallelStyle>& styles, int tp_size) const {
  for (const auto& [name, style] : styles) {
    if (style == ParallelStyle::kReplicate) continue;
    const Module* c = child(name);
    if (style == ParallelStyle::kVocabParallel && c != nullptr &&
        c->type() == "Embedding") {
      continue;  // a vocab-parallel embedding returns the full output
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "unsupported plan: ", DisplayName(), " (", type_,
        ") cannot consume a sharded child, but child \"", name, "\" (",
        c != nullptr ? c->type() : "?", ") is planned ",
        ParallelStyleName(style), " at tensor-parallel size ", tp_size));
  }
  return absl::OkStatus();
}

std::string Module::Describe() const { return type_; }

std::string Module::ToString() const {
  std::string out;
  for (const auto& [path, m] : NamedModules()) {
    const int depth =
        path.empty()
            ? 0
            : 1 + static_cast<int>(std::count(path.begin(), path.end(), '.'));
    const size_t dot = path.rfind('.');
    const std::string name =
        path.empty() ? ""
                     : (dot == std::string::npos ? path : path.substr(dot + 1));
    absl::StrAppend(&out, std::string(2 * depth, ' '),
                    name.empty() ? "" : absl::StrCat("(", name, "): "),
                    m->Describe(), "\n");
  }
  return out;
}

Module* Module::RegisterChild(std::string name, std::unique_ptr<Module> child) {
  CHECK(child != nullptr) << DisplayName() << ": null child \"" << name << "\"";
  CHECK(!name.empty() && name.find('.') == std::string::npos)
      << DisplayName() << ": bad child name \"" << name << "\"";
  CHECK(this->child(name) == nullptr)
      << DisplayName() << ": duplicate child \"" << name << "\"";
  child->SetPath(path_.empty() ? name : absl::StrCat(path_, ".", name));
  children_.emplace_back(std::move(name), std::move(child));
  return children_.back().second.get();
}

void Module::SetPath(std::string path) {
  path_ = std::move(path);
  for (auto& c : children_) {
    c.second->SetPath(path_.empty() ? c.first
                                    : absl::StrCat(path_, ".", c.first));
  }
}

// ---------------------------------------------------------------------------
// Shared helpers for the leaves.
// ---------------------------------------------------------------------------

namespace {

ParameterShard Replicated(std::string name, const Tensor& t) {
  ParameterShard p;
  p.name = std::move(name);
  p.tensor = t;
  p.full_shape = t.defined() ? t.shape() : Shape{};
  return p;
}

// A replicated shard whose tensor may be undefined (deferred leaves): the
// full shape comes from the options.
ParameterShard ReplicatedShape(std::string name, const Tensor& t,
                               Shape full_shape) {
  ParameterShard p;
  p.name = std::move(name);
  p.tensor = t;
  p.full_shape = std::move(full_shape);
  return p;
}

absl::Status CheckInitSpec(const InitSpec& spec, const Shape& shape,
                           DType dtype, absl::string_view what) {
  // Validates the spec by generating an empty slice (cheap, same checks).
  absl::StatusOr<Tensor> t = InitShard(spec, shape, 0, 0, 0, dtype);
  if (!t.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": invalid init: ", t.status().message()));
  }
  return absl::OkStatus();
}

// Zeroes a (contiguous, owned) gradient in place: optimizers hold handles
// to the same storage. All-zero bits are 0 in every dtype.
void ZeroFill(Tensor& t) {
  if (t.defined()) std::memset(t.raw_data(), 0, t.nbytes());
}

absl::Status NotMaterialized(const Module& m) {
  return absl::FailedPreconditionError(absl::StrCat(
      m.DisplayName(), ": ", m.type(),
      " was created with materialize = false and has no weights yet (wrap "
      "the model or call Materialize())"));
}

}  // namespace

// ---------------------------------------------------------------------------
// Linear
// ---------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Linear>> Linear::Create(Options options) {
  if (options.in_features <= 0 || options.out_features <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Linear: in_features (", options.in_features, ") and out_features (",
        options.out_features, ") must be positive"));
  }
  if (!IsFloatingPoint(options.dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("Linear: dtype ",
                                                   DTypeName(options.dtype),
                                                   " is not a floating dtype"));
  }
  const Shape w{options.out_features, options.in_features};
  RETURN_IF_ERROR(
      CheckInitSpec(options.weight_init, w, options.dtype, "Linear weight"));
  if (options.bias) {
    RETURN_IF_ERROR(CheckInitSpec(options.bias_init, {options.out_features},
                                  options.dtype, "Linear bias"));
  }
  std::unique_ptr<Linear> l(new Linear(std::move(options)));
  if (l->options_.materialize) RETURN_IF_ERROR(l->Materialize());
  return l;
}

absl::Status Linear::Materialize() {
  if (materialized()) return absl::OkStatus();
  const Options& o = options_;
  ASSIGN_OR_RETURN(
      Tensor w,
      InitTensor(o.weight_init, {o.out_features, o.in_features}, o.dtype));
  Tensor b;
  if (o.bias) {
    ASSIGN_OR_RETURN(b, InitTensor(o.bias_init, {o.out_features}, o.dtype));
    bias_grad_ = Tensor::Zeros({o.out_features}, o.dtype);
  }
  weight_ = std::move(w);
  bias_ = std::move(b);
  weight_grad_ = Tensor::Zeros({o.out_features, o.in_features}, o.dtype);
  return absl::OkStatus();
}

absl::StatusOr<Tensor> Linear::Forward(const Tensor& x) {
  const Options& o = options_;
  if (!materialized()) return NotMaterialized(*this);
  if (!x.defined() || x.ndim() < 1 || x.dim(-1) != o.in_features) {
    return absl::InvalidArgumentError(absl::StrCat(
        DisplayName(), ": input must be [..., in_features = ", o.in_features,
        "], got ", x.defined() ? ShapeToString(x.shape()) : "undefined"));
  }
  if (x.dtype() != o.dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat(DisplayName(), ": input dtype is ", DTypeName(x.dtype()),
                     ", the layer's is ", DTypeName(o.dtype)));
  }
  ASSIGN_OR_RETURN(Tensor x2, x.Contiguous().Reshape({-1, o.in_features}));
  ASSIGN_OR_RETURN(Tensor y, ops::MatMul(x2, weight_, false, true));
  if (o.bias) {
    ASSIGN_OR_RETURN(y, ops::AddBias(y, bias_));
  }
  Shape out_shape = x.shape();
  out_shape.back() = o.out_features;
  ASSIGN_OR_RETURN(y, y.Reshape(out_shape));
  cached_input_ = x2;
  cached_shape_ = x.shape();
  return y;
}

absl::StatusOr<Tensor> Linear::Backward(const Tensor& grad_out) {
  const Options& o = options_;
  if (!cached_input_.defined()) {
    return absl::FailedPreconditionError(
        absl::StrCat(DisplayName(), ": Backward without a preceding Forward"));
  }
  Shape want = cached_shape_;
  want.back() = o.out_features;
  if (!grad_out.defined() || grad_out.shape() != want ||
      grad_out.dtype() != o.dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        DisplayName(), ": grad_out must be ", ShapeToString(want), " ",
        DTypeName(o.dtype), ", got ",
        grad_out.defined() ? absl::StrCat(ShapeToString(grad_out.shape()), " ",
                                          DTypeName(grad_out.dtype()))
                           : "undefined"));
  }
  ASSIGN_OR_RETURN(Tensor dy,
                   grad_out.Contiguous().Reshape({-1, o.out_features}));
  ASSIGN_OR_RETURN(Tensor dx, ops::MatMul(dy, weight_));  // [T, in]
  Tensor db;
  if (o.bias) {
    ASSIGN_OR_RETURN(db, ops::BiasGrad(dy));
  }
  // Everything that can fail on input has run; accumulate.
  RETURN_IF_ERROR(ops::MatMulInto(dy, cached_input_, weight_grad_,
                                  /*trans_a=*/true, false, 1.0, 1.0));
  if (o.bias) RETURN_IF_ERROR(ops::AddInPlace(bias_grad_, db));
  cached_input_ = Tensor();
  return dx.Reshape(cached_shape_);
}

std::vector<ParameterShard> Linear::LocalParameters() const {
  std::vector<ParameterShard> out;
  out.push_back(ReplicatedShape("weight", weight_,
                                {options_.out_features, options_.in_features}));
  if (options_.bias) {
    out.push_back(ReplicatedShape("bias", bias_, {options_.out_features}));
  }
  return out;
}

std::vector<ParameterShard> Linear::LocalGrads() const {
  std::vector<ParameterShard> out;
  out.push_back(ReplicatedShape("weight", weight_grad_,
                                {options_.out_features, options_.in_features}));
  if (options_.bias) {
    out.push_back(ReplicatedShape("bias", bias_grad_, {options_.out_features}));
  }
  return out;
}

void Linear::ZeroLocalGrad() {
  ZeroFill(weight_grad_);
  ZeroFill(bias_grad_);
}

std::string Linear::Describe() const {
  return absl::StrCat("Linear(in=", options_.in_features,
                      ", out=", options_.out_features,
                      ", bias=", options_.bias ? "true" : "false",
                      materialized() ? "" : ", deferred", ")");
}

// ---------------------------------------------------------------------------
// Embedding
// ---------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Embedding>> Embedding::Create(Options options) {
  if (options.vocab_size <= 0 || options.hidden_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Embedding: vocab_size (", options.vocab_size, ") and hidden_size (",
        options.hidden_size, ") must be positive"));
  }
  if (!IsFloatingPoint(options.dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("Embedding: dtype ",
                                                   DTypeName(options.dtype),
                                                   " is not a floating dtype"));
  }
  RETURN_IF_ERROR(CheckInitSpec(options.init,
                                {options.vocab_size, options.hidden_size},
                                options.dtype, "Embedding weight"));
  std::unique_ptr<Embedding> e(new Embedding(std::move(options)));
  if (e->options_.materialize) RETURN_IF_ERROR(e->Materialize());
  return e;
}

absl::Status Embedding::Materialize() {
  if (materialized()) return absl::OkStatus();
  const Options& o = options_;
  ASSIGN_OR_RETURN(weight_,
                   InitTensor(o.init, {o.vocab_size, o.hidden_size}, o.dtype));
  weight_grad_ = Tensor::Zeros({o.vocab_size, o.hidden_size}, o.dtype);
  return absl::OkStatus();
}

absl::StatusOr<Tensor> Embedding::Forward(const Tensor& ids) {
  if (!materialized()) return NotMaterialized(*this);
  absl::StatusOr<Tensor> y = ops::Embedding(weight_, ids);
  if (!y.ok()) {
    return absl::Status(y.status().code(), absl::StrCat(DisplayName(), ": ",
                                                        y.status().message()));
  }
  cached_ids_ = ids;
  return y;
}

absl::StatusOr<Tensor> Embedding::Backward(const Tensor& grad_out) {
  if (!cached_ids_.defined()) {
    return absl::FailedPreconditionError(
        absl::StrCat(DisplayName(), ": Backward without a preceding Forward"));
  }
  if (!grad_out.defined() || grad_out.dtype() != options_.dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        DisplayName(), ": grad_out must be ", DTypeName(options_.dtype)));
  }
  absl::StatusOr<Tensor> g =
      ops::EmbeddingBackward(grad_out, cached_ids_, options_.vocab_size);
  if (!g.ok()) {
    return absl::Status(g.status().code(), absl::StrCat(DisplayName(), ": ",
                                                        g.status().message()));
  }
  RETURN_IF_ERROR(ops::AddInPlace(weight_grad_, *g));
  cached_ids_ = Tensor();
  return Tensor();
}

std::vector<ParameterShard> Embedding::LocalParameters() const {
  return {ReplicatedShape("weight", weight_,
                          {options_.vocab_size, options_.hidden_size})};
}

std::vector<ParameterShard> Embedding::LocalGrads() const {
  return {ReplicatedShape("weight", weight_grad_,
                          {options_.vocab_size, options_.hidden_size})};
}

void Embedding::ZeroLocalGrad() { ZeroFill(weight_grad_); }

std::string Embedding::Describe() const {
  return absl::StrCat("Embedding(vocab=", options_.vocab_size,
                      ", hidden=", options_.hidden_size,
                      materialized() ? "" : ", deferred", ")");
}

// ---------------------------------------------------------------------------
// Norms
// ---------------------------------------------------------------------------

NormModule::NormModule(bool rms, Options options)
    : Module(rms ? "RMSNorm" : "LayerNorm"),
      rms_(rms),
      options_(std::move(options)) {}

absl::Status NormModule::Init() {
  const Options& o = options_;
  if (o.hidden <= 0 || !(o.eps >= 0) || !IsFloatingPoint(o.dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(
        type(), ": hidden (", o.hidden, ") must be positive, eps (", o.eps,
        ") non-negative and dtype (", DTypeName(o.dtype), ") floating"));
  }
  weight_ = Tensor::Full({o.hidden}, 1.0, o.dtype);
  weight_grad_ = Tensor::Zeros({o.hidden}, o.dtype);
  if (!rms_) {
    bias_ = Tensor::Zeros({o.hidden}, o.dtype);
    bias_grad_ = Tensor::Zeros({o.hidden}, o.dtype);
  }
  return absl::OkStatus();
}

absl::StatusOr<Tensor> NormModule::Forward(const Tensor& x) {
  const Options& o = options_;
  if (!x.defined() || x.ndim() < 1 || x.dim(-1) != o.hidden ||
      x.dtype() != o.dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        DisplayName(), ": input must be [..., ", o.hidden, "] ",
        DTypeName(o.dtype), ", got ",
        x.defined()
            ? absl::StrCat(ShapeToString(x.shape()), " ", DTypeName(x.dtype()))
            : "undefined"));
  }
  ops::NormOutput out;
  if (rms_) {
    ASSIGN_OR_RETURN(out, ops::RMSNorm(x, weight_, o.eps));
  } else {
    ASSIGN_OR_RETURN(out, ops::LayerNorm(x, weight_, bias_, o.eps));
  }
  cached_x_ = x;
  cached_mean_ = out.mean;
  cached_rstd_ = out.rstd;
  return out.y;
}

absl::StatusOr<Tensor> NormModule::Backward(const Tensor& grad_out) {
  if (!cached_x_.defined()) {
    return absl::FailedPreconditionError(
        absl::StrCat(DisplayName(), ": Backward without a preceding Forward"));
  }
  if (!grad_out.defined() || grad_out.shape() != cached_x_.shape() ||
      grad_out.dtype() != options_.dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        DisplayName(), ": grad_out must be ", ShapeToString(cached_x_.shape()),
        " ", DTypeName(options_.dtype)));
  }
  ops::NormGrads g;
  if (rms_) {
    ASSIGN_OR_RETURN(
        g, ops::RMSNormBackward(grad_out, cached_x_, weight_, cached_rstd_));
  } else {
    ASSIGN_OR_RETURN(g, ops::LayerNormBackward(grad_out, cached_x_, weight_,
                                               cached_mean_, cached_rstd_));
  }
  RETURN_IF_ERROR(ops::AddInPlace(weight_grad_, g.dgamma));
  if (!rms_) RETURN_IF_ERROR(ops::AddInPlace(bias_grad_, g.dbeta));
  cached_x_ = cached_mean_ = cached_rstd_ = Tensor();
  return g.dx;
}

std::vector<ParameterShard> NormModule::LocalParameters() const {
  std::vector<ParameterShard> out{Replicated("weight", weight_)};
  if (!rms_) out.push_back(Replicated("bias", bias_));
  return out;
}

std::vector<ParameterShard> NormModule::LocalGrads() const {
  std::vector<ParameterShard> out{Replicated("weight", weight_grad_)};
  if (!rms_) out.push_back(Replicated("bias", bias_grad_));
  return out;
}

void NormModule::ZeroLocalGrad() {
  ZeroFill(weight_grad_);
  ZeroFill(bias_grad_);
}

std::string NormModule::Describe() const {
  return absl::StrCat(type(), "(", options_.hidden, ", eps=", options_.eps,
                      ")");
}

absl::StatusOr<std::unique_ptr<LayerNorm>> LayerNorm::Create(Options options) {
  std::unique_ptr<LayerNorm> n(new LayerNorm(std::move(options)));
  RETURN_IF_ERROR(n->Init());
  return n;
}

absl::StatusOr<std::unique_ptr<RMSNorm>> RMSNorm::Create(Options options) {
  std::unique_ptr<RMSNorm> n(new RMSNorm(std::move(options)));
  RETURN_IF_ERROR(n->Init());
  return n;
}

}  // namespace tp
