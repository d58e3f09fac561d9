// A GPT/Llama-style decoder-only transformer built from a config, as a module
// tree (layers/module.h) with Hugging Face Llama parameter names, forward,
// loss, backward and greedy generation with a KV cache.
//
// Tree and parameter names (N = layer index; shapes at TP = 1,
// d = head_dim, kv = kv_heads):
//   model.embed_tokens                       Embedding  weight [vocab, hidden]
//   model.layers.N.input_layernorm           RMSNorm|LayerNorm  weight (bias)
//   model.layers.N.self_attn.q_proj          Linear  weight [heads d, hidden]
//   model.layers.N.self_attn.k_proj          Linear  weight [kv d, hidden]
//   model.layers.N.self_attn.v_proj          Linear  weight [kv d, hidden]
//   model.layers.N.self_attn.o_proj          Linear  weight [hidden, heads d]
//   model.layers.N.post_attention_layernorm  RMSNorm|LayerNorm
//   model.layers.N.mlp.gate_proj             Linear  [ffn, hidden] (SwiGLU
//   only) model.layers.N.mlp.up_proj               Linear  [ffn, hidden]
//   model.layers.N.mlp.down_proj             Linear  [hidden, ffn]
//   model.norm                               RMSNorm|LayerNorm
//   lm_head                                  Linear  weight [vocab, hidden]
// Projections carry a "bias" too when config.bias (GPT-style). Embeddings are
// not tied to lm_head.
//
// Computation (pre-norm, as Llama):
//   h_0 = embed_tokens(ids)
//   a   = h + o_proj(attention(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))
//         with n1 = input_layernorm(h); causal softmax(q k^T / sqrt(d)),
//         grouped-query (query head j uses key/value head j / (heads / kv))
//   h'  = a + mlp(post_attention_layernorm(a)),
//         mlp = down_proj(silu(gate_proj(x)) * up_proj(x))   (SwiGLU)
//             = down_proj(gelu(up_proj(x)))                  (GeLU, tanh)
//   logits = lm_head(norm(h_L))
// Rotary position embeddings (config.rope, on by default) use Hugging Face
// Llama's "rotate half" convention: for i < d/2, with
// theta_i = pos * rope_theta^(-2i/d), (x_i, x_{i+d/2}) is rotated by theta_i.
// Without rope the model has no positional information.
//
// Serial and tensor-parallel with the same code. The decoder is built from
// serial leaves; DistributedModelWrapper (layers/model_wrapper.h) replaces
// them by tensor-parallel modules (q/k/v/gate/up column-parallel, o/down
// row-parallel, embed_tokens and lm_head vocab-parallel, norms replicated).
// Attention and MLP read their local sizes from what their projections
// return (local heads = q_proj's output features / head_dim, and so on), so
// they run unchanged on a rank's shard, and the decoder learns from lm_head
// whether the logits are the full vocabulary or this rank's slice (a
// ColumnParallelLinearModule) and over which communicator. This design was
// chosen over rebuilding ParallelSelfAttention / ParallelMLP because the
// Hugging Face names need separate q/k/v and gate/up projections (those
// blocks fuse them), and because a plan can then be any mapping of names to
// styles, checked by each composite's CheckChildStyles. The backward pass
// makes Megatron's 2 all-reduces per layer: q, k and v (and gate, up) each
// compute their partial input gradient, and their sum is all-reduced once
// (ColumnSiblingsBackward in layers/parallel_modules.h).
//
// Logits and loss. Forward returns logits [batch, seq, V_local] where
// V_local = vocab / tp and rank r holds ids [r V_local, (r + 1) V_local)
// when lm_head is vocab-parallel, else V_local = vocab. ForwardLoss
// computes the mean cross-entropy over all batch x seq tokens, with
// VocabParallelCrossEntropy over the lm_head's group (the full logits are
// never gathered) or serially in float64; BackwardLoss back-propagates it.
//
// Generation. ForwardStep feeds the next positions of a batch of sequences
// and appends their keys and values to a DecoderCache; GreedyTokens takes the
// argmax over the full vocabulary (one all-gather of each rank's local
// maximum and its id; ties go to the smallest id, NaN never wins, and every
// rank gets the same tokens); Generate loops prefill + one token at a time.
// A ForwardStep that fails leaves the DecoderCache with the positions it had.
//
// Calling contract (as layers/linear.h): under tensor parallelism every rank
// of the group calls the same methods in the same order with the same ids.
// Backward/BackwardLoss need a preceding Forward/ForwardLoss (not a
// ForwardStep); gradients accumulate until ZeroGrad(). Not thread-safe.
//
// Errors: kInvalidArgument naming the module and the values for an invalid
// config, ids that are not int32/int64 [batch, seq] or are out of range,
// targets of another shape, sequences longer than max_seq, a cache that
// does not fit; kFailedPrecondition for call-order mistakes and for
// unmaterialised weights; collective errors unchanged.
//
// Example (serial training step, then generation):
//   tp::DecoderConfig c;
//   c.hidden = 256;  c.heads = 8;  c.kv_heads = 4;  c.layers = 6;
//   c.vocab = 1024;  c.ffn = 704;  c.max_seq = 512;  c.seed = 1;
//   ASSIGN_OR_RETURN(std::unique_ptr<tp::Decoder> model,
//   tp::Decoder::Create(c)); ASSIGN_OR_RETURN(double loss,
//   model->ForwardLoss(ids, targets));  // [B, S]
//   RETURN_IF_ERROR(model->BackwardLoss());
//   tp::GenerateOptions g;
//   g.max_new_tokens = 32;
//   ASSIGN_OR_RETURN(tp::Tensor out, model->Generate(prompt, g));  // [B, P +
//   32]
#ifndef TENSOR_PARALLEL_LAYERS_DECODER_H_
#define TENSOR_PARALLEL_LAYERS_DECODER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "layers/attention.h"
#include "layers/attention_core.h"
#include "layers/mlp.h"
#include "layers/module.h"
#include "layers/norm.h"
#include "layers/vocab_parallel.h"
#include "runtime/dtype.h"
#include "runtime/tensor.h"

