#include "layers/decoder.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "layers/parallel_modules.h"
#include "runtime/init.h"
#include "runtime/ops.h"
#include "runtime/status_macros.h"

namespace tp {
namespace {

absl::Status Invalid(absl::string_view who, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(who, ": ", what));
}

// ---- Rotary embeddings ------------------------------------------------------

// Rotates, in place, every head of the rows of `t` ([b * s, heads * d],
// contiguous float/double): row r is position pos0 + r % s. `inverse`
// applies the transpose rotation (the backward pass).
template <typename T>
void RopeRows(T* data, int64_t rows, int64_t s, int64_t heads, int64_t d,
              int64_t pos0, const std::vector<double>& cos_table,
              const std::vector<double>& sin_table, bool inverse) {
  const int64_t half = d / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = pos0 + r % s;
    const double* c = cos_table.data() + pos * half;
    const double* sn = sin_table.data() + pos * half;
    for (int64_t h = 0; h < heads; ++h) {
      T* x = data + (r * heads + h) * d;
      for (int64_t i = 0; i < half; ++i) {
        const double a = static_cast<double>(x[i]);
        const double b = static_cast<double>(x[i + half]);
        const double si = inverse ? -sn[i] : sn[i];
        x[i] = static_cast<T>(a * c[i] - b * si);
        x[i + half] = static_cast<T>(b * c[i] + a * si);
      }
    }
  }
}

// Returns a rotated copy of t [b * s, heads * d].
absl::StatusOr<Tensor> ApplyRope(const Tensor& t, int64_t s, int64_t d,
                                 int64_t pos0,
                                 const std::vector<double>& cos_table,
                                 const std::vector<double>& sin_table,
                                 bool inverse) {
  const DType dtype = t.dtype();
  Tensor work;
  if (dtype == DType::kFloat32 || dtype == DType::kFloat64) {
    work = t.Clone();
  } else {
    ASSIGN_OR_RETURN(work, ops::Cast(t, DType::kFloat32));
  }
  const int64_t rows = work.dim(0), heads = work.dim(1) / d;
  if (work.dtype() == DType::kFloat64) {
    RopeRows(work.data<double>(), rows, s, heads, d, pos0, cos_table, sin_table,
             inverse);
  } else {
    RopeRows(work.data<float>(), rows, s, heads, d, pos0, cos_table, sin_table,
             inverse);
  }
  if (work.dtype() != dtype) return ops::Cast(work, dtype);
  return work;
}

// ---- Children
// ----------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Linear>> MakeLinear(int64_t in, int64_t out,
                                                   bool bias, DType dtype,
                                                   double std, uint64_t seed,
                                                   const std::string& name,
                                                   bool materialize) {
  LinearOptions o;
  o.in_features = in;
  o.out_features = out;
  o.bias = bias;
  o.dtype = dtype;
  o.weight_init = InitSpec::Normal(0.0, std, SeedFor(seed, name + ".weight"));
  o.bias_init = InitSpec::Constant(0.0);
  o.materialize = materialize;
  return Linear::Create(o);
}

absl::StatusOr<std::unique_ptr<Module>> MakeNorm(const DecoderConfig& c) {
  NormModuleOptions o;
  o.hidden = c.hidden;
  o.eps = c.norm_eps;
  o.dtype = c.dtype;
  if (c.norm == NormKind::kRMSNorm) {
    ASSIGN_OR_RETURN(std::unique_ptr<RMSNorm> n, RMSNorm::Create(o));
    return std::unique_ptr<Module>(std::move(n));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<LayerNorm> n, LayerNorm::Create(o));
  return std::unique_ptr<Module>(std::move(n));
}

// The child `name` of `m`; kFailedPrecondition when missing (a tree
// modified by hand).
absl::StatusOr<Module*> Child(const Module& m, absl::string_view name) {
  Module* c = m.child(name);
  if (c == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat(m.DisplayName(), " (", m.type(), ") has lost its child \"",
                     name, "\""));
  }
  return c;
}

ParallelStyle StyleOf(const std::map<std::string, ParallelStyle>& styles,
                      const std::string& name) {
  auto it = styles.find(name);
  return it == styles.end() ? ParallelStyle::kReplicate : it->second;
}

bool IsIntegerIds(const Tensor& t) {
  return t.dtype() == DType::kInt32 || t.dtype() == DType::kInt64;
}

std::string FormatDouble(double v) { return absl::StrFormat("%.17g", v); }

}  // namespace

// ---------------------------------------------------------------------------
// DecoderConfig
// ---------------------------------------------------------------------------

absl::Status DecoderConfig::Validate() const {
  const char* who = "DecoderConfig";
  if (hidden <= 0)
    return Invalid(who, absl::StrCat("hidden ", hidden, " <= 0"));
  if (heads <= 0) return Invalid(who, absl::StrCat("heads ", heads, " <= 0"));
  if (kv_heads < 0) {
    return Invalid(who, absl::StrCat("kv_heads ", kv_heads, " < 0"));
  }
  if (heads % num_kv_heads() != 0) {
    return Invalid(
        who, absl::StrCat("heads ", heads, " is not divisible by kv_heads ",
                          num_kv_heads()));
  }
  if (head_dim < 0) {
    return Invalid(who, absl::StrCat("head_dim ", head_dim, " < 0"));
  }
  if (head_dim == 0 && hidden % heads != 0) {
    return Invalid(
        who, absl::StrCat("hidden ", hidden, " is not divisible by heads ",
                          heads, "; set head_dim"));
  }
  if (rope && head_size() % 2 != 0) {
    return Invalid(who, absl::StrCat("head_dim ", head_size(),
                                     " must be even for rotary embeddings"));
  }
  if (layers <= 0)
    return Invalid(who, absl::StrCat("layers ", layers, " <= 0"));
  if (vocab <= 0) return Invalid(who, absl::StrCat("vocab ", vocab, " <= 0"));
  if (ffn <= 0) return Invalid(who, absl::StrCat("ffn ", ffn, " <= 0"));
  if (!(norm_eps >= 0) || !std::isfinite(norm_eps)) {
    return Invalid(
        who, absl::StrCat("norm_eps ", norm_eps, " must be finite and >= 0"));
  }
  if (rope && (!(rope_theta > 0) || !std::isfinite(rope_theta))) {
    return Invalid(who, absl::StrCat("rope_theta ", rope_theta,
                                     " must be finite and > 0"));
  }
  if (max_seq <= 0) {
    return Invalid(who, absl::StrCat("max_seq ", max_seq, " <= 0"));
  }
  if (!(init_std >= 0) || !std::isfinite(init_std)) {
    return Invalid(
        who, absl::StrCat("init_std ", init_std, " must be finite and >= 0"));
  }
  if (!IsFloatingPoint(dtype)) {
    return Invalid(who, absl::StrCat("dtype ", DTypeName(dtype),
                                     " is not a floating dtype"));
  }
  return absl::OkStatus();
}

