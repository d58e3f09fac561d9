// Module: a small model tree (in the spirit of torch.nn.Module) with named
// children, named parameters and forward/backward, plus the serial leaf
// modules Linear, Embedding, LayerNorm and RMSNorm.
//
// A model is a tree of modules. Each module has a type ("Linear",
// "Attention", ...), ordered named children and its own parameters; the
// dotted path of a module is the chain of child names from the root
// ("model.layers.0.self_attn.q_proj"), and NamedParameters() walks the tree
// and returns every parameter under "<path>.<name>" in pre-order
// (a module's own parameters, then its children's, in registration order),
// e.g. "model.layers.0.self_attn.q_proj.weight".
//
// Parameters are reported as ParameterShard (layers/parameter.h). In a
// serial tree every parameter is a full, replicated tensor (split_dim -1).
// After DistributedModelWrapper (layers/model_wrapper.h) has swapped leaves
// for their tensor-parallel versions (layers/parallel_modules.h), the same
// walk returns each rank's shards with their full shape, split dim and
// offset: one list serves checkpoints and optimizers at any TP size.
//
// Deferred initialisation. Leaves built with `materialize = false` record
// their shapes and InitSpec but allocate nothing (like PyTorch's meta
// device); their parameter tensors are undefined until Materialize(). The
// wrapper generates only each rank's shard from the InitSpec
// (runtime/init.h: the shard is bit-identical to that slice of the full
// weight), so a model larger than one rank's memory can be built, sharded
// and then loaded from a checkpoint. Forward/Backward of an unmaterialised
// leaf is kFailedPrecondition.
//
// Forward/Backward. Leaves map one tensor to one tensor and implement the
// virtual Forward(x)/Backward(grad_out): Forward caches what Backward needs,
// Backward returns dL/dx and ACCUMULATES parameter gradients (until
// ZeroGrad()); a Backward without a preceding Forward is
// kFailedPrecondition. Composite modules (layers/decoder.h) have their own
// typed Forward (token layouts, KV caches) and call their children by name,
// so a child replaced by ReplaceChild() is used from the next call on.
//
// Ownership and threading: a module owns its children (unique_ptr). Modules
// are not thread-safe; one tree per rank.
//
// Errors: kInvalidArgument naming the module path (or type) and the values
// for bad options, shapes and dtypes; kNotFound for a missing child or path;
// kFailedPrecondition for call-order mistakes.
//
// Example:
//   tp::LinearOptions o;
//   o.in_features = 16;  o.out_features = 32;  o.bias = false;
//   o.weight_init = tp::InitSpec::Normal(0, 0.02, tp::SeedFor(1, "fc.weight"));
//   ASSIGN_OR_RETURN(std::unique_ptr<tp::Linear> fc, tp::Linear::Create(o));
//   ASSIGN_OR_RETURN(tp::Tensor y, fc->Forward(x));       // x [T, 16]
//   ASSIGN_OR_RETURN(tp::Tensor dx, fc->Backward(dy));    // dy [T, 32]
//   for (const tp::ParameterShard& p : fc->NamedParameters()) ...  // "weight"
#ifndef TENSOR_PARALLEL_LAYERS_MODULE_H_
#define TENSOR_PARALLEL_LAYERS_MODULE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "layers/parameter.h"
#include "runtime/dtype.h"
#include "runtime/init.h"
#include "runtime/tensor.h"

