// Tests of layers/module.h and layers/decoder.h (serial): the module tree,
// Hugging Face names, forward and loss against the float64 reference of
// tests/layers/decoder_reference.h, backward against finite differences of
// that reference, KV-cache generation against recomputation, and errors.
// The tensor-parallel versions are tested in model_wrapper_test.cc.
#include "layers/decoder.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "glog/logging.h"
#include "gtest/gtest.h"
#include "layers/module.h"
#include "runtime/ops.h"
#include "runtime/status_macros.h"
#include "tests/layers/decoder_reference.h"
#include "tests/layers/decoder_test_util.h"
#include "tests/layers/layer_test_util.h"

namespace tp {
namespace {

using decoder_testing::GptConfig;
using decoder_testing::Ids;
using decoder_testing::IdTensor;
using decoder_testing::LlamaConfig;
using decoder_testing::ParamsOf;
using decoder_testing::Randomize;
using decoder_testing::RefConfig;
using testing_layers::Close;
using testing_layers::ExpectError;

std::unique_ptr<Decoder> MustCreate(const DecoderConfig& c,
                                    bool materialize = true) {
  absl::StatusOr<std::unique_ptr<Decoder>> d = Decoder::Create(c, materialize);
  CHECK(d.ok()) << d.status();
  return *std::move(d);
}

// ---------------------------------------------------------------------------
// Module tree
// ---------------------------------------------------------------------------

TEST(ModuleTest, LlamaNamesShapesAndOrder) {
  DecoderConfig c = LlamaConfig();
  auto dec = MustCreate(c);
  std::vector<std::string> names;
  std::map<std::string, Shape> shapes;
  for (const ParameterShard& p : dec->NamedParameters()) {
    names.push_back(p.name);
    shapes[p.name] = p.tensor.shape();
    EXPECT_TRUE(p.replicated()) << p.name;
    EXPECT_EQ(p.full_shape, p.tensor.shape()) << p.name;
  }
  std::vector<std::string> want = {"model.embed_tokens.weight"};
  for (int l = 0; l < 2; ++l) {
    const std::string pre = absl::StrCat("model.layers.", l, ".");
    for (const char* s :
         {"input_layernorm.weight", "self_attn.q_proj.weight",
          "self_attn.k_proj.weight", "self_attn.v_proj.weight",
          "self_attn.o_proj.weight", "post_attention_layernorm.weight",
          "mlp.gate_proj.weight", "mlp.up_proj.weight",
          "mlp.down_proj.weight"}) {
      want.push_back(pre + s);
    }
  }
  want.push_back("model.norm.weight");
  want.push_back("lm_head.weight");
  EXPECT_EQ(names, want);
  EXPECT_EQ(shapes["model.embed_tokens.weight"], (Shape{96, 48}));
  EXPECT_EQ(shapes["model.layers.1.self_attn.q_proj.weight"], (Shape{96, 48}));
  EXPECT_EQ(shapes["model.layers.1.self_attn.k_proj.weight"], (Shape{48, 48}));
  EXPECT_EQ(shapes["model.layers.1.self_attn.o_proj.weight"], (Shape{48, 96}));
  EXPECT_EQ(shapes["model.layers.0.mlp.down_proj.weight"], (Shape{48, 96}));
  EXPECT_EQ(shapes["model.norm.weight"], (Shape{48}));
  EXPECT_EQ(shapes["lm_head.weight"], (Shape{96, 48}));
  // 2 * V * H + layers * (q, k, v, o, gate, up, down, 2 norms) + final norm.
  const int64_t per_layer =
      96 * 48 + 2 * 48 * 48 + 48 * 96 + 3 * 96 * 48 + 2 * 48;
  EXPECT_EQ(dec->CountParameters(), 2 * 96 * 48 + 2 * per_layer + 48);
}

TEST(ModuleTest, GptHasBiasesAndNoGate) {
  auto dec = MustCreate(GptConfig());
  std::vector<std::string> names;
  for (const ParameterShard& p : dec->NamedParameters())
    names.push_back(p.name);
  auto has = [&](const std::string& n) {
    return std::find(names.begin(), names.end(), n) != names.end();
  };
  EXPECT_TRUE(has("model.layers.0.self_attn.q_proj.bias"));
  EXPECT_TRUE(has("model.layers.0.mlp.down_proj.bias"));
  EXPECT_TRUE(has("model.layers.1.input_layernorm.bias"));
  EXPECT_TRUE(has("model.norm.bias"));
  EXPECT_FALSE(has("model.layers.0.mlp.gate_proj.weight"));
  EXPECT_FALSE(has("lm_head.bias"));
}

TEST(ModuleTest, FindReplaceChildAndPaths) {
  auto dec = MustCreate(LlamaConfig());
  absl::StatusOr<Module*> q = dec->Find("model.layers.1.self_attn.q_proj");
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ((*q)->type(), "Linear");
  EXPECT_EQ((*q)->path(), "model.layers.1.self_attn.q_proj");
  TP_EXPECT_OK(ExpectError(dec->Find("model.layers.7.mlp").status(),
                           absl::StatusCode::kNotFound,
                           {"model.layers.7.mlp", "\"7\""}, "Find"));
  // Replace a child: the new one takes the old one's place and path.
  Module* attn = *dec->Find("model.layers.1.self_attn");
  LinearOptions o;
  o.in_features = 48;
  o.out_features = 96;
  o.bias = false;
  auto repl = Linear::Create(o);
  ASSERT_TRUE(repl.ok());
  Linear* raw = repl->get();
  absl::StatusOr<std::unique_ptr<Module>> old =
      attn->ReplaceChild("q_proj", std::move(*repl));
  ASSERT_TRUE(old.ok()) << old.status();
  EXPECT_EQ((*old)->path(), "");
  EXPECT_EQ(raw->path(), "model.layers.1.self_attn.q_proj");
  EXPECT_EQ(attn->children()[0].first, "q_proj");
  EXPECT_EQ(attn->children()[0].second, raw);
  TP_EXPECT_OK(ExpectError(
      attn->ReplaceChild("x_proj", std::move(*old)).status(),
      absl::StatusCode::kNotFound, {"x_proj"}, "ReplaceChild unknown"));
  TP_EXPECT_OK(ExpectError(attn->ReplaceChild("k_proj", nullptr).status(),
                           absl::StatusCode::kInvalidArgument, {"null"},
                           "ReplaceChild null"));
  // Pre-order walk and the printed tree.
  const auto mods = dec->NamedModules();
  ASSERT_GE(mods.size(), 4u);
  EXPECT_EQ(mods[0].first, "");
  EXPECT_EQ(mods[1].first, "model");
  EXPECT_EQ(mods[2].first, "model.embed_tokens");
  EXPECT_EQ(mods[3].first, "model.layers");
  EXPECT_EQ(mods.back().first, "lm_head");
  const std::string tree = dec->ToString();
  EXPECT_TRUE(absl::StrContains(tree, "(q_proj): Linear(in=48, out=96"))
      << tree;
  EXPECT_TRUE(absl::StrContains(tree, "(input_layernorm): RMSNorm(48")) << tree;
}

TEST(ModuleTest, ZeroGradKeepsGradientStorage) {
  auto dec = MustCreate(LlamaConfig());
  const std::vector<ParameterShard> grads = dec->NamedGrads();
  const Tensor ids = IdTensor(Ids(8, 96, 1), {2, 4});
  const Tensor tgt = IdTensor(Ids(8, 96, 2), {2, 4});
  ASSERT_TRUE(dec->ForwardLoss(ids, tgt).ok());
  TP_EXPECT_OK(dec->BackwardLoss());
  double before = 0;
  for (const ParameterShard& g : grads)
    before += *ops::Sum(ops::Mul(g.tensor, g.tensor).value());
  EXPECT_GT(before, 0.0);
  dec->ZeroGrad();
  // The handles taken before (an optimizer's) see the zeros.
  for (const ParameterShard& g : grads) {
    for (double v : g.tensor.ToDoubles()) ASSERT_EQ(v, 0.0) << g.name;
  }
}

TEST(ModuleTest, LeafErrors) {
  LinearOptions o;
  o.in_features = 0;
  o.out_features = 4;
  TP_EXPECT_OK(ExpectError(Linear::Create(o).status(),
                           absl::StatusCode::kInvalidArgument,
                           {"in_features (0)"}, "Linear zero"));
  o.in_features = 3;
  o.dtype = DType::kInt32;
  TP_EXPECT_OK(ExpectError(Linear::Create(o).status(),
                           absl::StatusCode::kInvalidArgument, {"int32"},
                           "Linear dtype"));
  o.dtype = DType::kFloat32;
  o.weight_init = InitSpec::Normal(0, -1, 0);
  TP_EXPECT_OK(ExpectError(Linear::Create(o).status(),
                           absl::StatusCode::kInvalidArgument, {"init"},
                           "Linear init"));
  o.weight_init = InitSpec::Normal(0, 1, 0);
  auto lin = Linear::Create(o);
  ASSERT_TRUE(lin.ok());
  TP_EXPECT_OK(ExpectError(
      (*lin)->Backward(Tensor::Zeros({2, 4}, DType::kFloat32)).status(),
      absl::StatusCode::kFailedPrecondition, {"Backward"},
      "Linear backward first"));
  TP_EXPECT_OK(ExpectError(
      (*lin)->Forward(Tensor::Zeros({2, 5}, DType::kFloat32)).status(),
      absl::StatusCode::kInvalidArgument, {"in_features = 3", "[2, 5]"},
      "Linear shape"));
  TP_EXPECT_OK(ExpectError(
      (*lin)->Forward(Tensor::Zeros({2, 3}, DType::kFloat64)).status(),
      absl::StatusCode::kInvalidArgument, {"float64"}, "Linear input dtype"));
  ASSERT_TRUE((*lin)->Forward(Tensor::Zeros({2, 3}, DType::kFloat32)).ok());
  TP_EXPECT_OK(ExpectError(
      (*lin)->Backward(Tensor::Zeros({2, 3}, DType::kFloat32)).status(),
      absl::StatusCode::kInvalidArgument, {"[2, 4]"}, "Linear grad shape"));
  EmbeddingOptions eo;
  eo.vocab_size = 5;
  eo.hidden_size = 2;
  auto emb = Embedding::Create(eo);
  ASSERT_TRUE(emb.ok());
  TP_EXPECT_OK(ExpectError((*emb)->Forward(IdTensor({1, 5}, {2})).status(),
                           absl::StatusCode::kInvalidArgument, {"5"},
                           "Embedding id"));
  NormModuleOptions no;
  no.hidden = 0;
  TP_EXPECT_OK(ExpectError(RMSNorm::Create(no).status(),
                           absl::StatusCode::kInvalidArgument,
                           {"RMSNorm", "hidden (0)"}, "norm hidden"));
  no.hidden = 4;
  no.eps = -1;
  TP_EXPECT_OK(ExpectError(LayerNorm::Create(no).status(),
                           absl::StatusCode::kInvalidArgument,
                           {"LayerNorm", "eps (-1)"}, "norm eps"));
  // A module without a one-tensor Forward.
  ModuleContainer box("Box");
  TP_EXPECT_OK(ExpectError(box.Forward(Tensor()).status(),
                           absl::StatusCode::kUnimplemented, {"Box"},
                           "container forward"));
}

TEST(ModuleTest, DeferredLeavesHaveNoWeightsUntilMaterialized) {
  DecoderConfig c = LlamaConfig();
  auto lazy = MustCreate(c, /*materialize=*/false);
  for (const ParameterShard& p : lazy->NamedParameters()) {
    const bool is_norm = absl::StrContains(p.name, "norm");
    EXPECT_EQ(p.tensor.defined(), is_norm) << p.name;
    EXPECT_FALSE(p.full_shape.empty()) << p.name;
  }
  TP_EXPECT_OK(ExpectError(lazy->Forward(IdTensor({1, 2}, {1, 2})).status(),
                           absl::StatusCode::kFailedPrecondition,
                           {"model.embed_tokens", "materialize"},
                           "deferred forward"));
  // Materialising a deferred leaf gives the eager leaf's exact weight.
  auto eager = MustCreate(c);
  auto* lq = dynamic_cast<Linear*>(*lazy->Find("model.layers.1.mlp.up_proj"));
  auto* eq = dynamic_cast<Linear*>(*eager->Find("model.layers.1.mlp.up_proj"));
  ASSERT_NE(lq, nullptr);
  TP_EXPECT_OK(lq->Materialize());
  EXPECT_EQ(lq->weight().ToDoubles(), eq->weight().ToDoubles());
}

// ---------------------------------------------------------------------------
// Forward, loss and backward against the float64 reference
// ---------------------------------------------------------------------------

class DecoderNumericsTest : public ::testing::TestWithParam<bool> {
 protected:
  DecoderConfig Config(DType dtype) const {
    return GetParam() ? LlamaConfig(dtype) : GptConfig(dtype);
  }
};

TEST_P(DecoderNumericsTest, ForwardAndLossMatchReference) {
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    const DecoderConfig c = Config(dtype);
    auto dec = MustCreate(c);
    Randomize(*dec, 3);
    const int64_t B = 2, S = 6;
    const std::vector<int64_t> ids = Ids(B * S, c.vocab, 5);
    const std::vector<int64_t> tgt = Ids(B * S, c.vocab, 6);
    const decoder_ref::Params p = ParamsOf(*dec);
    const decoder_ref::Vec want =
        decoder_ref::Logits(p, RefConfig(c), ids, B, S);
    absl::StatusOr<Tensor> logits = dec->Forward(IdTensor(ids, {B, S}));
    ASSERT_TRUE(logits.ok()) << logits.status();
    EXPECT_EQ(logits->shape(), (Shape{B, S, c.vocab}));
    const double tol = dtype == DType::kFloat64 ? 1e-12 : 1e-5;
    EXPECT_TRUE(Close(*logits, want, tol, "logits"));
    absl::StatusOr<double> loss =
        dec->ForwardLoss(IdTensor(ids, {B, S}), IdTensor(tgt, {B, S}));
    ASSERT_TRUE(loss.ok()) << loss.status();
    const double want_loss = decoder_ref::Loss(p, RefConfig(c), ids, tgt, B, S);
    EXPECT_LT(std::abs(*loss - want_loss) / std::abs(want_loss), tol)
        << *loss << " vs " << want_loss;
  }
}

TEST_P(DecoderNumericsTest, BackwardMatchesFiniteDifferences) {
  // float64 model; central differences of the REFERENCE loss, a few
  // elements of every parameter.
  DecoderConfig c = Config(DType::kFloat64);
  c.layers = 1;
  auto dec = MustCreate(c);
  Randomize(*dec, 9);
  const int64_t B = 2, S = 4;
  const std::vector<int64_t> ids = Ids(B * S, c.vocab, 15);
  const std::vector<int64_t> tgt = Ids(B * S, c.vocab, 16);
  ASSERT_TRUE(
      dec->ForwardLoss(IdTensor(ids, {B, S}), IdTensor(tgt, {B, S})).ok());
  TP_EXPECT_OK(dec->BackwardLoss());
  decoder_ref::Params p = ParamsOf(*dec);
  const decoder_ref::Config rc = RefConfig(c);
  const double h = 1e-5;
  for (const ParameterShard& g : dec->NamedGrads()) {
    const std::vector<double> got = g.tensor.ToDoubles();
    std::vector<double>& w = p[g.name];
    const int64_t n = static_cast<int64_t>(w.size());
    // The embedding rows of the ids are the only non-zero ones: probe one.
    const int64_t probes[] = {
        0, n / 2 + 1, n - 1,
        g.name == "model.embed_tokens.weight" ? ids[0] * c.hidden + 3 : n / 3};
    for (int64_t i : probes) {
      const double w0 = w[i];
      w[i] = w0 + h;
      const double up = decoder_ref::Loss(p, rc, ids, tgt, B, S);
      w[i] = w0 - h;
      const double down = decoder_ref::Loss(p, rc, ids, tgt, B, S);
      w[i] = w0;
      const double fd = (up - down) / (2 * h);
      EXPECT_NEAR(got[i], fd, 1e-7 + 1e-5 * std::abs(fd))
          << g.name << "[" << i << "]";
    }
  }
}

TEST_P(DecoderNumericsTest, KvCacheStepsEqualFullForwardAndGeneration) {
  const DecoderConfig c = Config(DType::kFloat32);
  auto dec = MustCreate(c);
  Randomize(*dec, 21);
  const int64_t B = 2, S = 7, P = 3;
  const std::vector<int64_t> ids = Ids(B * S, c.vocab, 22);
  absl::StatusOr<Tensor> full = dec->Forward(IdTensor(ids, {B, S}));
  ASSERT_TRUE(full.ok());
  const std::vector<double> fv = full->ToDoubles();
  // Prefill the first P positions, then one at a time.
  DecoderCache cache;
  for (int64_t pos = P - 1; pos < S; ++pos) {
    const int64_t len = pos == P - 1 ? P : 1;
    const int64_t start = pos - len + 1;
    std::vector<int64_t> step;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = start; i <= pos; ++i) step.push_back(ids[b * S + i]);
    }
    absl::StatusOr<Tensor> last =
        dec->ForwardStep(IdTensor(step, {B, len}), cache);
    ASSERT_TRUE(last.ok()) << last.status();
    EXPECT_EQ(cache.length(), pos + 1);
    std::vector<double> want;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < c.vocab; ++j) {
        want.push_back(fv[(b * S + pos) * c.vocab + j]);
      }
    }
    EXPECT_TRUE(Close(*last, want, 1e-5, absl::StrCat("position ", pos)));
  }
  // Greedy generation: cache, recomputation and the float64 reference agree.
  const std::vector<int64_t> prompt = Ids(B * P, c.vocab, 23);
  GenerateOptions g;
  g.max_new_tokens = 8;
  std::vector<int64_t> seen;
  g.on_token = [&](int64_t step, const Tensor& t) {
    EXPECT_EQ(step, static_cast<int64_t>(seen.size()) / B);
    for (double v : t.ToDoubles()) seen.push_back(static_cast<int64_t>(v));
  };
  absl::StatusOr<Tensor> cached = dec->Generate(IdTensor(prompt, {B, P}), g);
  ASSERT_TRUE(cached.ok()) << cached.status();
  g.use_kv_cache = false;
  g.on_token = nullptr;
  absl::StatusOr<Tensor> recomputed =
      dec->Generate(IdTensor(prompt, {B, P}), g);
  ASSERT_TRUE(recomputed.ok()) << recomputed.status();
  const std::vector<int64_t> a = *cached->ToVector<int64_t>();
  EXPECT_EQ(a, *recomputed->ToVector<int64_t>());
  EXPECT_EQ(
      a, decoder_ref::Generate(ParamsOf(*dec), RefConfig(c), prompt, B, P, 8));
  EXPECT_EQ(seen.size(), static_cast<size_t>(B * 8));
  EXPECT_EQ(seen[0], a[P]);
  // Not a trivial sequence (a constant continuation would hide bugs).
  std::set<int64_t> distinct(a.begin(), a.end());
  EXPECT_GT(distinct.size(), 4u);
}