std::string DecoderConfig::ToString() const {
  return absl::StrCat(
      "hidden=", hidden, " heads=", heads, " kv_heads=", num_kv_heads(),
      " head_dim=", head_size(), " layers=", layers, " vocab=", vocab,
      " ffn=", ffn, " norm=", NormKindName(norm),
      " activation=", MlpActivationName(activation),
      " bias=", bias ? "true" : "false", " rope=", rope ? "true" : "false",
      " max_seq=", max_seq, " dtype=", DTypeName(dtype), " seed=", seed);
}

std::map<std::string, std::string> DecoderConfig::ToMetadata() const {
  return {
      {"hidden", absl::StrCat(hidden)},
      {"heads", absl::StrCat(heads)},
      {"kv_heads", absl::StrCat(kv_heads)},
      {"head_dim", absl::StrCat(head_dim)},
      {"layers", absl::StrCat(layers)},
      {"vocab", absl::StrCat(vocab)},
      {"ffn", absl::StrCat(ffn)},
      {"norm", std::string(NormKindName(norm))},
      {"norm_eps", FormatDouble(norm_eps)},
      {"activation", std::string(MlpActivationName(activation))},
      {"bias", bias ? "true" : "false"},
      {"rope", rope ? "true" : "false"},
      {"rope_theta", FormatDouble(rope_theta)},
      {"max_seq", absl::StrCat(max_seq)},
      {"init_std", FormatDouble(init_std)},
      {"seed", absl::StrCat(seed)},
      {"dtype", std::string(DTypeName(dtype))},
  };
}

absl::StatusOr<DecoderConfig> DecoderConfig::FromMetadata(
    const std::map<std::string, std::string>& m) {
  auto get = [&](const char* key) -> absl::StatusOr<std::string> {
    auto it = m.find(key);
    if (it == m.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "DecoderConfig::FromMetadata: missing key \"", key, "\""));
    }
    return it->second;
  };
  auto bad = [](const char* key, const std::string& v) {
    return absl::InvalidArgumentError(
        absl::StrCat("DecoderConfig::FromMetadata: bad value \"", v,
                     "\" for \"", key, "\""));
  };
  DecoderConfig c;
  for (auto [key, field] :
       std::vector<std::pair<const char*, int64_t*>>{{"hidden", &c.hidden},
                                                     {"heads", &c.heads},
                                                     {"kv_heads", &c.kv_heads},
                                                     {"head_dim", &c.head_dim},
                                                     {"layers", &c.layers},
                                                     {"vocab", &c.vocab},
                                                     {"ffn", &c.ffn},
                                                     {"max_seq", &c.max_seq}}) {
    ASSIGN_OR_RETURN(std::string v, get(key));
    if (!absl::SimpleAtoi(v, field)) return bad(key, v);
  }
  for (auto [key, field] : std::vector<std::pair<const char*, double*>>{
           {"norm_eps", &c.norm_eps},
           {"rope_theta", &c.rope_theta},
           {"init_std", &c.init_std}}) {
    ASSIGN_OR_RETURN(std::string v, get(key));
    if (!absl::SimpleAtod(v, field)) return bad(key, v);
  }
  for (auto [key, field] : std::vector<std::pair<const char*, bool*>>{
           {"bias", &c.bias}, {"rope", &c.rope}}) {
    ASSIGN_OR_RETURN(std::string v, get(key));
    if (v == "true") {
      *field = true;
    } else if (v == "false") {
      *field = false;
    } else {
      return bad(key, v);
    }
  }
  {
    ASSIGN_OR_RETURN(std::string v, get("seed"));
    if (!absl::SimpleAtoi(v, &c.seed)) return bad("seed", v);
  }
  {
    ASSIGN_OR_RETURN(std::string v, get("norm"));
    if (v == NormKindName(NormKind::kRMSNorm)) {
      c.norm = NormKind::kRMSNorm;
    } else if (v == NormKindName(NormKind::kLayerNorm)) {
      c.norm = NormKind::kLayerNorm;
    } else {
      return bad("norm", v);
    }
  }
  {
    ASSIGN_OR_RETURN(std::string v, get("activation"));
    if (v == MlpActivationName(MlpActivation::kSwiGLU)) {
      c.activation = MlpActivation::kSwiGLU;
    } else if (v == MlpActivationName(MlpActivation::kGeLU)) {
      c.activation = MlpActivation::kGeLU;
    } else {
      return bad("activation", v);
    }
  }
  {
    ASSIGN_OR_RETURN(std::string v, get("dtype"));
    absl::StatusOr<DType> d = ParseDType(v);
    if (!d.ok()) return bad("dtype", v);
    c.dtype = *d;
  }
  RETURN_IF_ERROR(c.Validate());
  return c;
}

