// config.json of checkpoints: exact round trips (Llama and GPT-style
// configs), the Hugging Face Llama keys, reading a Hugging Face config, and
// every error path.
#include "examples/decoder_config_json.h"

#include <cstdlib>
#include <fstream>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace tp {
namespace {

using json = nlohmann::json;

std::string TempDir() {
  const char* dir = std::getenv("TEST_TMPDIR");
  return dir != nullptr ? dir : "/tmp";
}

DecoderConfig Llama() {
  DecoderConfig c;
  c.hidden = 256;
  c.heads = 8;
  c.kv_heads = 4;
  c.layers = 6;
  c.vocab = 1024;
  c.ffn = 768;
  c.max_seq = 512;
  c.norm_eps = 1e-6;
  c.rope_theta = 500000.0;
  c.init_std = 0.1;
  c.seed = 12345678901234ull;
  return c;
}

void ExpectSame(const DecoderConfig& a, const DecoderConfig& b) {
  EXPECT_EQ(a.ToMetadata(), b.ToMetadata());
  EXPECT_EQ(a.ToString(), b.ToString());
}

void ExpectError(const absl::StatusOr<DecoderConfig>& c, absl::StatusCode code,
                 const std::string& part) {
  ASSERT_FALSE(c.ok()) << "expected an error containing " << part;
  EXPECT_EQ(c.status().code(), code) << c.status();
  EXPECT_TRUE(absl::StrContains(c.status().message(), part)) << c.status();
}

TEST(DecoderConfigJsonTest, LlamaRoundTripsThroughTheFile) {
  const std::string dir = absl::StrCat(TempDir(), "/llama");
  ASSERT_EQ(std::system(absl::StrCat("mkdir -p ", dir).c_str()), 0);
  const DecoderConfig c = Llama();
  ASSERT_TRUE(WriteDecoderConfigJson(dir, c).ok());
  absl::StatusOr<DecoderConfig> back = ReadDecoderConfigJson(dir);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSame(*back, c);
  EXPECT_EQ(back->seed, 12345678901234ull);
  EXPECT_EQ(back->rope_theta, 500000.0);
  EXPECT_EQ(back->norm_eps, 1e-6);
  // A trailing slash names the same directory.
  absl::StatusOr<DecoderConfig> slash = ReadDecoderConfigJson(dir + "/");
  ASSERT_TRUE(slash.ok()) << slash.status();
  ExpectSame(*slash, c);
}

TEST(DecoderConfigJsonTest, LlamaConfigCarriesTheHuggingFaceKeys) {
  const json j = json::parse(DecoderConfigJson(Llama()));
  EXPECT_EQ(j["model_type"], "llama");
  EXPECT_EQ(j["architectures"][0], "LlamaForCausalLM");
  EXPECT_EQ(j["hidden_size"], 256);
  EXPECT_EQ(j["num_attention_heads"], 8);
  EXPECT_EQ(j["num_key_value_heads"], 4);
  EXPECT_EQ(j["head_dim"], 32);
  EXPECT_EQ(j["num_hidden_layers"], 6);
  EXPECT_EQ(j["intermediate_size"], 768);
  EXPECT_EQ(j["vocab_size"], 1024);
  EXPECT_EQ(j["max_position_embeddings"], 512);
  EXPECT_EQ(j["rms_norm_eps"], 1e-6);
  EXPECT_EQ(j["rope_theta"], 500000.0);
  EXPECT_EQ(j["hidden_act"], "silu");
  EXPECT_EQ(j["tie_word_embeddings"], false);
  EXPECT_EQ(j["torch_dtype"], "float32");
  // The same keys read back (without our own object) give the same model
  // except the seed, which Hugging Face does not record.
  json hf = j;
  hf.erase("tensor_parallel_decoder");
  absl::StatusOr<DecoderConfig> c = ParseDecoderConfigJson(hf.dump());
  ASSERT_TRUE(c.ok()) << c.status();
  DecoderConfig want = Llama();
  want.seed = 0;
  // head_dim is written explicitly, kv_heads resolved.
  want.head_dim = 32;
  ExpectSame(*c, want);
}

TEST(DecoderConfigJsonTest, GptStyleConfigRoundTripsWithoutLlamaKeys) {
  DecoderConfig c = Llama();
  c.norm = NormKind::kLayerNorm;
  c.activation = MlpActivation::kGeLU;
  c.bias = true;
  c.rope = false;
  c.dtype = DType::kBFloat16;
  const std::string text = DecoderConfigJson(c);
  EXPECT_FALSE(json::parse(text).contains("model_type")) << text;
  absl::StatusOr<DecoderConfig> back = ParseDecoderConfigJson(text);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSame(*back, c);
}

TEST(DecoderConfigJsonTest, ReadsAHuggingFaceLlamaConfig) {
  // TinyLlama-1.1B's config.json (abridged to the keys that matter).
  const char* text = R"({
    "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 5632, "max_position_embeddings": 2048,
    "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 22, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 10000.0,
    "tie_word_embeddings": false, "torch_dtype": "bfloat16",
    "vocab_size": 32000})";
  absl::StatusOr<DecoderConfig> c = ParseDecoderConfigJson(text);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden, 2048);
  EXPECT_EQ(c->heads, 32);
  EXPECT_EQ(c->num_kv_heads(), 4);
  EXPECT_EQ(c->head_size(), 64);
  EXPECT_EQ(c->layers, 22);
  EXPECT_EQ(c->ffn, 5632);
  EXPECT_EQ(c->vocab, 32000);
  EXPECT_EQ(c->max_seq, 2048);
  EXPECT_EQ(c->norm, NormKind::kRMSNorm);
  EXPECT_EQ(c->activation, MlpActivation::kSwiGLU);
  EXPECT_FALSE(c->bias);
  EXPECT_TRUE(c->rope);
  EXPECT_EQ(c->dtype, DType::kBFloat16);
}

