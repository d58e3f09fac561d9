#include "layers/model_wrapper.h"

#include <fnmatch.h>

#include <algorithm>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "glog/logging.h"
#include "layers/parallel_modules.h"
#include "runtime/status_macros.h"

namespace tp {
namespace {

// The automatic plan's rules, by leaf name (see the header).
ParallelStyle AutoStyle(absl::string_view leaf, const Module& m) {
  if (m.type() == "Embedding") return ParallelStyle::kVocabParallel;
  if (m.type() != "Linear") return ParallelStyle::kReplicate;
  for (absl::string_view n :
       {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}) {
    if (leaf == n) return ParallelStyle::kColwise;
  }
  if (leaf == "o_proj" || leaf == "down_proj") return ParallelStyle::kRowwise;
  if (leaf == "lm_head") return ParallelStyle::kVocabParallel;
  return ParallelStyle::kReplicate;
}

absl::string_view LeafName(absl::string_view path) {
  const size_t dot = path.rfind('.');
  return dot == absl::string_view::npos ? path : path.substr(dot + 1);
}

absl::Status CheckPattern(const std::string& pattern) {
  if (pattern.empty()) {
    return absl::InvalidArgumentError("bad plan pattern: empty pattern");
  }
  for (char ch : pattern) {
    const bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                    (ch >= '0' && ch <= '9') || ch == '_' || ch == '.' ||
                    ch == '*' || ch == '?';
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat(
          "bad plan pattern \"", pattern, "\": character '", std::string(1, ch),
          "' is not allowed (use letters, digits, '_', '.', '*', '?')"));
    }
  }
  return absl::OkStatus();
}

bool Matches(const std::string& pattern, const std::string& path) {
  // No FNM_PATHNAME / FNM_PERIOD: '*' also matches dots. CheckPattern has
  // excluded '[' and '\\', so only '*' and '?' are special.
  return fnmatch(pattern.c_str(), path.c_str(), 0) == 0;
}

bool IsNorm(const Module& m) {
  return m.type() == "LayerNorm" || m.type() == "RMSNorm";
}

absl::Status Unsupported(const std::string& path, const Module& m,
                         ParallelStyle style, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat(
      "unsupported module: ", path.empty() ? "(root)" : path, " (", m.type(),
      ") cannot be ", ParallelStyleName(style), ": ", why));
}

absl::Status Indivisible(const std::string& path, const Module& m,
                         absl::string_view what, int64_t value, int tp) {
  return absl::InvalidArgumentError(
      absl::StrCat(path, " (", m.type(), "): ", what, " ", value,
                   " is not divisible by the tensor-parallel size ", tp));
}

// Whether leaf `m` has a parallel version for `style` (divisibility aside).
absl::Status CheckLeafStyle(const std::string& path, const Module& m,
                            ParallelStyle style, bool automatic) {
  if (m.type() == "ColumnParallelLinear" || m.type() == "RowParallelLinear" ||
      m.type() == "VocabParallelEmbedding") {
    return Unsupported(path, m, style, "the model is already parallelised");
  }
  if (dynamic_cast<const Linear*>(&m) != nullptr) return absl::OkStatus();
  if (dynamic_cast<const Embedding*>(&m) != nullptr) {
    if (style == ParallelStyle::kReplicate ||
        style == ParallelStyle::kVocabParallel) {
      return absl::OkStatus();
    }
    return Unsupported(path, m, style,
                       "an Embedding is replicate or vocab_parallel");
  }
  if (style != ParallelStyle::kReplicate) {
    return Unsupported(path, m, style,
                       IsNorm(m) ? "norms are replicated"
                                 : "only Linear and Embedding have parallel "
                                   "versions");
  }
  if (automatic && !m.LocalParameters().empty() && !IsNorm(m)) {
    return Unsupported(path, m, style,
                       "the automatic plan does not know this type; give an "
                       "explicit plan (kReplicate keeps it whole)");
  }
  return absl::OkStatus();
}