// ---------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Attention>> Attention::Create(Options o) {
  const std::string& who = o.name;
  if (o.hidden <= 0 || o.num_heads <= 0 || o.num_kv_heads < 0 ||
      o.head_dim < 0 || o.max_seq <= 0) {
    return Invalid(
        who, absl::StrCat("hidden (", o.hidden, "), num_heads (", o.num_heads,
                          ") and max_seq (", o.max_seq,
                          ") must be positive, num_kv_heads (", o.num_kv_heads,
                          ") and head_dim (", o.head_dim, ") non-negative"));
  }
  if (o.num_kv_heads == 0) o.num_kv_heads = o.num_heads;
  if (o.num_heads % o.num_kv_heads != 0) {
    return Invalid(who, absl::StrCat("num_heads ", o.num_heads,
                                     " is not divisible by num_kv_heads ",
                                     o.num_kv_heads));
  }
  if (o.head_dim == 0) {
    if (o.hidden % o.num_heads != 0) {
      return Invalid(who, absl::StrCat("hidden ", o.hidden,
                                       " is not divisible by num_heads ",
                                       o.num_heads, "; set head_dim"));
    }
    o.head_dim = o.hidden / o.num_heads;
  }
  if (o.rope && (o.head_dim % 2 != 0 || !(o.rope_theta > 0))) {
    return Invalid(who, absl::StrCat("rotary embeddings need an even head_dim "
                                     "(got ",
                                     o.head_dim, ") and rope_theta > 0 (got ",
                                     o.rope_theta, ")"));
  }
  std::unique_ptr<Attention> a(new Attention(std::move(o)));
  const Options& op = a->options_;
  const int64_t d = op.head_dim;
  const int64_t qf = op.num_heads * d, kvf = op.num_kv_heads * d;
  struct Proj {
    const char* name;
    int64_t in, out;
  };
  for (const Proj& p :
       {Proj{"q_proj", op.hidden, qf}, Proj{"k_proj", op.hidden, kvf},
        Proj{"v_proj", op.hidden, kvf}, Proj{"o_proj", qf, op.hidden}}) {
    ASSIGN_OR_RETURN(
        std::unique_ptr<Linear> l,
        MakeLinear(p.in, p.out, op.bias, op.dtype, op.init_std, op.seed,
                   absl::StrCat(op.name, ".", p.name), op.materialize));
    a->RegisterChild(p.name, std::move(l));
  }
  if (op.rope) {
    const int64_t half = d / 2;
    a->cos_.resize(op.max_seq * half);
    a->sin_.resize(op.max_seq * half);
    for (int64_t pos = 0; pos < op.max_seq; ++pos) {
      for (int64_t i = 0; i < half; ++i) {
        const double inv_freq =
            std::pow(op.rope_theta, -2.0 * static_cast<double>(i) / d);
        const double angle = static_cast<double>(pos) * inv_freq;
        a->cos_[pos * half + i] = std::cos(angle);
        a->sin_[pos * half + i] = std::sin(angle);
      }
    }
  }
  return a;
}

absl::StatusOr<Tensor> Attention::Forward(const Tensor& x) {
  if (!x.defined() || x.ndim() != 2) {
    return Invalid(
        DisplayName(),
        absl::StrCat("input must be [tokens, hidden], got ",
                     x.defined() ? ShapeToString(x.shape()) : "undefined"));
  }
  return Forward(x, TokenLayout{1, x.dim(0)}, nullptr);
}

absl::StatusOr<Tensor> Attention::Forward(const Tensor& x,
                                          const TokenLayout& layout,
                                          AttentionCache* cache) {
  const Options& o = options_;
  const std::string who = DisplayName();
  if (!x.defined() || x.ndim() != 2 || x.dim(1) != o.hidden) {
    return Invalid(
        who,
        absl::StrCat("input must be [tokens, hidden = ", o.hidden, "], got ",
                     x.defined() ? ShapeToString(x.shape()) : "undefined"));
  }
  if (x.dtype() != o.dtype) {
    return Invalid(who, absl::StrCat("input dtype is ", DTypeName(x.dtype()),
                                     ", the layer's is ", DTypeName(o.dtype)));
  }
  if (layout.batch < 1 || layout.seq < 1 || layout.tokens() != x.dim(0)) {
    return Invalid(
        who, absl::StrCat("layout batch ", layout.batch, " x seq ", layout.seq,
                          " does not match the input's ", x.dim(0), " rows"));
  }
  const int64_t b = layout.batch, s = layout.seq, d = o.head_dim;
  const int64_t past = cache != nullptr ? cache->length() : 0;
  if (past + s > o.max_seq) {
    return Invalid(who, absl::StrCat("positions up to ", past + s,
                                     " exceed max_seq ", o.max_seq));
  }
  ASSIGN_OR_RETURN(Module * q_proj, Child(*this, "q_proj"));
  ASSIGN_OR_RETURN(Module * k_proj, Child(*this, "k_proj"));
  ASSIGN_OR_RETURN(Module * v_proj, Child(*this, "v_proj"));
  ASSIGN_OR_RETURN(Module * o_proj, Child(*this, "o_proj"));

  // From here on the previous Forward's activations are stale.
  has_forward_ = false;
  saved_ = attention_core::Saved();
  ASSIGN_OR_RETURN(Tensor q, q_proj->Forward(x));  // [T, local heads * d]
  ASSIGN_OR_RETURN(Tensor k, k_proj->Forward(x));  // [T, local kv * d]
  ASSIGN_OR_RETURN(Tensor v, v_proj->Forward(x));
  // Local head counts come from the (possibly sharded) projections.
  const int64_t lh = q.dim(1) / d, lkv = k.dim(1) / d;
  if (q.dim(1) % d != 0 || k.dim(1) % d != 0 || lkv < 1 ||
      v.shape() != k.shape() || lh % lkv != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        who, ": projections give ", q.dim(1), " query, ", k.dim(1), " key and ",
        v.dim(1), " value features, not whole heads of ", d,
        " with key/value heads dividing query heads (inconsistent plan?)"));
  }
  const int64_t g = lh / lkv;
  if (cache != nullptr) {
    absl::Status fits = attention_core::CheckCache(*cache, b, lkv, d, o.dtype);
    if (!fits.ok()) return Invalid(who, fits.message());
  }
  if (o.rope) {
    ASSIGN_OR_RETURN(q, ApplyRope(q, s, d, past, cos_, sin_, false));
    ASSIGN_OR_RETURN(k, ApplyRope(k, s, d, past, cos_, sin_, false));
  }
  ASSIGN_OR_RETURN(q, q.Reshape({b, s, lkv, g, d}));
  ASSIGN_OR_RETURN(k, k.Reshape({b, s, lkv, 1, d}));
  ASSIGN_OR_RETURN(v, v.Reshape({b, s, lkv, 1, d}));
  if (cache != nullptr) {
    ASSIGN_OR_RETURN(attention_core::CachedResult r,
                     attention_core::ForwardCached(q, k, v, *cache, o.max_seq));
    ASSIGN_OR_RETURN(Tensor y, o_proj->Forward(r.ctx));
    *cache = std::move(r.next_cache);  // the step succeeded
    return y;
  }
  ASSIGN_OR_RETURN(attention_core::ForwardResult r,
                   attention_core::Forward(q, k, v));
  ASSIGN_OR_RETURN(Tensor y, o_proj->Forward(r.ctx));
  layout_ = layout;
  local_heads_ = lh;
  local_kv_ = lkv;
  saved_ = std::move(r.saved);
  has_forward_ = true;
  return y;
}