namespace tp {

struct DecoderConfig {
  // Model width; > 0.
  int64_t hidden = 0;
  // Query heads; > 0 and divisible by kv_heads.
  int64_t heads = 0;
  // Key/value heads (grouped-query attention); 0 (default) = heads.
  int64_t kv_heads = 0;
  // Features per head; 0 (default) = hidden / heads (which must divide).
  // Must be even with rope.
  int64_t head_dim = 0;
  // Decoder layers; > 0.
  int64_t layers = 0;
  // Vocabulary size; > 0. Token ids are in [0, vocab).
  int64_t vocab = 0;
  // MLP intermediate width (per branch for SwiGLU); > 0.
  int64_t ffn = 0;
  // Normalisation: RMSNorm (Llama, default) or LayerNorm (GPT).
  NormKind norm = NormKind::kRMSNorm;
  // Norm epsilon; >= 0. Default 1e-5.
  double norm_eps = 1e-5;
  // MLP activation: SwiGLU (Llama, default; gate_proj + up_proj) or GeLU
  // (GPT; up_proj only).
  MlpActivation activation = MlpActivation::kSwiGLU;
  // Biases on every projection (GPT-style). lm_head never has one.
  bool bias = false;
  // Rotary position embeddings on queries and keys, and their base.
  bool rope = true;
  double rope_theta = 10000.0;
  // Longest sequence (prompt + generated); > 0. Bounds the KV cache and the
  // rotary tables.
  int64_t max_seq = 2048;
  // Weights (not norms) are N(0, init_std^2), each full weight from
  // SeedFor(seed, "<its parameter name>"), so the model is the same at any
  // TP size. Norm weights 1, biases 0.
  double init_std = 0.02;
  uint64_t seed = 0;
  // Parameter and activation dtype (any floating dtype).
  DType dtype = DType::kFloat32;

  // kv_heads / head_dim with the defaults resolved.
  int64_t num_kv_heads() const { return kv_heads == 0 ? heads : kv_heads; }
  int64_t head_size() const {
    return head_dim != 0 ? head_dim : (heads > 0 ? hidden / heads : 0);
  }
  // OK, or kInvalidArgument naming the first bad field and its value.
  absl::Status Validate() const;
  // One line, e.g. "hidden=256 heads=8 kv_heads=4 ...".
  std::string ToString() const;
  // String map of every field (for a checkpoint's "__metadata__"), and the
  // inverse; FromMetadata ignores unknown keys, needs every field's key and
  // validates the result (kInvalidArgument naming the key otherwise).
  std::map<std::string, std::string> ToMetadata() const;
  static absl::StatusOr<DecoderConfig> FromMetadata(
      const std::map<std::string, std::string>& metadata);
};

// ---------------------------------------------------------------------------
// Attention.
// ---------------------------------------------------------------------------

// Keys and values of the positions seen so far, for one Attention module of
// one rank (rope applied to the keys): the KVCache of layers/attention_core.h.
using AttentionCache = KVCache;

struct AttentionOptions {
  int64_t hidden = 0;        // > 0
  int64_t num_heads = 0;     // > 0, divisible by num_kv_heads
  int64_t num_kv_heads = 0;  // 0 = num_heads
  int64_t head_dim = 0;      // 0 = hidden / num_heads; even with rope
  bool bias = false;         // biases on q/k/v/o_proj
  bool rope = true;
  double rope_theta = 10000.0;
  int64_t max_seq = 2048;  // > 0: positions must be < max_seq
  DType dtype = DType::kFloat32;
  // Projection weights N(0, init_std^2) from SeedFor(seed, name +
  // ".q_proj.weight") etc.
  double init_std = 0.02;
  uint64_t seed = 0;
  // Prefix of the init seeds (the module's path in the model).
  std::string name = "self_attn";
  bool materialize = true;
};

// Causal grouped-query self-attention with children q_proj, k_proj, v_proj,
// o_proj (type "Attention"). Activations are [tokens, hidden] in the
// batch-major TokenLayout of layers/attention.h.
class Attention final : public Module {
 public:
  using Options = AttentionOptions;

