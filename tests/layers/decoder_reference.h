// Float64 reference of the Llama/GPT-style decoder of layers/decoder.h:
// naive loops over row-major std::vector<double>, written from the formulas
// (not from runtime/ops or layers/), for the decoder and model-wrapper tests.
#ifndef TENSOR_PARALLEL_TESTS_LAYERS_DECODER_REFERENCE_H_
#define TENSOR_PARALLEL_TESTS_LAYERS_DECODER_REFERENCE_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace tp {
namespace decoder_ref {

using Vec = std::vector<double>;
// Full parameters by Hugging Face name
// ("model.layers.0.self_attn.q_proj.weight").
using Params = std::map<std::string, Vec>;

struct Config {
  int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, layers = 0,
          vocab = 0, ffn = 0;
  bool rms_norm = true;
  bool swiglu = true;
  bool bias = false;
  bool rope = true;
  double rope_theta = 10000.0;
  double eps = 1e-5;
};

// Logits [batch * seq, vocab] for ids [batch, seq] (row-major).
Vec Logits(const Params& p, const Config& c, const std::vector<int64_t>& ids,
           int64_t batch, int64_t seq);

// Mean cross-entropy of Logits against targets [batch, seq].
double Loss(const Params& p, const Config& c, const std::vector<int64_t>& ids,
            const std::vector<int64_t>& targets, int64_t batch, int64_t seq);

// Greedy continuation of each prompt row by recomputing the whole sequence
// at every step: returns [batch, prompt_len + n] row-major.
std::vector<int64_t> Generate(const Params& p, const Config& c,
                              const std::vector<int64_t>& prompt, int64_t batch,
                              int64_t prompt_len, int64_t n);

}  // namespace decoder_ref
}  // namespace tp

#endif  // TENSOR_PARALLEL_TESTS_LAYERS_DECODER_REFERENCE_H_