absl::StatusOr<Tensor> Attention::Backward(const Tensor& grad_out) {
  const Options& o = options_;
  if (!has_forward_) {
    return absl::FailedPreconditionError(absl::StrCat(
        DisplayName(),
        ": Backward without a preceding Forward (a Forward with a KV cache "
        "does not prepare one)"));
  }
  ASSIGN_OR_RETURN(Module * q_proj, Child(*this, "q_proj"));
  ASSIGN_OR_RETURN(Module * k_proj, Child(*this, "k_proj"));
  ASSIGN_OR_RETURN(Module * v_proj, Child(*this, "v_proj"));
  ASSIGN_OR_RETURN(Module * o_proj, Child(*this, "o_proj"));
  const int64_t b = layout_.batch, s = layout_.seq, d = o.head_dim;
  const int64_t lkv = local_kv_;
  ASSIGN_OR_RETURN(Tensor dctx, o_proj->Backward(grad_out));  // [T, lh d]
  ASSIGN_OR_RETURN(attention_core::Grads grads,
                   attention_core::Backward(dctx, saved_));
  Tensor dq = std::move(grads.dq), dk = std::move(grads.dk),
         dv = std::move(grads.dv);
  ASSIGN_OR_RETURN(dq, dq.Reshape({b * s, local_heads_ * d}));
  ASSIGN_OR_RETURN(dk, dk.Reshape({b * s, lkv * d}));
  ASSIGN_OR_RETURN(dv, dv.Reshape({b * s, lkv * d}));
  if (o.rope) {
    ASSIGN_OR_RETURN(dq, ApplyRope(dq, s, d, 0, cos_, sin_, true));
    ASSIGN_OR_RETURN(dk, ApplyRope(dk, s, d, 0, cos_, sin_, true));
  }
  // q/k/v read the same input: one all-reduce of their summed partial input
  // gradients when they are column-parallel.
  ASSIGN_OR_RETURN(Tensor dx,
                   ColumnSiblingsBackward({{q_proj, std::move(dq)},
                                           {k_proj, std::move(dk)},
                                           {v_proj, std::move(dv)}}));
  has_forward_ = false;
  saved_ = attention_core::Saved();
  return dx;
}

absl::Status Attention::CheckChildStyles(
    const std::map<std::string, ParallelStyle>& styles, int tp_size) const {
  const ParallelStyle q = StyleOf(styles, "q_proj"),
                      k = StyleOf(styles, "k_proj"),
                      v = StyleOf(styles, "v_proj"),
                      out = StyleOf(styles, "o_proj");
  const auto all = [&](ParallelStyle qkv, ParallelStyle o) {
    return q == qkv && k == qkv && v == qkv && out == o;
  };
  if (all(ParallelStyle::kReplicate, ParallelStyle::kReplicate)) {
    return absl::OkStatus();
  }
  if (!all(ParallelStyle::kColwise, ParallelStyle::kRowwise)) {
    return Invalid(
        absl::StrCat("unsupported plan: ", DisplayName(), " (Attention)"),
        absl::StrCat("needs q_proj, k_proj, v_proj colwise and o_proj "
                     "rowwise, or all replicated; got q_proj ",
                     ParallelStyleName(q), ", k_proj ", ParallelStyleName(k),
                     ", v_proj ", ParallelStyleName(v), ", o_proj ",
                     ParallelStyleName(out)));
  }
  if (options_.num_heads % tp_size != 0 ||
      options_.num_kv_heads % tp_size != 0) {
    return Invalid(DisplayName(),
                   absl::StrCat("heads ", options_.num_heads, " and kv_heads ",
                                options_.num_kv_heads,
                                " must both be divisible by the "
                                "tensor-parallel size ",
                                tp_size));
  }
  return absl::OkStatus();
}

std::string Attention::Describe() const {
  return absl::StrCat("Attention(heads=", options_.num_heads,
                      ", kv_heads=", options_.num_kv_heads,
                      ", head_dim=", options_.head_dim,
                      ", rope=", options_.rope ? "true" : "false", ")");
}

// ---------------------------------------------------------------------------
// Mlp
// ---------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Mlp>> Mlp::Create(Options o) {
  if (o.hidden <= 0 || o.ffn <= 0) {
    return Invalid(o.name, absl::StrCat("hidden (", o.hidden, ") and ffn (",
                                        o.ffn, ") must be positive"));
  }
  std::unique_ptr<Mlp> m(new Mlp(std::move(o)));
  const Options& op = m->options_;
  const bool swiglu = op.activation == MlpActivation::kSwiGLU;
  for (const char* name : {"gate_proj", "up_proj", "down_proj"}) {
    if (!swiglu && std::strcmp(name, "gate_proj") == 0) continue;
    const bool down = std::strcmp(name, "down_proj") == 0;
    ASSIGN_OR_RETURN(
        std::unique_ptr<Linear> l,
        MakeLinear(down ? op.ffn : op.hidden, down ? op.hidden : op.ffn,
                   op.bias, op.dtype, op.init_std, op.seed,
                   absl::StrCat(op.name, ".", name), op.materialize));
    m->RegisterChild(name, std::move(l));
  }
  return m;
}

absl::StatusOr<Tensor> Mlp::Forward(const Tensor& x) {
  const bool swiglu = options_.activation == MlpActivation::kSwiGLU;
  ASSIGN_OR_RETURN(Module * up, Child(*this, "up_proj"));
  ASSIGN_OR_RETURN(Module * down, Child(*this, "down_proj"));
  has_forward_ = false;
  gate_ = up_ = act_ = Tensor();
  ASSIGN_OR_RETURN(Tensor u, up->Forward(x));
  Tensor g, a;
  if (swiglu) {
    ASSIGN_OR_RETURN(Module * gate, Child(*this, "gate_proj"));
    ASSIGN_OR_RETURN(g, gate->Forward(x));
    if (g.shape() != u.shape()) {
      return absl::FailedPreconditionError(absl::StrCat(
          DisplayName(), ": gate_proj gives ", ShapeToString(g.shape()),
          " but up_proj ", ShapeToString(u.shape()), " (inconsistent plan?)"));
    }
    ASSIGN_OR_RETURN(Tensor sg, ops::SiLU(g));
    ASSIGN_OR_RETURN(a, ops::Mul(sg, u));
    act_ = sg;
  } else {
    ASSIGN_OR_RETURN(a, ops::GeLU(u));
  }
  ASSIGN_OR_RETURN(Tensor y, down->Forward(a));
  gate_ = g;
  up_ = u;
  has_forward_ = true;
  return y;
}

