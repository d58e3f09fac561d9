// Helpers shared by the decoder and model-wrapper tests: small model
// configurations whose sizes divide by 12 (so TP = 1, 2, 3, 4 all shard),
// conversion of a module's parameters to the float64 reference's map, and
// deterministic token ids.
#ifndef TENSOR_PARALLEL_TESTS_LAYERS_DECODER_TEST_UTIL_H_
#define TENSOR_PARALLEL_TESTS_LAYERS_DECODER_TEST_UTIL_H_

#include <cstdint>
#include <vector>

#include "layers/decoder.h"
#include "layers/module.h"
#include "runtime/dtype.h"
#include "runtime/tensor.h"
#include "tests/layers/decoder_reference.h"

namespace tp {
namespace decoder_testing {

// Llama-style: RMSNorm, SwiGLU, rope, no bias, grouped-query attention
// (24 query heads over 12 key/value heads of 4 features), hidden 48,
// ffn 96, vocab 96, 2 layers.
DecoderConfig LlamaConfig(DType dtype = DType::kFloat32);
// GPT-style: LayerNorm, GeLU, biases (set to non-zero values by the tests
// that load parameters), multi-head attention (12 heads of 4), no rope.
DecoderConfig GptConfig(DType dtype = DType::kFloat32);

// The reference's view of a config.
decoder_ref::Config RefConfig(const DecoderConfig& c);

// Full parameters of a serial (unwrapped, materialised) module by name.
decoder_ref::Params ParamsOf(const Module& m);

// Writes deterministic non-trivial values into every parameter of a serial
// module (norm weights near 1, biases and norm biases small and non-zero,
// weights U(-1, 1) / sqrt(fan_in)), so that tests do not depend on the
// zero biases and unit norms of the default init.
void Randomize(Module& m, uint64_t seed);

// n ids in [0, vocab) from `seed`.
std::vector<int64_t> Ids(int64_t n, int64_t vocab, uint64_t seed);
// An int64 tensor of `shape` holding `ids`.
Tensor IdTensor(const std::vector<int64_t>& ids, const Shape& shape);

}  // namespace decoder_testing
}  // namespace tp

#endif  // TENSOR_PARALLEL_TESTS_LAYERS_DECODER_TEST_UTIL_H_