INSTANTIATE_TEST_SUITE_P(LlamaAndGpt, DecoderNumericsTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& i) {
                           return i.param ? "Llama" : "Gpt";
                         });

TEST(DecoderTest, Float16AndBFloat16MatchReferenceLoosely) {
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    DecoderConfig c = LlamaConfig(dtype);
    c.layers = 1;
    auto dec = MustCreate(c);
    Randomize(*dec, 31);
    const int64_t B = 1, S = 5;
    const std::vector<int64_t> ids = Ids(B * S, c.vocab, 32);
    absl::StatusOr<Tensor> logits = dec->Forward(IdTensor(ids, {B, S}));
    ASSERT_TRUE(logits.ok()) << logits.status();
    EXPECT_EQ(logits->dtype(), dtype);
    // The reference runs on the parameters as rounded to the dtype.
    EXPECT_TRUE(Close(
        *logits, decoder_ref::Logits(ParamsOf(*dec), RefConfig(c), ids, B, S),
        5e-2, std::string(DTypeName(dtype))));
  }
}

// ---------------------------------------------------------------------------
// Config and errors
// ---------------------------------------------------------------------------

TEST(DecoderConfigTest, MetadataRoundTrip) {
  DecoderConfig c = LlamaConfig(DType::kBFloat16);
  c.rope_theta = 500000.5;
  c.norm_eps = 1e-6;
  c.seed = 18446744073709551557ULL;
  absl::StatusOr<DecoderConfig> back =
      DecoderConfig::FromMetadata(c.ToMetadata());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->ToMetadata(), c.ToMetadata());
  EXPECT_EQ(back->rope_theta, c.rope_theta);
  EXPECT_EQ(back->norm_eps, c.norm_eps);
  EXPECT_EQ(back->seed, c.seed);
  EXPECT_EQ(back->dtype, DType::kBFloat16);
  auto m = c.ToMetadata();
  m.erase("ffn");
  TP_EXPECT_OK(ExpectError(DecoderConfig::FromMetadata(m).status(),
                           absl::StatusCode::kInvalidArgument, {"\"ffn\""},
                           "missing key"));
  m = c.ToMetadata();
  m["norm"] = "batch_norm";
  TP_EXPECT_OK(ExpectError(DecoderConfig::FromMetadata(m).status(),
                           absl::StatusCode::kInvalidArgument,
                           {"batch_norm", "norm"}, "bad norm"));
  m = c.ToMetadata();
  m["heads"] = "7x";
  TP_EXPECT_OK(ExpectError(DecoderConfig::FromMetadata(m).status(),
                           absl::StatusCode::kInvalidArgument, {"7x"},
                           "bad int"));
}