absl::StatusOr<Tensor> Mlp::Backward(const Tensor& grad_out) {
  if (!has_forward_) {
    return absl::FailedPreconditionError(
        absl::StrCat(DisplayName(), ": Backward without a preceding Forward"));
  }
  const bool swiglu = options_.activation == MlpActivation::kSwiGLU;
  ASSIGN_OR_RETURN(Module * up, Child(*this, "up_proj"));
  ASSIGN_OR_RETURN(Module * down, Child(*this, "down_proj"));
  ASSIGN_OR_RETURN(Tensor da, down->Backward(grad_out));
  Tensor dx;
  if (swiglu) {
    ASSIGN_OR_RETURN(Module * gate, Child(*this, "gate_proj"));
    ASSIGN_OR_RETURN(Tensor du, ops::Mul(da, act_));  // d/du = silu(g)
    ASSIGN_OR_RETURN(Tensor dsg, ops::Mul(da, up_));  // d/dsilu(g) = u
    ASSIGN_OR_RETURN(Tensor dg, ops::SiLUBackward(dsg, gate_));
    ASSIGN_OR_RETURN(dx, ColumnSiblingsBackward(
                             {{gate, std::move(dg)}, {up, std::move(du)}}));
  } else {
    ASSIGN_OR_RETURN(Tensor du, ops::GeLUBackward(da, up_));
    ASSIGN_OR_RETURN(dx, up->Backward(du));
  }
  has_forward_ = false;
  gate_ = up_ = act_ = Tensor();
  return dx;
}

absl::Status Mlp::CheckChildStyles(
    const std::map<std::string, ParallelStyle>& styles, int tp_size) const {
  const bool swiglu = options_.activation == MlpActivation::kSwiGLU;
  const ParallelStyle up = StyleOf(styles, "up_proj"),
                      down = StyleOf(styles, "down_proj"),
                      gate = swiglu ? StyleOf(styles, "gate_proj") : up;
  if (up == ParallelStyle::kReplicate && gate == ParallelStyle::kReplicate &&
      down == ParallelStyle::kReplicate) {
    return absl::OkStatus();
  }
  if (up == ParallelStyle::kColwise && gate == ParallelStyle::kColwise &&
      down == ParallelStyle::kRowwise) {
    return absl::OkStatus();
  }
  return Invalid(
      absl::StrCat("unsupported plan: ", DisplayName(), " (MLP)"),
      absl::StrCat(
          "needs ", swiglu ? "gate_proj and up_proj" : "up_proj",
          " colwise and down_proj rowwise, or all replicated; got ",
          swiglu ? absl::StrCat("gate_proj ", ParallelStyleName(gate), ", ")
                 : "",
          "up_proj ", ParallelStyleName(up), ", down_proj ",
          ParallelStyleName(down)));
}

std::string Mlp::Describe() const {
  return absl::StrCat("MLP(hidden=", options_.hidden, ", ffn=", options_.ffn,
                      ", activation=", MlpActivationName(options_.activation),
                      ")");
}

// ---------------------------------------------------------------------------
// DecoderLayer
// ---------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<DecoderLayer>> DecoderLayer::Create(
    const DecoderConfig& c, int64_t index, bool materialize) {
  const std::string prefix = absl::StrCat("model.layers.", index);
  std::unique_ptr<DecoderLayer> l(new DecoderLayer());
  ASSIGN_OR_RETURN(std::unique_ptr<Module> n1, MakeNorm(c));
  l->RegisterChild("input_layernorm", std::move(n1));
  AttentionOptions ao;
  ao.hidden = c.hidden;
  ao.num_heads = c.heads;
  ao.num_kv_heads = c.num_kv_heads();
  ao.head_dim = c.head_size();
  ao.bias = c.bias;
  ao.rope = c.rope;
  ao.rope_theta = c.rope_theta;
  ao.max_seq = c.max_seq;
  ao.dtype = c.dtype;
  ao.init_std = c.init_std;
  ao.seed = c.seed;
  ao.name = prefix + ".self_attn";
  ao.materialize = materialize;
  ASSIGN_OR_RETURN(std::unique_ptr<Attention> attn, Attention::Create(ao));
  l->RegisterChild("self_attn", std::move(attn));
  ASSIGN_OR_RETURN(std::unique_ptr<Module> n2, MakeNorm(c));
  l->RegisterChild("post_attention_layernorm", std::move(n2));
  MlpOptions mo;
  mo.hidden = c.hidden;
  mo.ffn = c.ffn;
  mo.activation = c.activation;
  mo.bias = c.bias;
  mo.dtype = c.dtype;
  mo.init_std = c.init_std;
  mo.seed = c.seed;
  mo.name = prefix + ".mlp";
  mo.materialize = materialize;
  ASSIGN_OR_RETURN(std::unique_ptr<Mlp> mlp, Mlp::Create(mo));
  l->RegisterChild("mlp", std::move(mlp));
  return l;
}

absl::StatusOr<Tensor> DecoderLayer::Forward(const Tensor& x,
                                             const TokenLayout& layout,
                                             AttentionCache* cache) {
  ASSIGN_OR_RETURN(Module * n1, Child(*this, "input_layernorm"));
  ASSIGN_OR_RETURN(Module * attn_m, Child(*this, "self_attn"));
  ASSIGN_OR_RETURN(Module * n2, Child(*this, "post_attention_layernorm"));
  ASSIGN_OR_RETURN(Module * mlp, Child(*this, "mlp"));
  Attention* attn = dynamic_cast<Attention*>(attn_m);
  if (attn == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat(DisplayName(), ": self_attn is a ", attn_m->type(),
                     ", not an Attention"));
  }
  has_forward_ = false;
  ASSIGN_OR_RETURN(Tensor h, n1->Forward(x));
  ASSIGN_OR_RETURN(h, attn->Forward(h, layout, cache));
  ASSIGN_OR_RETURN(h, ops::Add(x, h));
  ASSIGN_OR_RETURN(Tensor m, n2->Forward(h));
  ASSIGN_OR_RETURN(m, mlp->Forward(m));
  ASSIGN_OR_RETURN(Tensor y, ops::Add(h, m));
  has_forward_ = cache == nullptr;
  return y;
}

