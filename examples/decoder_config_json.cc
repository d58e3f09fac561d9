#include "examples/decoder_config_json.h"

#include <cerrno>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "runtime/status_macros.h"

namespace tp {

const char kDecoderConfigFileName[] = "config.json";

namespace {

using json = nlohmann::json;

constexpr char kOwnKey[] = "tensor_parallel_decoder";

std::string PathIn(const std::string& dir) {
  return dir.empty() || dir.back() == '/'
             ? absl::StrCat(dir, kDecoderConfigFileName)
             : absl::StrCat(dir, "/", kDecoderConfigFileName);
}

bool IsLlama(const DecoderConfig& c) {
  return c.norm == NormKind::kRMSNorm &&
         c.activation == MlpActivation::kSwiGLU && !c.bias && c.rope;
}

absl::Status ErrnoStatus(int err, const std::string& what) {
  return absl::ErrnoToStatus(err, what);
}

absl::Status Invalid(const std::string& name, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(name, ": ", what));
}

// The HF Llama keys -> a DecoderConfig.
absl::StatusOr<DecoderConfig> FromHuggingFace(const json& j,
                                              const std::string& name) {
  auto type = j.find("model_type");
  if (type == j.end() || !type->is_string() ||
      type->get<std::string>() != "llama") {
    return Invalid(name, absl::StrCat("no \"", kOwnKey,
                                      "\" and \"model_type\" is not \"llama\""));
  }
  DecoderConfig c;
  auto get_int = [&](const char* key, int64_t* out,
                     bool required) -> absl::Status {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) {
      return required ? Invalid(name, absl::StrCat("missing key \"", key, "\""))
                      : absl::OkStatus();
    }
    if (!it->is_number_integer()) {
      return Invalid(name, absl::StrCat("\"", key, "\" is not an integer"));
    }
    *out = it->get<int64_t>();
    return absl::OkStatus();
  };
  auto get_double = [&](const char* key, double* out) -> absl::Status {
    auto it = j.find(key);
    if (it == j.end()) return absl::OkStatus();  // keep the default
    if (!it->is_number()) {
      return Invalid(name, absl::StrCat("\"", key, "\" is not a number"));
    }
    *out = it->get<double>();
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(get_int("hidden_size", &c.hidden, true));
  RETURN_IF_ERROR(get_int("num_attention_heads", &c.heads, true));
  RETURN_IF_ERROR(get_int("num_key_value_heads", &c.kv_heads, false));
  RETURN_IF_ERROR(get_int("head_dim", &c.head_dim, false));
  RETURN_IF_ERROR(get_int("num_hidden_layers", &c.layers, true));
  RETURN_IF_ERROR(get_int("intermediate_size", &c.ffn, true));
  RETURN_IF_ERROR(get_int("vocab_size", &c.vocab, true));
  RETURN_IF_ERROR(get_int("max_position_embeddings", &c.max_seq, false));
  RETURN_IF_ERROR(get_double("rms_norm_eps", &c.norm_eps));
  RETURN_IF_ERROR(get_double("rope_theta", &c.rope_theta));
  RETURN_IF_ERROR(get_double("initializer_range", &c.init_std));
  auto act = j.find("hidden_act");
  if (act != j.end() && (!act->is_string() || act->get<std::string>() != "silu")) {
    return Invalid(name, "\"hidden_act\" must be \"silu\" for a Llama model");
  }
  auto dtype = j.find("torch_dtype");
  if (dtype != j.end() && dtype->is_string()) {
    absl::StatusOr<DType> d = ParseDType(dtype->get<std::string>());
    if (!d.ok()) {
      return Invalid(name, absl::StrCat("unknown \"torch_dtype\" ",
                                        dtype->get<std::string>()));
    }
    c.dtype = *d;
  }
  c.norm = NormKind::kRMSNorm;
  c.activation = MlpActivation::kSwiGLU;
  c.bias = false;
  c.rope = true;
  absl::Status valid = c.Validate();
  if (!valid.ok()) return Invalid(name, std::string(valid.message()));
  return c;
}

}  // namespace

std::string DecoderConfigJson(const DecoderConfig& c) {
  json j;
  json own = json::object();
  for (const auto& [key, value] : c.ToMetadata()) own[key] = value;
  j[kOwnKey] = own;
  if (IsLlama(c)) {
    j["model_type"] = "llama";
    j["architectures"] = json::array({"LlamaForCausalLM"});
    j["hidden_size"] = c.hidden;
    j["num_attention_heads"] = c.heads;
    j["num_key_value_heads"] = c.num_kv_heads();
    j["head_dim"] = c.head_size();
    j["num_hidden_layers"] = c.layers;
    j["intermediate_size"] = c.ffn;
    j["vocab_size"] = c.vocab;
    j["max_position_embeddings"] = c.max_seq;
    j["rms_norm_eps"] = c.norm_eps;
    j["rope_theta"] = c.rope_theta;
    j["initializer_range"] = c.init_std;
    j["hidden_act"] = "silu";
    j["tie_word_embeddings"] = false;
    j["torch_dtype"] = std::string(DTypeName(c.dtype));
  }
  return j.dump(2) + "\n";
}

absl::StatusOr<DecoderConfig> ParseDecoderConfigJson(
    const std::string& text, const std::string& display_name) {
  const json j = json::parse(text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Invalid(display_name, "malformed JSON");
  if (!j.is_object()) return Invalid(display_name, "not a JSON object");
  auto own = j.find(kOwnKey);
  if (own == j.end()) return FromHuggingFace(j, display_name);
  if (!own->is_object()) {
    return Invalid(display_name,
                   absl::StrCat("\"", kOwnKey, "\" is not an object"));
  }
  std::map<std::string, std::string> metadata;
  for (auto it = own->begin(); it != own->end(); ++it) {
    if (!it.value().is_string()) {
      return Invalid(display_name, absl::StrCat("\"", kOwnKey, ".", it.key(),
                                                "\" is not a string"));
    }
    metadata[it.key()] = it.value().get<std::string>();
  }
  absl::StatusOr<DecoderConfig> c = DecoderConfig::FromMetadata(metadata);
  if (!c.ok()) return Invalid(display_name, std::string(c.status().message()));
  return c;
}

absl::Status WriteDecoderConfigJson(const std::string& dir,
                                    const DecoderConfig& config) {
  const std::string path = PathIn(dir);
  const std::string tmp = absl::StrCat(path, ".tmp");
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return ErrnoStatus(errno, absl::StrCat("cannot create ", tmp));
    out << DecoderConfigJson(config);
    out.flush();
    if (!out) return ErrnoStatus(errno, absl::StrCat("cannot write ", tmp));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    return ErrnoStatus(err, absl::StrCat("cannot rename ", tmp, " to ", path));
  }
  return absl::OkStatus();
}

absl::StatusOr<DecoderConfig> ReadDecoderConfigJson(const std::string& dir) {
  const std::string path = PathIn(dir);
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    if (err == ENOENT) {
      return absl::NotFoundError(absl::StrCat("no model config ", path));
    }
    return ErrnoStatus(err, absl::StrCat("cannot open ", path));
  }
  std::ostringstream text;
  text << in.rdbuf();
  return ParseDecoderConfigJson(text.str(), path);
}

}  // namespace tp