namespace tp {

// How a leaf module is laid out over a tensor-parallel group (see
// layers/model_wrapper.h). Declared here because composite modules validate
// the styles planned for their children (Module::CheckChildStyles).
enum class ParallelStyle {
  // Unchanged: every rank holds the full module.
  kReplicate,
  // Linear -> ColumnParallelLinear: output features split, output local.
  kColwise,
  // Linear -> RowParallelLinear: input features split (input local), output
  // all-reduced.
  kRowwise,
  // Embedding -> VocabParallelEmbedding (vocabulary rows split, output
  // full); a Linear LM head -> ColumnParallelLinear over the vocabulary
  // (logits local, for the vocab-parallel cross-entropy).
  kVocabParallel,
};

// "replicate", "colwise", "rowwise", "vocab_parallel".
absl::string_view ParallelStyleName(ParallelStyle style);

class Module {
 public:
  virtual ~Module();
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // The module's kind, e.g. "Linear", "RMSNorm", "Attention",
  // "ColumnParallelLinear".
  const std::string& type() const { return type_; }
  // Dotted path from the root of the tree this module is in ("" for a
  // root). Kept up to date by RegisterChild/ReplaceChild.
  const std::string& path() const { return path_; }
  // path(), or "<type>" for a root; for error messages.
  std::string DisplayName() const;

  // ---- Children -----------------------------------------------------------

  // Direct children in registration order (borrowed pointers).
  std::vector<std::pair<std::string, Module*>> children() const;
  // The direct child called `name`, or null.
  Module* child(absl::string_view name) const;
  // The descendant at dotted `path` relative to this module ("" is this
  // module). kNotFound naming the first missing component.
  absl::StatusOr<Module*> Find(absl::string_view path) const;
  // Every module of the subtree in pre-order, this one first under "",
  // each with its path relative to this module.
  std::vector<std::pair<std::string, Module*>> NamedModules() const;
  // Replaces direct child `name` by `replacement` (which takes its place in
  // the order) and returns the old child. kNotFound for an unknown name,
  // kInvalidArgument for a null replacement.
  absl::StatusOr<std::unique_ptr<Module>> ReplaceChild(
      absl::string_view name, std::unique_ptr<Module> replacement);

  // ---- Parameters ---------------------------------------------------------

  // Every parameter of the subtree, named "<relative path>.<name>" (see the
  // file comment), sharing storage with the modules. Undefined tensors for
  // unmaterialised leaves.
  std::vector<ParameterShard> NamedParameters() const;
  // The gradients under the same names and metadata.
  std::vector<ParameterShard> NamedGrads() const;
  // Zeroes every gradient of the subtree.
  void ZeroGrad();
  // Elements of the FULL (TP = 1) parameters of the subtree (replicated and
  // sharded alike are counted once, by their full_shape).
  int64_t CountParameters() const;

  // This module's own parameters / gradients (not its children's), names
  // relative to the module ("weight", "bias"). Default: none.
  virtual std::vector<ParameterShard> LocalParameters() const;
  virtual std::vector<ParameterShard> LocalGrads() const;
  virtual void ZeroLocalGrad();

  // ---- Compute ------------------------------------------------------------

  // One-tensor forward (leaves). Default: kUnimplemented naming the type
  // (composites have their own typed Forward).
  virtual absl::StatusOr<Tensor> Forward(const Tensor& x);
  // dL/d(output) -> dL/d(input) (undefined for integer inputs such as token
  // ids), accumulating parameter gradients. Default: kUnimplemented.
  virtual absl::StatusOr<Tensor> Backward(const Tensor& grad_out);

  // ---- Tensor parallelism -------------------------------------------------

  // Called by the wrapper before it changes anything, with the style planned
  // for each direct child (kReplicate for children left as they are) and
  // the TP size. Returns kInvalidArgument, naming this module and the
  // values, when this module cannot run with its children laid out so.
  // Default: a child's output must stay full, so only kReplicate, and
  // kVocabParallel on an Embedding child, are accepted. Composites that
  // consume local shards (attention, MLP, the decoder's LM head) override.
  virtual absl::Status CheckChildStyles(
      const std::map<std::string, ParallelStyle>& styles, int tp_size) const;

  // ---- Printing -----------------------------------------------------------