absl::StatusOr<Tensor> DecoderLayer::Backward(const Tensor& grad_out) {
  if (!has_forward_) {
    return absl::FailedPreconditionError(absl::StrCat(
        DisplayName(), ": Backward without a preceding (uncached) Forward"));
  }
  ASSIGN_OR_RETURN(Module * n1, Child(*this, "input_layernorm"));
  ASSIGN_OR_RETURN(Module * attn, Child(*this, "self_attn"));
  ASSIGN_OR_RETURN(Module * n2, Child(*this, "post_attention_layernorm"));
  ASSIGN_OR_RETURN(Module * mlp, Child(*this, "mlp"));
  ASSIGN_OR_RETURN(Tensor d, mlp->Backward(grad_out));
  ASSIGN_OR_RETURN(d, n2->Backward(d));
  ASSIGN_OR_RETURN(Tensor dh, ops::Add(grad_out, d));
  ASSIGN_OR_RETURN(d, attn->Backward(dh));
  ASSIGN_OR_RETURN(d, n1->Backward(d));
  has_forward_ = false;
  return ops::Add(dh, d);
}

// ---------------------------------------------------------------------------
// Decoder
// ---------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Decoder>> Decoder::Create(
    const DecoderConfig& config, bool materialize) {
  RETURN_IF_ERROR(config.Validate());
  std::unique_ptr<Decoder> dec(new Decoder(config));
  const DecoderConfig& c = dec->config_;
  auto model = std::make_unique<ModuleContainer>("DecoderModel");
  EmbeddingOptions eo;
  eo.vocab_size = c.vocab;
  eo.hidden_size = c.hidden;
  eo.dtype = c.dtype;
  eo.init = InitSpec::Normal(0.0, c.init_std,
                             SeedFor(c.seed, "model.embed_tokens.weight"));
  eo.materialize = materialize;
  ASSIGN_OR_RETURN(std::unique_ptr<Embedding> embed, Embedding::Create(eo));
  model->Add("embed_tokens", std::move(embed));
  auto layers = std::make_unique<ModuleContainer>("ModuleList");
  for (int64_t i = 0; i < c.layers; ++i) {
    ASSIGN_OR_RETURN(std::unique_ptr<DecoderLayer> layer,
                     DecoderLayer::Create(c, i, materialize));
    layers->Add(absl::StrCat(i), std::move(layer));
  }
  model->Add("layers", std::move(layers));
  ASSIGN_OR_RETURN(std::unique_ptr<Module> norm, MakeNorm(c));
  model->Add("norm", std::move(norm));
  dec->RegisterChild("model", std::unique_ptr<Module>(std::move(model)));
  ASSIGN_OR_RETURN(std::unique_ptr<Linear> head,
                   MakeLinear(c.hidden, c.vocab, /*bias=*/false, c.dtype,
                              c.init_std, c.seed, "lm_head", materialize));
  dec->RegisterChild("lm_head", std::move(head));
  return dec;
}

Communicator* Decoder::vocab_group() const {
  auto* head = dynamic_cast<ColumnParallelLinearModule*>(child("lm_head"));
  return head == nullptr ? nullptr : &head->communicator();
}

absl::StatusOr<TokenLayout> Decoder::CheckIds(const Tensor& ids,
                                              absl::string_view what,
                                              int64_t past) const {
  if (!ids.defined() || ids.ndim() != 2 || !IsIntegerIds(ids) ||
      ids.dim(0) < 1 || ids.dim(1) < 1) {
    return Invalid(
        "Decoder",
        absl::StrCat(what,
                     " must be int32/int64 [batch, seq] with "
                     "batch, seq >= 1, got ",
                     ids.defined() ? absl::StrCat(DTypeName(ids.dtype()), " ",
                                                  ShapeToString(ids.shape()))
                                   : "undefined"));
  }
  if (past + ids.dim(1) > config_.max_seq) {
    return Invalid("Decoder",
                   absl::StrCat(what, ": sequence length ", past + ids.dim(1),
                                " exceeds max_seq ", config_.max_seq));
  }
  return TokenLayout{ids.dim(0), ids.dim(1)};
}

absl::StatusOr<Tensor> Decoder::Trunk(const Tensor& ids,
                                      const TokenLayout& layout,
                                      DecoderCache* cache) {
  ASSIGN_OR_RETURN(Module * embed, Find("model.embed_tokens"));
  ASSIGN_OR_RETURN(Module * layers, Find("model.layers"));
  ASSIGN_OR_RETURN(Module * norm, Find("model.norm"));
  ASSIGN_OR_RETURN(Tensor flat, ids.Contiguous().Reshape({layout.tokens()}));
  ASSIGN_OR_RETURN(Tensor h, embed->Forward(flat));  // [T, hidden]
  const auto blocks = layers->children();
  if (cache != nullptr && cache->layers_.size() != blocks.size()) {
    if (cache->length() != 0) {
      return Invalid(DisplayName(),
                     absl::StrCat("cache holds ", cache->layers_.size(),
                                  " layers, the model has ", blocks.size()));
    }
    cache->layers_.assign(blocks.size(), AttentionCache());
  }
  for (size_t i = 0; i < blocks.size(); ++i) {
    auto* layer = dynamic_cast<DecoderLayer*>(blocks[i].second);
    if (layer == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat(blocks[i].second->DisplayName(), " is a ",
                       blocks[i].second->type(), ", not a DecoderLayer"));
    }
    ASSIGN_OR_RETURN(
        h, layer->Forward(h, layout, cache ? &cache->layers_[i] : nullptr));
  }
  return norm->Forward(h);
}

absl::StatusOr<Tensor> Decoder::Forward(const Tensor& ids) {
  ASSIGN_OR_RETURN(TokenLayout layout, CheckIds(ids, "ids", 0));
  has_forward_ = has_loss_ = false;
  ASSIGN_OR_RETURN(Module * head, Child(*this, "lm_head"));
  ASSIGN_OR_RETURN(Tensor h, Trunk(ids, layout, nullptr));
  ASSIGN_OR_RETURN(Tensor logits, head->Forward(h));  // [T, V_local]
  ASSIGN_OR_RETURN(logits,
                   logits.Reshape({layout.batch, layout.seq, logits.dim(1)}));
  logits_shape_ = logits.shape();
  has_forward_ = true;
  return logits;
}