TEST(DecoderConfigTest, InvalidConfigsNameTheField) {
  struct Case {
    std::function<void(DecoderConfig&)> edit;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      {[](DecoderConfig& c) { c.hidden = 0; }, {"hidden 0"}},
      {[](DecoderConfig& c) { c.kv_heads = 5; }, {"heads 24", "kv_heads 5"}},
      {[](DecoderConfig& c) { c.head_dim = 3; }, {"head_dim 3", "even"}},
      {[](DecoderConfig& c) {
         c.head_dim = 0;
         c.heads = 10;
         c.kv_heads = 5;
       },
       {"hidden 48", "heads 10"}},
      {[](DecoderConfig& c) { c.layers = -1; }, {"layers -1"}},
      {[](DecoderConfig& c) { c.vocab = 0; }, {"vocab 0"}},
      {[](DecoderConfig& c) { c.ffn = 0; }, {"ffn 0"}},
      {[](DecoderConfig& c) { c.max_seq = 0; }, {"max_seq 0"}},
      {[](DecoderConfig& c) { c.norm_eps = -1; }, {"norm_eps"}},
      {[](DecoderConfig& c) { c.rope_theta = 0; }, {"rope_theta"}},
      {[](DecoderConfig& c) { c.dtype = DType::kInt64; }, {"int64"}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    DecoderConfig c = LlamaConfig();
    cases[i].edit(c);
    TP_EXPECT_OK(ExpectError(Decoder::Create(c).status(),
                             absl::StatusCode::kInvalidArgument,
                             cases[i].needles, absl::StrCat("case ", i)));
  }
}

TEST(DecoderTest, BadInputsAndCallOrder) {
  DecoderConfig c = LlamaConfig();
  c.max_seq = 8;
  auto dec = MustCreate(c);
  const Tensor ids = IdTensor(Ids(6, 96, 1), {2, 3});
  TP_EXPECT_OK(ExpectError(dec->Forward(IdTensor(Ids(6, 96, 1), {6})).status(),
                           absl::StatusCode::kInvalidArgument,
                           {"[batch, seq]", "[6]"}, "rank-1 ids"));
  TP_EXPECT_OK(ExpectError(
      dec->Forward(Tensor::Zeros({2, 3}, DType::kFloat32)).status(),
      absl::StatusCode::kInvalidArgument, {"float32"}, "float ids"));
  TP_EXPECT_OK(ExpectError(dec->Forward(IdTensor({1, 2, 96}, {1, 3})).status(),
                           absl::StatusCode::kInvalidArgument, {"96"},
                           "id out of range"));
  TP_EXPECT_OK(ExpectError(
      dec->Forward(IdTensor(Ids(9, 96, 1), {1, 9})).status(),
      absl::StatusCode::kInvalidArgument, {"9", "max_seq 8"}, "too long"));
  TP_EXPECT_OK(ExpectError(
      dec->ForwardLoss(ids, IdTensor(Ids(6, 96, 2), {3, 2})).status(),
      absl::StatusCode::kInvalidArgument, {"targets", "[3, 2]"},
      "targets shape"));
  TP_EXPECT_OK(ExpectError(
      dec->ForwardLoss(ids, IdTensor({0, 1, 2, 3, -1, 5}, {2, 3})).status(),
      absl::StatusCode::kInvalidArgument, {"target id -1", "position 4"},
      "target range"));
  TP_EXPECT_OK(ExpectError(dec->BackwardLoss(),
                           absl::StatusCode::kFailedPrecondition,
                           {"ForwardLoss"}, "BackwardLoss first"));
  TP_EXPECT_OK(ExpectError(
      dec->Backward(Tensor::Zeros({2, 3, 96}, DType::kFloat32)).status(),
      absl::StatusCode::kFailedPrecondition, {"Forward"}, "Backward first"));
  ASSERT_TRUE(dec->Forward(ids).ok());
  TP_EXPECT_OK(ExpectError(
      dec->Backward(Tensor::Zeros({2, 3, 95}, DType::kFloat32)).status(),
      absl::StatusCode::kInvalidArgument, {"[2, 3, 96]"}, "grad shape"));
  // A ForwardStep in between invalidates the pending backward.
  ASSERT_TRUE(dec->ForwardLoss(ids, ids).ok());
  DecoderCache cache;
  ASSERT_TRUE(dec->ForwardStep(ids, cache).ok());
  TP_EXPECT_OK(ExpectError(dec->BackwardLoss(),
                           absl::StatusCode::kFailedPrecondition,
                           {"ForwardLoss"}, "BackwardLoss after step"));
  // A cache of another batch size, and running past max_seq.
  TP_EXPECT_OK(ExpectError(
      dec->ForwardStep(IdTensor({1, 2, 3}, {3, 1}), cache).status(),
      absl::StatusCode::kInvalidArgument, {"KV cache"}, "cache batch"));
  TP_EXPECT_OK(ExpectError(
      dec->ForwardStep(IdTensor(Ids(12, 96, 3), {2, 6}), cache).status(),
      absl::StatusCode::kInvalidArgument, {"9", "max_seq 8"},
      "cache overflow"));
  GenerateOptions g;
  g.max_new_tokens = 6;
  TP_EXPECT_OK(ExpectError(dec->Generate(ids, g).status(),
                           absl::StatusCode::kInvalidArgument,
                           {"prompt length 3", "max_new_tokens 6", "max_seq 8"},
                           "generate too long"));
  g.max_new_tokens = -1;
  TP_EXPECT_OK(ExpectError(dec->Generate(ids, g).status(),
                           absl::StatusCode::kInvalidArgument,
                           {"max_new_tokens -1"}, "negative tokens"));
  g.max_new_tokens = 0;
  absl::StatusOr<Tensor> same = dec->Generate(ids, g);
  ASSERT_TRUE(same.ok());
  EXPECT_EQ(*same->ToVector<int64_t>(), *ids.ToVector<int64_t>());
  TP_EXPECT_OK(ExpectError(
      dec->GreedyTokens(Tensor::Zeros({2, 95}, DType::kFloat32)).status(),
      absl::StatusCode::kInvalidArgument, {"95", "96"}, "greedy width"));
}

TEST(DecoderTest, GreedyTokensTakesTheFirstMaximum) {
  DecoderConfig c = LlamaConfig();
  c.vocab = 4;
  auto dec = MustCreate(c);
  absl::StatusOr<Tensor> logits = Tensor::FromVector<float>(
      {0.f, 2.f, 2.f, 1.f, 5.f, -1.f, 5.f, 5.f}, {2, 4});
  ASSERT_TRUE(logits.ok());
  absl::StatusOr<Tensor> t = dec->GreedyTokens(*logits);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(*t->ToVector<int64_t>(), (std::vector<int64_t>{1, 0}));
  // NaN never wins; an all-NaN row gives id 0 (as at every TP size).
  const float nan = std::nanf("");
  logits = Tensor::FromVector<float>({nan, -3.f, nan, -4.f, nan, nan, nan, nan},
                                     {2, 4});
  ASSERT_TRUE(logits.ok());
  t = dec->GreedyTokens(*logits);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(*t->ToVector<int64_t>(), (std::vector<int64_t>{1, 0}));
}

}  // namespace
}  // namespace tp