  // kInvalidArgument for invalid options (see DecoderConfig).
  static absl::StatusOr<std::unique_ptr<Attention>> Create(Options options);

  // x [layout.tokens(), hidden] -> same shape. Without a cache the
  // positions are 0 .. seq - 1 and activations are kept for Backward; with
  // one, the rows are the next layout.seq positions after cache->length(),
  // attend to the cached ones too, and are appended to the cache (no
  // Backward). kInvalidArgument: shapes, dtype, layout, a cache of another
  // batch or head count, positions past max_seq.
  absl::StatusOr<Tensor> Forward(const Tensor& x, const TokenLayout& layout,
                                 AttentionCache* cache = nullptr);
  // One sequence: Forward(x, {1, x.dim(0)}).
  absl::StatusOr<Tensor> Forward(const Tensor& x) override;
  absl::StatusOr<Tensor> Backward(const Tensor& grad_out) override;

  // q/k/v colwise with o rowwise (heads and kv_heads divisible by tp), or
  // all four replicated.
  absl::Status CheckChildStyles(
      const std::map<std::string, ParallelStyle>& styles,
      int tp_size) const override;
  std::string Describe() const override;

  const Options& options() const { return options_; }

 private:
  explicit Attention(Options options)
      : Module("Attention"), options_(std::move(options)) {}

  Options options_;
  std::vector<double> cos_, sin_;  // [max_seq, head_dim / 2]
  // Saved by an uncached Forward.
  TokenLayout layout_;
  int64_t local_heads_ = 0, local_kv_ = 0;
  attention_core::Saved saved_;
  bool has_forward_ = false;
};

// ---------------------------------------------------------------------------
// MLP.
// ---------------------------------------------------------------------------

struct MlpOptions {
  int64_t hidden = 0;  // > 0
  int64_t ffn = 0;     // > 0
  MlpActivation activation = MlpActivation::kSwiGLU;
  bool bias = false;
  DType dtype = DType::kFloat32;
  double init_std = 0.02;
  uint64_t seed = 0;
  std::string name = "mlp";  // prefix of the init seeds
  bool materialize = true;
};

// Children gate_proj (SwiGLU only), up_proj, down_proj (type "MLP").
// x [..., hidden] -> [..., hidden].
class Mlp final : public Module {
 public:
  using Options = MlpOptions;
  static absl::StatusOr<std::unique_ptr<Mlp>> Create(Options options);

  absl::StatusOr<Tensor> Forward(const Tensor& x) override;
  absl::StatusOr<Tensor> Backward(const Tensor& grad_out) override;
  // gate/up colwise with down rowwise, or all replicated.
  absl::Status CheckChildStyles(
      const std::map<std::string, ParallelStyle>& styles,
      int tp_size) const override;
  std::string Describe() const override;
  const Options& options() const { return options_; }

 private:
  explicit Mlp(Options options) : Module("MLP"), options_(std::move(options)) {}
  Options options_;
  Tensor gate_, up_, act_;  // saved by Forward
  bool has_forward_ = false;
};

// ---------------------------------------------------------------------------
// Decoder layer and decoder.
// ---------------------------------------------------------------------------

// Children input_layernorm, self_attn, post_attention_layernorm, mlp (type
// "DecoderLayer"): h = x + attn(norm1(x)); y = h + mlp(norm2(h)).
class DecoderLayer final : public Module {
 public:
  // Layer `index` of the model `config` (parameter seeds from its path
  // "model.layers.<index>").
  static absl::StatusOr<std::unique_ptr<DecoderLayer>> Create(
      const DecoderConfig& config, int64_t index, bool materialize);