absl::StatusOr<Tensor> Decoder::Backward(const Tensor& grad_logits) {
  if (!has_forward_) {
    return absl::FailedPreconditionError(absl::StrCat(
        DisplayName(),
        ": Backward without a preceding Forward (ForwardStep and Generate do "
        "not prepare one)"));
  }
  if (!grad_logits.defined() || grad_logits.shape() != logits_shape_ ||
      grad_logits.dtype() != config_.dtype) {
    return Invalid(DisplayName(), absl::StrCat("grad_logits must be ",
                                               ShapeToString(logits_shape_),
                                               " ", DTypeName(config_.dtype)));
  }
  ASSIGN_OR_RETURN(Module * head, Child(*this, "lm_head"));
  ASSIGN_OR_RETURN(Module * embed, Find("model.embed_tokens"));
  ASSIGN_OR_RETURN(Module * layers, Find("model.layers"));
  ASSIGN_OR_RETURN(Module * norm, Find("model.norm"));
  ASSIGN_OR_RETURN(
      Tensor d, grad_logits.Contiguous().Reshape(
                    {logits_shape_[0] * logits_shape_[1], logits_shape_[2]}));
  ASSIGN_OR_RETURN(d, head->Backward(d));
  ASSIGN_OR_RETURN(d, norm->Backward(d));
  const auto blocks = layers->children();
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
    ASSIGN_OR_RETURN(d, it->second->Backward(d));
  }
  RETURN_IF_ERROR(embed->Backward(d).status());
  has_forward_ = has_loss_ = false;
  return Tensor();
}

absl::StatusOr<double> Decoder::ForwardLoss(const Tensor& ids,
                                            const Tensor& targets) {
  ASSIGN_OR_RETURN(TokenLayout layout, CheckIds(ids, "ids", 0));
  if (!targets.defined() || !IsIntegerIds(targets) ||
      targets.shape() != ids.shape()) {
    return Invalid(
        DisplayName(),
        absl::StrCat("targets must be int32/int64 ", ShapeToString(ids.shape()),
                     " like ids, got ",
                     targets.defined()
                         ? absl::StrCat(DTypeName(targets.dtype()), " ",
                                        ShapeToString(targets.shape()))
                         : "undefined"));
  }
  // Target range is checked before any work (every rank sees the same ids).
  ASSIGN_OR_RETURN(Tensor t64, ops::Cast(targets, DType::kInt64));
  const int64_t* tv = t64.data<int64_t>();
  const int64_t T = layout.tokens();
  for (int64_t i = 0; i < T; ++i) {
    if (tv[i] < 0 || tv[i] >= config_.vocab) {
      return Invalid(DisplayName(),
                     absl::StrCat("target id ", tv[i], " at position ", i,
                                  " is outside [0, ", config_.vocab, ")"));
    }
  }
  ASSIGN_OR_RETURN(Tensor logits, Forward(ids));  // [B, S, V_local]
  ASSIGN_OR_RETURN(Tensor l2, logits.Reshape({T, logits.dim(2)}));
  if (Communicator* group = vocab_group()) {
    parallel_loss_ = std::make_unique<VocabParallelCrossEntropy>(
        *group, absl::StrCat(DisplayName(), " loss"));
    ASSIGN_OR_RETURN(double loss, parallel_loss_->Forward(l2, t64));
    has_loss_ = true;
    return loss;
  }
  // Serial cross-entropy in float64 over the full vocabulary.
  const int64_t V = l2.dim(1);
  const std::vector<double> z = l2.ToDoubles();
  std::vector<double> grad(z.size());
  double loss = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    const double* row = z.data() + t * V;
    const double mx = *std::max_element(row, row + V);
    double sum = 0.0;
    for (int64_t j = 0; j < V; ++j) sum += std::exp(row[j] - mx);
    const double lse = mx + std::log(sum);
    loss += lse - row[tv[t]];
    for (int64_t j = 0; j < V; ++j) {
      grad[t * V + j] = (std::exp(row[j] - lse) - (j == tv[t] ? 1.0 : 0.0)) / T;
    }
  }
  ASSIGN_OR_RETURN(serial_dlogits_,
                   Tensor::FromDoubles(grad, {T, V}, DType::kFloat64));
  has_loss_ = true;
  return loss / T;
}

absl::Status Decoder::BackwardLoss(double grad_loss) {
  if (!has_loss_ || !has_forward_) {
    return absl::FailedPreconditionError(absl::StrCat(
        DisplayName(), ": BackwardLoss without a preceding ForwardLoss"));
  }
  Tensor d;
  if (Communicator* group = vocab_group(); group != nullptr && parallel_loss_) {
    ASSIGN_OR_RETURN(d, parallel_loss_->Backward(grad_loss));
  } else {
    ASSIGN_OR_RETURN(d, ops::Scale(serial_dlogits_, grad_loss));
    ASSIGN_OR_RETURN(d, ops::Cast(d, config_.dtype));
  }
  ASSIGN_OR_RETURN(d, d.Reshape(logits_shape_));
  RETURN_IF_ERROR(Backward(d).status());
  parallel_loss_.reset();
  serial_dlogits_ = Tensor();
  return absl::OkStatus();
}

absl::StatusOr<Tensor> Decoder::ForwardStep(const Tensor& ids,
                                            DecoderCache& cache) {
  ASSIGN_OR_RETURN(TokenLayout layout, CheckIds(ids, "ids", cache.length()));
  has_forward_ = has_loss_ = false;
  const int64_t before = cache.length();
  auto step = [&]() -> absl::StatusOr<Tensor> {
    ASSIGN_OR_RETURN(Module * head, Child(*this, "lm_head"));
    ASSIGN_OR_RETURN(Tensor h, Trunk(ids, layout, &cache));  // [B*S, H]
    ASSIGN_OR_RETURN(h, h.Reshape({layout.batch, layout.seq, h.dim(1)}));
    ASSIGN_OR_RETURN(h, h.Narrow(1, layout.seq - 1, 1));
    ASSIGN_OR_RETURN(h, h.Reshape({layout.batch, h.dim(2)}));
    return head->Forward(h);
  };
  absl::StatusOr<Tensor> logits = step();
  if (!logits.ok()) {
    // Layers before the failing one have appended this step: roll them
    // back, so that every layer holds the same positions as before.
    for (AttentionCache& c : cache.layers_) {
      if (c.length() > before) c.Truncate(before).IgnoreError();
    }
  }
  return logits;
}