  // One line describing this module, e.g. "Linear(in=48, out=96,
  // bias=false)". Default: the type.
  virtual std::string Describe() const;
  // The tree, one module per line, indented, with child names (like
  // PyTorch's print(model)).
  std::string ToString() const;

 protected:
  explicit Module(std::string type) : type_(std::move(type)) {}

  // Adds a child called `name` (non-empty, no '.', unique: CHECKed, a
  // programmer error) and returns it, still owned by this module.
  Module* RegisterChild(std::string name, std::unique_ptr<Module> child);
  template <typename M>
  M* RegisterChild(std::string name, std::unique_ptr<M> child) {
    M* raw = child.get();
    RegisterChild(std::move(name), std::unique_ptr<Module>(std::move(child)));
    return raw;
  }

 private:
  void SetPath(std::string path);

  std::string type_;
  std::string path_;
  std::vector<std::pair<std::string, std::unique_ptr<Module>>> children_;
};

// A module that only holds children (PyTorch's ModuleDict / ModuleList):
// used for the "model" and "layers" levels of the decoder.
class ModuleContainer final : public Module {
 public:
  // `type` is what type() reports, e.g. "ModuleList", "LlamaModel".
  explicit ModuleContainer(std::string type) : Module(std::move(type)) {}
  // Adds a child (see RegisterChild) and returns it.
  Module* Add(std::string name, std::unique_ptr<Module> child) {
    return RegisterChild(std::move(name), std::move(child));
  }
};

// ---------------------------------------------------------------------------
// Serial leaves.
// ---------------------------------------------------------------------------

struct LinearOptions {
  // Input and output features; > 0.
  int64_t in_features = 0;
  int64_t out_features = 0;
  // Whether the layer has a bias [out_features]. Default true (PyTorch).
  bool bias = true;
  // Parameter dtype (any floating dtype); inputs must have it.
  DType dtype = DType::kFloat32;
  // Initialisation of the full [out, in] weight; give each layer its own
  // seed (SeedFor). Default N(0, 0.02), seed 0.
  InitSpec weight_init = InitSpec::Normal(0.0, 0.02, 0);
  // Initialisation of the [out] bias. Default zeros.
  InitSpec bias_init = InitSpec::Constant(0.0);
  // false: deferred initialisation (see the file comment).
  bool materialize = true;
};

// y = x W^T + b with W [out, in]. Parameters "weight" [out, in] and "bias"
// [out] (with bias). x: [..., in] of the layer's dtype -> [..., out].
class Linear final : public Module {
 public:
  using Options = LinearOptions;

  // kInvalidArgument for features <= 0, a non-floating dtype or an invalid
  // init spec (checked even when deferred).
  static absl::StatusOr<std::unique_ptr<Linear>> Create(Options options);

  absl::StatusOr<Tensor> Forward(const Tensor& x) override;
  absl::StatusOr<Tensor> Backward(const Tensor& grad_out) override;

  std::vector<ParameterShard> LocalParameters() const override;
  std::vector<ParameterShard> LocalGrads() const override;
  void ZeroLocalGrad() override;
  std::string Describe() const override;

  bool materialized() const { return weight_.defined(); }
  // Generates the full weight (and bias) from the init specs; no-op when
  // already materialised. Errors from runtime/init.h.
  absl::Status Materialize();

  const Options& options() const { return options_; }
  const Tensor& weight() const { return weight_; }  // [out, in]
  const Tensor& bias() const { return bias_; }      // [out] or undefined
  const Tensor& weight_grad() const { return weight_grad_; }
  const Tensor& bias_grad() const { return bias_grad_; }

 private:
  explicit Linear(Options options)
      : Module("Linear"), options_(std::move(options)) {}

