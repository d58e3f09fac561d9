#include "tests/layers/decoder_test_util.h"

#include <cmath>

#include "absl/strings/match.h"
#include "glog/logging.h"
#include "tests/layers/layer_test_util.h"

namespace tp {
namespace decoder_testing {

DecoderConfig LlamaConfig(DType dtype) {
  DecoderConfig c;
  c.hidden = 48;
  c.heads = 24;
  c.kv_heads = 12;
  c.head_dim = 4;
  c.layers = 2;
  c.vocab = 96;
  c.ffn = 96;
  c.norm = NormKind::kRMSNorm;
  c.activation = MlpActivation::kSwiGLU;
  c.max_seq = 32;
  c.init_std = 0.3;  // large enough for distinct, non-uniform logits
  c.seed = 7;
  c.dtype = dtype;
  return c;
}

DecoderConfig GptConfig(DType dtype) {
  DecoderConfig c;
  c.hidden = 48;
  c.heads = 12;
  c.kv_heads = 0;
  c.layers = 2;
  c.vocab = 96;
  c.ffn = 96;
  c.norm = NormKind::kLayerNorm;
  c.activation = MlpActivation::kGeLU;
  c.bias = true;
  c.rope = false;
  c.max_seq = 32;
  c.init_std = 0.3;
  c.seed = 11;
  c.dtype = dtype;
  return c;
}

decoder_ref::Config RefConfig(const DecoderConfig& c) {
  decoder_ref::Config r;
  r.hidden = c.hidden;
  r.heads = c.heads;
  r.kv_heads = c.num_kv_heads();
  r.head_dim = c.head_size();
  r.layers = c.layers;
  r.vocab = c.vocab;
  r.ffn = c.ffn;
  r.rms_norm = c.norm == NormKind::kRMSNorm;
  r.swiglu = c.activation == MlpActivation::kSwiGLU;
  r.bias = c.bias;
  r.rope = c.rope;
  r.rope_theta = c.rope_theta;
  r.eps = c.norm_eps;
  return r;
}

decoder_ref::Params ParamsOf(const Module& m) {
  decoder_ref::Params p;
  for (const ParameterShard& s : m.NamedParameters()) {
    CHECK(s.replicated() && s.tensor.defined()) << s.name;
    p[s.name] = s.tensor.ToDoubles();
  }
  return p;
}

void Randomize(Module& m, uint64_t seed) {
  uint64_t k = seed;
  for (const ParameterShard& s : m.NamedParameters()) {
    CHECK(s.replicated() && s.tensor.defined()) << s.name;
    const int64_t n = s.tensor.numel();
    std::vector<double> v = testing_layers::RandomVec(n, ++k);
    const bool is_norm = absl::StrContains(s.name, "norm");
    const bool is_bias = absl::EndsWith(s.name, ".bias");
    const double fan_in =
        s.full_shape.size() == 2 ? static_cast<double>(s.full_shape[1]) : 1.0;
    for (double& x : v) {
      if (is_norm && !is_bias) {
        x = 1.0 + 0.2 * x;
      } else if (is_bias) {
        x = 0.2 * x;
      } else {
        x = x / std::sqrt(fan_in);
      }
    }
    Tensor t = s.tensor;
    CHECK(t.CopyFrom(testing_layers::MakeTensor(v, t.shape(), t.dtype())).ok());
  }
}

std::vector<int64_t> Ids(int64_t n, int64_t vocab, uint64_t seed) {
  return testing_layers::RandomIds(n, vocab, seed);
}

Tensor IdTensor(const std::vector<int64_t>& ids, const Shape& shape) {
  absl::StatusOr<Tensor> t = Tensor::FromVector<int64_t>(ids, shape);
  CHECK(t.ok()) << t.status();
  return *t;
}

}  // namespace decoder_testing
}  // namespace tp