absl::StatusOr<Tensor> Decoder::GreedyTokens(const Tensor& logits) {
  if (!logits.defined() || logits.ndim() != 2 || logits.dim(0) < 1 ||
      !IsFloatingPoint(logits.dtype())) {
    return Invalid(DisplayName(),
                   absl::StrCat("GreedyTokens needs floating logits [batch, "
                                "V_local], got ",
                                logits.defined() ? ShapeToString(logits.shape())
                                                 : "undefined"));
  }
  const int64_t B = logits.dim(0), V = logits.dim(1);
  Communicator* group = vocab_group();
  const int64_t expect_v = config_.vocab / (group ? group->size() : 1);
  if (V != expect_v) {
    return Invalid(
        DisplayName(),
        absl::StrCat("GreedyTokens: logits have ", V,
                     " columns, this rank's vocabulary is ", expect_v));
  }
  const std::vector<double> z = logits.ToDoubles();
  std::vector<double> best(B);
  std::vector<int64_t> arg(B);
  for (int64_t b = 0; b < B; ++b) {
    const double* row = z.data() + b * V;
    // The first maximum; NaN never wins. An all-NaN slice sends NaN with
    // its first id, so that an all-NaN row gives id 0 at every TP size.
    int64_t j_best = -1;
    for (int64_t j = 0; j < V; ++j) {
      if (!std::isnan(row[j]) && (j_best < 0 || row[j] > row[j_best])) {
        j_best = j;
      }
    }
    best[b] =
        j_best < 0 ? std::numeric_limits<double>::quiet_NaN() : row[j_best];
    arg[b] = j_best < 0 ? 0 : j_best;
  }
  if (group == nullptr) {
    return Tensor::FromVector<int64_t>(arg, {B});
  }
  // One all-gather of every rank's (maximum, global id) pair; every rank
  // then picks the largest value, ties to the smallest id (ranks hold
  // increasing ids, so the first rank in order that reaches it), skipping
  // all-NaN slices (id 0 when every slice is).
  const int64_t offset = static_cast<int64_t>(group->rank()) * V;
  std::vector<double> pairs(2 * B);
  for (int64_t b = 0; b < B; ++b) {
    pairs[2 * b] = best[b];
    pairs[2 * b + 1] = static_cast<double>(offset + arg[b]);  // < 2^53: exact
  }
  ASSIGN_OR_RETURN(Tensor mine, Tensor::FromVector<double>(pairs, {B, 2}));
  Tensor all = Tensor::Empty({group->size() * B, 2}, DType::kFloat64);
  RETURN_IF_ERROR(group->AllGather(mine, all));
  const double* a = all.data<double>();
  std::vector<int64_t> ids(B);
  for (int64_t b = 0; b < B; ++b) {
    double value = a[2 * b];
    double id = a[2 * b + 1];
    for (int r = 1; r < group->size(); ++r) {
      const double* p = a + 2 * (static_cast<int64_t>(r) * B + b);
      if (!std::isnan(p[0]) && (std::isnan(value) || p[0] > value)) {
        value = p[0];
        id = p[1];
      }
    }
    ids[b] = static_cast<int64_t>(id);
  }
  return Tensor::FromVector<int64_t>(ids, {B});
}

absl::StatusOr<Tensor> Decoder::Generate(const Tensor& prompt,
                                         const GenerateOptions& options) {
  if (options.max_new_tokens < 0) {
    return Invalid(DisplayName(), absl::StrCat("max_new_tokens ",
                                               options.max_new_tokens, " < 0"));
  }
  ASSIGN_OR_RETURN(TokenLayout layout, CheckIds(prompt, "prompt", 0));
  const int64_t B = layout.batch, P = layout.seq, N = options.max_new_tokens;
  if (P + N > config_.max_seq) {
    return Invalid(DisplayName(),
                   absl::StrCat("prompt length ", P, " + max_new_tokens ", N,
                                " exceeds max_seq ", config_.max_seq));
  }
  ASSIGN_OR_RETURN(Tensor p64, ops::Cast(prompt, DType::kInt64));
  Tensor out = Tensor::Zeros({B, P + N}, DType::kInt64);
  {
    ASSIGN_OR_RETURN(Tensor head, out.Narrow(1, 0, P));
    RETURN_IF_ERROR(head.CopyFrom(p64));
  }
  has_forward_ = has_loss_ = false;
  DecoderCache cache;
  Tensor logits;  // [B, V_local] of the last position
  if (N > 0 && options.use_kv_cache) {
    ASSIGN_OR_RETURN(logits, ForwardStep(p64, cache));
  }
  for (int64_t n = 0; n < N; ++n) {
    if (!options.use_kv_cache) {
      ASSIGN_OR_RETURN(Tensor seq, out.Narrow(1, 0, P + n));
      ASSIGN_OR_RETURN(Tensor all, Forward(seq.Contiguous()));  // [B, S, V]
      ASSIGN_OR_RETURN(all, all.Narrow(1, P + n - 1, 1));
      ASSIGN_OR_RETURN(logits, all.Reshape({B, all.dim(2)}));
    }
    ASSIGN_OR_RETURN(Tensor next, GreedyTokens(logits));  // [B]
    ASSIGN_OR_RETURN(Tensor col, out.Narrow(1, P + n, 1));
    ASSIGN_OR_RETURN(Tensor next2, next.Reshape({B, 1}));
    RETURN_IF_ERROR(col.CopyFrom(next2));
    if (options.on_token) options.on_token(n, next);
    if (options.use_kv_cache && n + 1 < N) {
      ASSIGN_OR_RETURN(logits, ForwardStep(next2, cache));
    }
  }
  has_forward_ = has_loss_ = false;
  return out;
}

absl::Status Decoder::CheckChildStyles(
    const std::map<std::string, ParallelStyle>& styles, int tp_size) const {
  for (const auto& [name, style] : styles) {
    if (style == ParallelStyle::kReplicate) continue;
    if (name == "lm_head" && (style == ParallelStyle::kColwise ||
                              style == ParallelStyle::kVocabParallel)) {
      continue;
    }
    return Invalid(
        absl::StrCat("unsupported plan: ", DisplayName(), " (Decoder)"),
        absl::StrCat("child \"", name, "\" cannot be ",
                     ParallelStyleName(style),
                     " (only lm_head may be colwise/vocab_parallel)"));
  }
  return absl::OkStatus();
}

std::string Decoder::Describe() const {
  return absl::StrCat("Decoder(", config_.ToString(), ")");
}

}  // namespace tp