  Options options_;
  Tensor weight_, bias_, weight_grad_, bias_grad_;
  Tensor cached_input_;  // [T, in]
  Shape cached_shape_;
};

struct EmbeddingOptions {
  // Vocabulary size V and embedding width H; > 0.
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  // Table dtype (any floating dtype); the output has it.
  DType dtype = DType::kFloat32;
  // Initialisation of the [V, H] table. Default N(0, 0.02), seed 0.
  InitSpec init = InitSpec::Normal(0.0, 0.02, 0);
  // false: deferred initialisation (see the file comment).
  bool materialize = true;
};

// Row lookup in "weight" [V, H]: ids int32/int64 [...] -> [..., H].
// Backward scatter-adds into the table gradient and returns an undefined
// tensor (ids have no gradient). An id outside [0, V) is kInvalidArgument
// naming the id and its position.
class Embedding final : public Module {
 public:
  using Options = EmbeddingOptions;

  // kInvalidArgument for sizes <= 0, a non-floating dtype, a bad init spec.
  static absl::StatusOr<std::unique_ptr<Embedding>> Create(Options options);

  absl::StatusOr<Tensor> Forward(const Tensor& ids) override;
  absl::StatusOr<Tensor> Backward(const Tensor& grad_out) override;

  std::vector<ParameterShard> LocalParameters() const override;
  std::vector<ParameterShard> LocalGrads() const override;
  void ZeroLocalGrad() override;
  std::string Describe() const override;

  bool materialized() const { return weight_.defined(); }
  absl::Status Materialize();

  const Options& options() const { return options_; }
  const Tensor& weight() const { return weight_; }  // [V, H]
  const Tensor& weight_grad() const { return weight_grad_; }

 private:
  explicit Embedding(Options options)
      : Module("Embedding"), options_(std::move(options)) {}

  Options options_;
  Tensor weight_, weight_grad_;
  Tensor cached_ids_;
};

struct NormModuleOptions {
  // Size of the normalised (last) dimension; > 0.
  int64_t hidden = 0;
  // Added to the variance / mean square; >= 0.
  double eps = 1e-5;
  // Parameter dtype (any floating dtype); inputs must have it.
  DType dtype = DType::kFloat32;
};

// LayerNorm (type "LayerNorm", "weight" = 1 and "bias" = 0, [hidden]) or
// RMSNorm (type "RMSNorm", "weight" = 1): normalisation over the last
// dimension, as ops::LayerNorm / ops::RMSNorm. Always materialised (the
// parameters are small and replicated under tensor parallelism).
class NormModule : public Module {
 public:
  using Options = NormModuleOptions;

  absl::StatusOr<Tensor> Forward(const Tensor& x) override;
  absl::StatusOr<Tensor> Backward(const Tensor& grad_out) override;

  std::vector<ParameterShard> LocalParameters() const override;
  std::vector<ParameterShard> LocalGrads() const override;
  void ZeroLocalGrad() override;
  std::string Describe() const override;

  bool rms() const { return rms_; }
  const Options& options() const { return options_; }
  const Tensor& weight() const { return weight_; }
  const Tensor& bias() const { return bias_; }  // undefined for RMSNorm

 protected:
  NormModule(bool rms, Options options);
  // kInvalidArgument naming `type` for hidden <= 0, eps < 0 or a
  // non-floating dtype; allocates the parameters otherwise.
  absl::Status Init();

 private:
  bool rms_;
  Options options_;
  Tensor weight_, bias_, weight_grad_, bias_grad_;
  Tensor cached_x_, cached_mean_, cached_rstd_;
};

class LayerNorm final : public NormModule {
 public:
  static absl::StatusOr<std::unique_ptr<LayerNorm>> Create(Options options);

 private:
  explicit LayerNorm(Options options) : NormModule(false, std::move(options)) {}
};

class RMSNorm final : public NormModule {
 public:
  static absl::StatusOr<std::unique_ptr<RMSNorm>> Create(Options options);

 private:
  explicit RMSNorm(Options options) : NormModule(true, std::move(options)) {}
};

}  // namespace tp

#endif  // TENSOR_PARALLEL_LAYERS_MODULE_H_