// Checks the divisibility of a supported leaf's split dimension and fills
// its plan entry.
absl::Status PlanLeaf(const std::string& path, const Module& m,
                      ParallelStyle style, int tp, PlanEntry* e) {
  e->module = path;
  e->type = m.type();
  e->style = style;
  for (const ParameterShard& p : m.LocalParameters()) {
    e->full_elements += NumElements(p.full_shape);
    if (p.name == "weight" || e->full_shape.empty())
      e->full_shape = p.full_shape;
  }
  e->shard_shape = e->full_shape;
  e->shard_elements = e->full_elements;
  if (const auto* lin = dynamic_cast<const Linear*>(&m)) {
    const int64_t out = lin->options().out_features;
    const int64_t in = lin->options().in_features;
    const int64_t bias = lin->options().bias ? 1 : 0;
    switch (style) {
      case ParallelStyle::kReplicate:
        break;
      case ParallelStyle::kColwise:
      case ParallelStyle::kVocabParallel:
        if (out % tp != 0) {
          return Indivisible(path, m,
                             style == ParallelStyle::kColwise
                                 ? "out_features"
                                 : "out_features (vocab)",
                             out, tp);
        }
        e->shard_shape = {out / tp, in};
        e->shard_elements = out / tp * in + bias * out / tp;
        break;
      case ParallelStyle::kRowwise:
        if (in % tp != 0) return Indivisible(path, m, "in_features", in, tp);
        e->shard_shape = {out, in / tp};
        e->shard_elements = out * (in / tp) + bias * out;
        break;
    }
  } else if (const auto* emb = dynamic_cast<const Embedding*>(&m)) {
    const int64_t v = emb->options().vocab_size;
    const int64_t h = emb->options().hidden_size;
    if (style == ParallelStyle::kVocabParallel) {
      if (v % tp != 0) return Indivisible(path, m, "vocab_size", v, tp);
      e->shard_shape = {v / tp, h};
      e->shard_elements = v / tp * h;
    }
  }
  return absl::OkStatus();
}

}  // namespace

ParallelPlan ParallelPlan::Auto() { return ParallelPlan(); }

ParallelPlan ParallelPlan::Explicit(
    std::vector<std::pair<std::string, ParallelStyle>> rules) {
  ParallelPlan p;
  p.automatic = false;
  p.rules = std::move(rules);
  return p;
}

ParallelPlan ParallelPlan::Llama() {
  return Explicit({
      {"*.embed_tokens", ParallelStyle::kVocabParallel},
      {"lm_head", ParallelStyle::kVocabParallel},
      {"*.q_proj", ParallelStyle::kColwise},
      {"*.k_proj", ParallelStyle::kColwise},
      {"*.v_proj", ParallelStyle::kColwise},
      {"*.gate_proj", ParallelStyle::kColwise},
      {"*.up_proj", ParallelStyle::kColwise},
      {"*.o_proj", ParallelStyle::kRowwise},
      {"*.down_proj", ParallelStyle::kRowwise},
  });
}

absl::StatusOr<std::vector<PlanEntry>> ResolvePlan(const Module& root,
                                                   int tp_size,
                                                   const ParallelPlan& plan) {
  if (tp_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("ResolvePlan: tensor-parallel size ", tp_size, " < 1"));
  }
  const std::vector<std::pair<std::string, Module*>> modules =
      root.NamedModules();
  if (!plan.automatic) {
    for (const auto& [pattern, style] : plan.rules) {
      RETURN_IF_ERROR(CheckPattern(pattern));
      bool any = false;
      for (const auto& entry : modules) {
        if (!entry.first.empty() && Matches(pattern, entry.first)) {
          any = true;
          break;
        }
      }
      if (!any) {
        return absl::InvalidArgumentError(absl::StrCat(
            "bad plan pattern \"", pattern, "\" (", ParallelStyleName(style),
            "): it matches no module of the ", root.type()));
      }
    }
  }
  // Pass 1: every module's style.
  std::map<const Module*, ParallelStyle> style;
  for (const auto& [path, m] : modules) {
    ParallelStyle s = ParallelStyle::kReplicate;
    if (path.empty()) {
      // The root itself is never replaced.
    } else if (plan.automatic) {
      if (m->children().empty()) s = AutoStyle(LeafName(path), *m);
    } else {
      for (const auto& [pattern, rule_style] : plan.rules) {
        if (Matches(pattern, path)) {
          s = rule_style;
          break;
        }
      }
    }
    style[m] = s;
  }
  // Pass 2: each module can take its style (composites take none).
  for (const auto& [path, m] : modules) {
    const ParallelStyle s = style[m];
    if (path.empty() && s != ParallelStyle::kReplicate) {
      return Unsupported(path, *m, s, "the root is never replaced");
    }
    if (!m->children().empty() && s != ParallelStyle::kReplicate) {
      return Unsupported(path, *m, s,
                         "only leaves (Linear, Embedding) are parallelised; "
                         "a composite's children are planned one by one");
    }
    if (m->children().empty()) {
      RETURN_IF_ERROR(CheckLeafStyle(path, *m, s, plan.automatic));
    }
  }
  // Pass 3: composites accept their children's styles (pre-order, so the
  // outermost complaint comes first).
  for (const auto& [path, m] : modules) {
    const auto children = m->children();
    if (children.empty()) continue;
    std::map<std::string, ParallelStyle> child_styles;
    for (const auto& [name, c] : children) child_styles[name] = style[c];
    RETURN_IF_ERROR(m->CheckChildStyles(child_styles, tp_size));
  }
  // Pass 4: leaves -- divisibility and entries.
  std::vector<PlanEntry> entries;
  for (const auto& [path, m] : modules) {
    if (!m->children().empty()) continue;
    PlanEntry e;
    RETURN_IF_ERROR(PlanLeaf(path, *m, style[m], tp_size, &e));
    if (e.full_elements > 0) entries.push_back(std::move(e));
  }
  return entries;
}