TEST(DecoderConfigJsonTest, Errors) {
  ExpectError(ReadDecoderConfigJson(TempDir() + "/no_such_dir"),
              absl::StatusCode::kNotFound, "no_such_dir/config.json");
  ExpectError(ParseDecoderConfigJson("{\"hidden\": ", "x.json"),
              absl::StatusCode::kInvalidArgument, "x.json: malformed JSON");
  ExpectError(ParseDecoderConfigJson("[1, 2]"),
              absl::StatusCode::kInvalidArgument, "not a JSON object");
  ExpectError(ParseDecoderConfigJson(R"({"model_type": "gpt2"})"),
              absl::StatusCode::kInvalidArgument,
              "\"model_type\" is not \"llama\"");
  ExpectError(ParseDecoderConfigJson(R"({"model_type": "llama"})"),
              absl::StatusCode::kInvalidArgument,
              "missing key \"hidden_size\"");
  ExpectError(
      ParseDecoderConfigJson(
          R"({"model_type": "llama", "hidden_size": "big"})"),
      absl::StatusCode::kInvalidArgument, "\"hidden_size\" is not an integer");
  json hf = json::parse(DecoderConfigJson(Llama()));
  hf.erase("tensor_parallel_decoder");
  hf["hidden_act"] = "gelu";
  ExpectError(ParseDecoderConfigJson(hf.dump()),
              absl::StatusCode::kInvalidArgument, "\"hidden_act\" must be");
  hf["hidden_act"] = "silu";
  hf["num_attention_heads"] = 7;  // does not divide 256, not a multiple of 4
  ExpectError(ParseDecoderConfigJson(hf.dump()),
              absl::StatusCode::kInvalidArgument, "config.json: ");
  hf["num_attention_heads"] = 8;
  hf["rope_theta"] = "high";
  ExpectError(ParseDecoderConfigJson(hf.dump()),
              absl::StatusCode::kInvalidArgument,
              "\"rope_theta\" is not a number");
  hf["rope_theta"] = 10000.0;
  hf["torch_dtype"] = "float8";
  ExpectError(ParseDecoderConfigJson(hf.dump()),
              absl::StatusCode::kInvalidArgument, "unknown \"torch_dtype\"");

  json own = json::parse(DecoderConfigJson(Llama()));
  own["tensor_parallel_decoder"].erase("vocab");
  ExpectError(ParseDecoderConfigJson(own.dump()),
              absl::StatusCode::kInvalidArgument, "missing key \"vocab\"");
  own = json::parse(DecoderConfigJson(Llama()));
  own["tensor_parallel_decoder"]["layers"] = 6;  // a number, not a string
  ExpectError(ParseDecoderConfigJson(own.dump()),
              absl::StatusCode::kInvalidArgument,
              "\"tensor_parallel_decoder.layers\" is not a string");
  own["tensor_parallel_decoder"] = "hidden=256";
  ExpectError(ParseDecoderConfigJson(own.dump()),
              absl::StatusCode::kInvalidArgument, "is not an object");
}

TEST(DecoderConfigJsonTest, WriteIntoAMissingDirectoryFails) {
  const absl::Status s =
      WriteDecoderConfigJson(TempDir() + "/missing/dir", Llama());
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "missing/dir/config.json")) << s;
}

}  // namespace
}  // namespace tp
