// The model configuration file of a checkpoint directory: `config.json`
// beside the safetensors files, as Hugging Face stores it.
//
// WriteDecoderConfigJson writes
//   {"tensor_parallel_decoder": {<DecoderConfig::ToMetadata(), every field>},
//    ... and, for a Llama-style config (RMSNorm, SwiGLU, no bias, rope), the
//    Hugging Face LlamaConfig keys: "model_type": "llama",
//    "architectures": ["LlamaForCausalLM"], "hidden_size",
//    "num_attention_heads", "num_key_value_heads", "head_dim",
//    "num_hidden_layers", "intermediate_size", "vocab_size",
//    "max_position_embeddings", "rms_norm_eps", "rope_theta",
//    "hidden_act": "silu", "tie_word_embeddings": false, "torch_dtype"}
// so the directory (config.json, the index and the shards, which use Hugging
// Face tensor names) reads as a Llama checkpoint too.
//
// ReadDecoderConfigJson reads "tensor_parallel_decoder" when present (exact
// round trip), else a Hugging Face Llama config.json ("model_type": "llama")
// from the keys above (head_dim optional; init_std from "initializer_range";
// seed 0).
//
// Errors: kNotFound when the file is missing; kInvalidArgument naming the
// file and the key for malformed JSON, a missing or mistyped key, a model
// type other than llama without "tensor_parallel_decoder", or a config that
// fails DecoderConfig::Validate; I/O errors with their errno code.
//
// Example:
//   RETURN_IF_ERROR(WriteDecoderConfigJson("/ckpt", model.config()));
//   ASSIGN_OR_RETURN(tp::DecoderConfig c, ReadDecoderConfigJson("/ckpt"));
#ifndef TENSOR_PARALLEL_EXAMPLES_DECODER_CONFIG_JSON_H_
#define TENSOR_PARALLEL_EXAMPLES_DECODER_CONFIG_JSON_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "layers/decoder.h"

namespace tp {

// "config.json".
extern const char kDecoderConfigFileName[];

// Writes `dir`/config.json (dir must exist), replacing it atomically
// (a temporary file renamed over it).
absl::Status WriteDecoderConfigJson(const std::string& dir,
                                    const DecoderConfig& config);

// Reads `dir`/config.json (see the file comment).
absl::StatusOr<DecoderConfig> ReadDecoderConfigJson(const std::string& dir);

// The same from JSON text; `display_name` names it in error messages.
absl::StatusOr<DecoderConfig> ParseDecoderConfigJson(
    const std::string& text, const std::string& display_name = "config.json");
// The text WriteDecoderConfigJson writes.
std::string DecoderConfigJson(const DecoderConfig& config);

}  // namespace tp

#endif  // TENSOR_PARALLEL_EXAMPLES_DECODER_CONFIG_JSON_H_