std::string FormatPlanTable(const std::vector<PlanEntry>& entries,
                            int tp_size) {
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"module", "type", "style", "full shape", "shard shape"});
  int64_t full = 0, shard = 0;
  for (const PlanEntry& e : entries) {
    rows.push_back({e.module.empty() ? "(root)" : e.module, e.type,
                    std::string(ParallelStyleName(e.style)),
                    ShapeToString(e.full_shape), ShapeToString(e.shard_shape)});
    full += e.full_elements;
    shard += e.shard_elements;
  }
  std::vector<size_t> width(5, 0);
  for (const auto& r : rows) {
    for (size_t i = 0; i < r.size(); ++i)
      width[i] = std::max(width[i], r[i].size());
  }
  std::string out;
  for (size_t k = 0; k < rows.size(); ++k) {
    std::vector<std::string> cells;
    for (size_t i = 0; i < rows[k].size(); ++i) {
      std::string cell = rows[k][i];
      if (i + 1 < rows[k].size()) cell.resize(width[i], ' ');
      cells.push_back(cell);
    }
    absl::StrAppend(&out, absl::StrJoin(cells, " | "), "\n");
    if (k == 0) {
      std::vector<std::string> rule;
      for (size_t w : width) rule.push_back(std::string(w, '-'));
      absl::StrAppend(&out, absl::StrJoin(rule, "-|-"), "\n");
    }
  }
  absl::StrAppend(&out, "tensor parallel size ", tp_size, ": ", shard, " of ",
                  full, " parameters per rank\n");
  return out;
}

// ---------------------------------------------------------------------------
// DistributedModelWrapper
// ---------------------------------------------------------------------------