  absl::StatusOr<Tensor> Forward(const Tensor& x, const TokenLayout& layout,
                                 AttentionCache* cache = nullptr);
  absl::StatusOr<Tensor> Backward(const Tensor& grad_out) override;

 private:
  DecoderLayer() : Module("DecoderLayer") {}
  bool has_forward_ = false;
};

// Per-layer KV caches of one batch of sequences, for Decoder::ForwardStep.
class DecoderCache {
 public:
  DecoderCache() = default;
  // Positions cached per sequence (0 when empty).
  int64_t length() const { return layers_.empty() ? 0 : layers_[0].length(); }
  // Forgets everything (start a new batch).
  void Clear() { layers_.clear(); }

 private:
  friend class Decoder;
  std::vector<AttentionCache> layers_;
};

struct GenerateOptions {
  // Tokens to generate per sequence; >= 0. prompt + new must be <= max_seq.
  int64_t max_new_tokens = 16;
  // true: prefill once, then feed one token at a time through the KV cache;
  // false: recompute the whole sequence at every step (a reference).
  bool use_kv_cache = true;
  // Called after every generated position with its index (0-based) and the
  // tokens [batch] int64 chosen for it. Optional.
  std::function<void(int64_t step, const Tensor& tokens)> on_token;
};

class Decoder final : public Module {
 public:
  // Builds the tree of the file comment. materialize = false defers every
  // projection and embedding weight (see layers/module.h): wrap the model
  // before use. kInvalidArgument for an invalid config.
  static absl::StatusOr<std::unique_ptr<Decoder>> Create(
      const DecoderConfig& config, bool materialize = true);

  const DecoderConfig& config() const { return config_; }

  // ids int32/int64 [batch, seq] (seq <= max_seq) -> logits [batch, seq,
  // V_local] (see the file comment). Keeps activations for Backward.
  absl::StatusOr<Tensor> Forward(const Tensor& ids) override;
  // grad_logits with Forward's output shape: accumulates every parameter's
  // gradient; returns an undefined tensor (ids have no gradient).
  absl::StatusOr<Tensor> Backward(const Tensor& grad_logits) override;

  // Forward, then the mean cross-entropy of the logits against `targets`
  // (same shape as ids, ids in [0, vocab)); the same value on every rank.
  absl::StatusOr<double> ForwardLoss(const Tensor& ids, const Tensor& targets);
  // Backward of grad_loss times the last ForwardLoss's loss.
  absl::Status BackwardLoss(double grad_loss = 1.0);

  // Feeds ids [batch, seq] as the next positions of the sequences in
  // `cache` (the whole prompt first, then one token per call) and returns
  // the logits of each sequence's LAST position, [batch, V_local]. The cache
  // must be empty or hold this batch. No Backward.
  absl::StatusOr<Tensor> ForwardStep(const Tensor& ids, DecoderCache& cache);
  // Argmax over the full vocabulary of logits [batch, V_local] (ties: the
  // smallest id) -> int64 [batch], identical on every rank (a collective
  // when the logits are vocab-parallel).
  absl::StatusOr<Tensor> GreedyTokens(const Tensor& logits);
  // Greedy decoding: prompt int32/int64 [batch, P], P >= 1 -> int64
  // [batch, P + max_new_tokens] (the prompt, then the generated tokens).
  absl::StatusOr<Tensor> Generate(const Tensor& prompt,
                                  const GenerateOptions& options = {});

  // The group the logits' vocabulary is split over (lm_head's), or null
  // when the logits are full.
  Communicator* vocab_group() const;

  absl::Status CheckChildStyles(
      const std::map<std::string, ParallelStyle>& styles,
      int tp_size) const override;
  std::string Describe() const override;

 private:
  explicit Decoder(DecoderConfig config)
      : Module("Decoder"), config_(std::move(config)) {}

  absl::StatusOr<TokenLayout> CheckIds(const Tensor& ids,
                                       absl::string_view what,
                                       int64_t past) const;
  // Hidden states [B*S, H] after the final norm (cached or not).
  absl::StatusOr<Tensor> Trunk(const Tensor& ids, const TokenLayout& layout,
                               DecoderCache* cache);

  DecoderConfig config_;
  bool has_forward_ = false;
  Shape logits_shape_;
  // Loss state of the last ForwardLoss.
  std::unique_ptr<VocabParallelCrossEntropy> parallel_loss_;
  Tensor serial_dlogits_;  // serial loss: (softmax - onehot) / T
  bool has_loss_ = false;
};

}  // namespace tp

#endif  // TENSOR_PARALLEL_LAYERS_DECODER_H_