namespace {

// Copies `src` into the tensor `dst` (a handle sharing the layer's storage).
absl::Status CopyInto(Tensor dst, const Tensor& src) {
  return dst.CopyFrom(src);
}

absl::StatusOr<std::unique_ptr<Module>> BuildParallel(Communicator& comm,
                                                      const PlanEntry& e,
                                                      Module& serial) {
  if (auto* lin = dynamic_cast<Linear*>(&serial)) {
    const LinearOptions& o = lin->options();
    const bool sliced = lin->materialized();
    // A materialised weight is copied from; otherwise each rank generates
    // only its shard from the init spec (skipped when we copy anyway).
    const InitSpec winit = sliced ? InitSpec::Constant(0.0) : o.weight_init;
    const InitSpec binit = sliced ? InitSpec::Constant(0.0) : o.bias_init;
    if (e.style == ParallelStyle::kRowwise) {
      RowParallelLinear::Options ro;
      ro.in_features = o.in_features;
      ro.out_features = o.out_features;
      ro.bias = o.bias;
      ro.input_is_parallel = true;
      ro.dtype = o.dtype;
      ro.weight_init = winit;
      ro.bias_init = binit;
      ro.name = e.module;
      ASSIGN_OR_RETURN(std::unique_ptr<RowParallelLinearModule> m,
                       RowParallelLinearModule::Create(comm, ro));
      if (sliced) {
        const RowParallelLinear& l = m->layer();
        ASSIGN_OR_RETURN(Tensor w, lin->weight().Narrow(1, l.in_offset(),
                                                        l.local_in_features()));
        RETURN_IF_ERROR(CopyInto(l.weight(), w));
        if (o.bias) RETURN_IF_ERROR(CopyInto(l.bias(), lin->bias()));
      }
      return std::unique_ptr<Module>(std::move(m));
    }
    ColumnParallelLinear::Options co;
    co.in_features = o.in_features;
    co.out_features = o.out_features;
    co.bias = o.bias;
    co.gather_output = false;
    co.dtype = o.dtype;
    co.weight_init = winit;
    co.bias_init = binit;
    co.name = e.module;
    ASSIGN_OR_RETURN(std::unique_ptr<ColumnParallelLinearModule> m,
                     ColumnParallelLinearModule::Create(comm, co));
    if (sliced) {
      const ColumnParallelLinear& l = m->layer();
      ASSIGN_OR_RETURN(Tensor w, lin->weight().Narrow(0, l.out_offset(),
                                                      l.local_out_features()));
      RETURN_IF_ERROR(CopyInto(l.weight(), w));
      if (o.bias) {
        ASSIGN_OR_RETURN(Tensor b, lin->bias().Narrow(0, l.out_offset(),
                                                      l.local_out_features()));
        RETURN_IF_ERROR(CopyInto(l.bias(), b));
      }
    }
    return std::unique_ptr<Module>(std::move(m));
  }
  if (auto* emb = dynamic_cast<Embedding*>(&serial)) {
    const EmbeddingOptions& o = emb->options();
    const bool sliced = emb->materialized();
    VocabParallelEmbedding::Options vo;
    vo.vocab_size = o.vocab_size;
    vo.hidden_size = o.hidden_size;
    vo.dtype = o.dtype;
    vo.init = sliced ? InitSpec::Constant(0.0) : o.init;
    vo.name = e.module;
    ASSIGN_OR_RETURN(std::unique_ptr<VocabParallelEmbeddingModule> m,
                     VocabParallelEmbeddingModule::Create(comm, vo));
    if (sliced) {
      const VocabParallelEmbedding& l = m->layer();
      ASSIGN_OR_RETURN(Tensor w, emb->weight().Narrow(0, l.vocab_start(),
                                                      l.local_vocab_size()));
      RETURN_IF_ERROR(CopyInto(l.weight(), w));
    }
    return std::unique_ptr<Module>(std::move(m));
  }
  return absl::InternalError(absl::StrCat(e.module, ": no parallel version of ",
                                          serial.type(), " (plan bug)"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<DistributedModelWrapper>>
DistributedModelWrapper::Create(std::unique_ptr<Module> model,
                                Communicator& comm, ParallelPlan plan) {
  if (model == nullptr) {
    return absl::InvalidArgumentError(
        "DistributedModelWrapper::Create: null model");
  }
  ASSIGN_OR_RETURN(std::vector<PlanEntry> entries,
                   ResolvePlan(*model, comm.size(), plan));
  for (const PlanEntry& e : entries) {
    ASSIGN_OR_RETURN(Module * m, model->Find(e.module));
    if (e.style == ParallelStyle::kReplicate) {
      if (auto* lin = dynamic_cast<Linear*>(m)) {
        RETURN_IF_ERROR(lin->Materialize());
      } else if (auto* emb = dynamic_cast<Embedding*>(m)) {
        RETURN_IF_ERROR(emb->Materialize());
      }
      continue;
    }
    ASSIGN_OR_RETURN(std::unique_ptr<Module> replacement,
                     BuildParallel(comm, e, *m));
    const size_t dot = e.module.rfind('.');
    const std::string parent_path =
        dot == std::string::npos ? "" : e.module.substr(0, dot);
    const std::string leaf =
        dot == std::string::npos ? e.module : e.module.substr(dot + 1);
    ASSIGN_OR_RETURN(Module * parent, model->Find(parent_path));
    // The serial leaf (and its full weight, if any) is freed here.
    RETURN_IF_ERROR(
        parent->ReplaceChild(leaf, std::move(replacement)).status());
  }
  return std::unique_ptr<DistributedModelWrapper>(
      new DistributedModelWrapper(std::move(model), comm, std::move(entries)));
}

std::string DistributedModelWrapper::PlanTable() const {
  return FormatPlanTable(entries_, comm_.size());
}

void DistributedModelWrapper::LogPlan() const {
  if (comm_.rank() == 0) LOG(INFO) << "tensor-parallel plan:\n" << PlanTable();
}

}  // namespace tp
