// Greedy generation with a tensor-parallel Llama-style decoder and its KV
// cache, on every rank of the job.
//
//   bazel run //examples:transformer -- --nproc=2
//   bazel run //examples:transformer -- --nproc=2 --prompt=5,9,2 --max_new_tokens=64
//   bazel run //examples:transformer -- --nproc=2 --checkpoint=/tmp/ckpt
//
// The model is the 6-layer decoder of the seed (by default hidden 256, 8
// query heads, 4 key/value heads, SwiGLU MLP 768, vocabulary 1024: every size
// divisible by TP = 1, 2, 4). Its weights come from --seed (each rank
// generates only its own shard, bit-identical to the slice of the full
// weight) or from a sharded checkpoint written by //examples:train at any TP
// size (--checkpoint: the config comes from the checkpoint's config.json and
// each rank reads only the bytes of its shards).
//
// DistributedModelWrapper shards the serial tree by the automatic plan (or
// --plan=llama, the equivalent explicit plan) and rank 0 prints the plan
// table. The TP communicator is wrapped in a TimedCommunicator, so each rank
// reports the time of the generation spent in collectives (including waiting
// for the other ranks) and the rest ("compute"). Rank 0 prints the tokens as
//   generated: 17,940,3,...
// which are identical at every TP size (tests/examples/transformer_test.sh),
// then the tokens/s of the timed generation (after --warmup untimed ones).
// Each new token costs 15 collectives over the TP group here (2 all-reduces
// per layer, 1 for the embedding, 2 for the greedy argmax), so on a CPU host
// their latency dominates at batch 1; --batch=N generates N copies of the
// prompt together and shows the throughput once that latency is amortised.
// Runs unchanged under tprun, torchrun, mpirun and srun; ranks beyond the TP
// size form data-parallel replicas that generate the same tokens. With
// --nproc=N > 1 each rank gets OPENBLAS_NUM_THREADS = cores / N unless the
// variable is set (TP = 1 then uses every core in one process).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "comm/process_group.h"
#include "comm/timed_communicator.h"
#include "examples/decoder_config_json.h"
#include "glog/logging.h"
#include "layers/checkpoint.h"
#include "layers/decoder.h"
#include "layers/model_wrapper.h"
#include "runtime/status_macros.h"
#include "runtime/tensor.h"
#include "tools/launch.h"

ABSL_FLAG(int, nproc, 1, "ranks to start on this host (re-launches itself)");
ABSL_FLAG(std::string, backend, "auto", "communication backend");
ABSL_FLAG(int, tp, 0,
          "tensor-parallel size (0: the whole world); must divide the world "
          "size, the rest are data-parallel replicas");
ABSL_FLAG(int64_t, hidden, 256, "model width");
ABSL_FLAG(int64_t, heads, 8, "query heads");
ABSL_FLAG(int64_t, kv_heads, 4, "key/value heads");
ABSL_FLAG(int64_t, layers, 6, "decoder layers");
ABSL_FLAG(int64_t, ffn, 768, "MLP width (per SwiGLU branch)");
ABSL_FLAG(int64_t, vocab, 1024, "vocabulary size");
ABSL_FLAG(int64_t, max_seq, 512, "longest sequence (prompt + new tokens)");
ABSL_FLAG(uint64_t, seed, 1, "seed of the random weights");
ABSL_FLAG(double, init_std, 0.1,
          "standard deviation of the random weights (larger: less repetitive "
          "output from an untrained model)");
ABSL_FLAG(std::string, checkpoint, "",
          "load the config and weights from this checkpoint directory (from "
          "//examples:train, any TP size) instead of --seed; the size flags "
          "are then ignored");
ABSL_FLAG(std::string, plan, "auto",
          "auto (rules by name and type) or llama (the explicit plan)");
ABSL_FLAG(std::string, prompt, "1,2,3", "comma-separated prompt token ids");
ABSL_FLAG(int64_t, max_new_tokens, 32, "tokens to generate");
ABSL_FLAG(int64_t, batch, 1,
          "sequences generated together, each from the prompt (a larger batch "
          "amortises the per-token collectives; rows must come out equal)");
ABSL_FLAG(bool, kv_cache, true,
          "decode through the KV cache (false: recompute the whole sequence "
          "at every step, for comparison)");
ABSL_FLAG(int, warmup, 1, "untimed generations before the timed one");

namespace {

double Ms(absl::Duration d) { return absl::ToDoubleMilliseconds(d); }

absl::Duration Since(std::chrono::steady_clock::time_point start) {
  return absl::FromChrono(std::chrono::steady_clock::now() - start);
}

// OPENBLAS_NUM_THREADS as this rank sees it ("unset": all cores).
std::string BlasThreads() {
  const char* v = std::getenv("OPENBLAS_NUM_THREADS");
  return v == nullptr ? "unset" : v;
}

absl::StatusOr<std::vector<int64_t>> ParsePrompt(const std::string& text,
                                                 int64_t vocab) {
  std::vector<int64_t> ids;
  for (absl::string_view piece : absl::StrSplit(text, ',')) {
    int64_t id = 0;
    if (!absl::SimpleAtoi(piece, &id)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--prompt: \"", piece, "\" is not a token id (want e.g. 1,2,3)"));
    }
    if (id < 0 || id >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--prompt: token id ", id, " is outside [0, ", vocab, ")"));
    }
    ids.push_back(id);
  }
  return ids;
}

absl::StatusOr<tp::ParallelPlan> PlanFromFlag(const std::string& name) {
  if (name == "auto") return tp::ParallelPlan::Auto();
  if (name == "llama") return tp::ParallelPlan::Llama();
  return absl::InvalidArgumentError(
      absl::StrCat("--plan: unknown plan \"", name, "\" (auto, llama)"));
}

absl::Status Run() {
  ASSIGN_OR_RETURN(tp::TensorParallelConfig pg_config,
                   tp::TensorParallelConfig::FromEnv());
  pg_config.backend = absl::GetFlag(FLAGS_backend);
  if (absl::GetFlag(FLAGS_tp) != 0) {
    pg_config.tensor_parallel_size = absl::GetFlag(FLAGS_tp);
  }
  ASSIGN_OR_RETURN(std::unique_ptr<tp::ProcessGroupManager> pg,
                   tp::ProcessGroupManager::Init(pg_config));
  const int rank = pg->rank();
  const bool printer = rank == 0;
  const int tp_size = pg->tensor_parallel_size();
  const int tp_rank = pg->tensor_parallel_rank();

  // The config: from the checkpoint, or from the flags.
  const std::string checkpoint = absl::GetFlag(FLAGS_checkpoint);
  tp::DecoderConfig config;
  if (!checkpoint.empty()) {
    ASSIGN_OR_RETURN(config, tp::ReadDecoderConfigJson(checkpoint));
  } else {
    config.hidden = absl::GetFlag(FLAGS_hidden);
    config.heads = absl::GetFlag(FLAGS_heads);
    config.kv_heads = absl::GetFlag(FLAGS_kv_heads);
    config.layers = absl::GetFlag(FLAGS_layers);
    config.ffn = absl::GetFlag(FLAGS_ffn);
    config.vocab = absl::GetFlag(FLAGS_vocab);
    config.max_seq = absl::GetFlag(FLAGS_max_seq);
    config.seed = absl::GetFlag(FLAGS_seed);
    config.init_std = absl::GetFlag(FLAGS_init_std);
  }
  ASSIGN_OR_RETURN(const std::vector<int64_t> prompt,
                   ParsePrompt(absl::GetFlag(FLAGS_prompt), config.vocab));
  const int64_t new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  if (new_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_new_tokens must be >= 1, got ", new_tokens));
  }
  ASSIGN_OR_RETURN(tp::ParallelPlan plan,
                   PlanFromFlag(absl::GetFlag(FLAGS_plan)));

  if (printer) {
    std::cout << absl::StrFormat(
                     "transformer: world %d, tensor parallel %d, data "
                     "parallel %d, backend %s, OPENBLAS_NUM_THREADS=%s\n"
                     "config: %s\n",
                     pg->world_size(), tp_size, pg->data_parallel_size(),
                     pg->backend(), BlasThreads(), config.ToString())
              << std::flush;
  }

  // Build the serial tree without weights; the wrapper generates each rank's
  // shards (or the checkpoint fills them).
  tp::TimedCommunicator timed(pg->tensor_parallel());
  const auto build_start = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(std::unique_ptr<tp::Decoder> serial,
                   tp::Decoder::Create(config, /*materialize=*/false));
  ASSIGN_OR_RETURN(
      std::unique_ptr<tp::DistributedModelWrapper> model,
      tp::DistributedModelWrapper::Create(std::move(serial), timed, plan));
  const absl::Duration build_time = Since(build_start);
  absl::Duration load_time = absl::ZeroDuration();
  if (!checkpoint.empty()) {
    const auto load_start = std::chrono::steady_clock::now();
    RETURN_IF_ERROR(tp::LoadShardedCheckpoint(checkpoint, tp_rank, tp_size,
                                              model->parameters()));
    load_time = Since(load_start);
  }
  if (printer) {
    std::cout << model->PlanTable()
              << absl::StrFormat(
                     "weights: %s; built and sharded in %.1f ms%s\n",
                     checkpoint.empty()
                         ? absl::StrCat("random, seed ", config.seed)
                         : absl::StrCat("checkpoint ", checkpoint),
                     Ms(build_time),
                     checkpoint.empty()
                         ? ""
                         : absl::StrFormat(", loaded in %.1f ms",
                                           Ms(load_time)))
              << std::flush;
  }
  tp::Decoder* decoder = model->module_as<tp::Decoder>();
  if (decoder == nullptr) return absl::InternalError("the model is no Decoder");

  const int64_t batch = absl::GetFlag(FLAGS_batch);
  if (batch < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--batch must be >= 1, got ", batch));
  }
  std::vector<int64_t> prompts;
  for (int64_t b = 0; b < batch; ++b) {
    prompts.insert(prompts.end(), prompt.begin(), prompt.end());
  }
  ASSIGN_OR_RETURN(
      tp::Tensor prompt_ids,
      tp::Tensor::FromVector<int64_t>(
          prompts, {batch, static_cast<int64_t>(prompt.size())}));
  tp::GenerateOptions options;
  options.max_new_tokens = new_tokens;
  options.use_kv_cache = absl::GetFlag(FLAGS_kv_cache);
  for (int i = 0; i < absl::GetFlag(FLAGS_warmup); ++i) {
    RETURN_IF_ERROR(decoder->Generate(prompt_ids, options).status());
  }

  // The timed generation. The first token's time covers the prefill.
  RETURN_IF_ERROR(pg->world().Barrier());
  timed.Reset();
  absl::Duration first_token = absl::ZeroDuration();
  const auto start = std::chrono::steady_clock::now();
  options.on_token = [&](int64_t step, const tp::Tensor&) {
    if (step == 0) first_token = Since(start);
  };
  ASSIGN_OR_RETURN(tp::Tensor out, decoder->Generate(prompt_ids, options));
  const absl::Duration total = Since(start);
  const tp::CommOpStats comm = timed.stats().total();

  ASSIGN_OR_RETURN(std::vector<int64_t> all, out.ToVector<int64_t>());
  const int64_t width = out.dim(1);
  const std::vector<int64_t> generated(all.begin() + prompt.size(),
                                       all.begin() + width);
  for (int64_t b = 1; b < batch; ++b) {
    if (!std::equal(all.begin() + b * width, all.begin() + (b + 1) * width,
                    all.begin())) {
      return absl::InternalError(absl::StrCat(
          "sequence ", b, " of the batch differs from sequence 0 although "
          "every sequence has the same prompt"));
    }
  }
  const double tokens_per_s = batch * new_tokens / absl::ToDoubleSeconds(total);
  const absl::Duration decode = total - first_token;
  const double decode_tokens_per_s =
      new_tokens > 1 ? batch * (new_tokens - 1) / absl::ToDoubleSeconds(decode)
                     : 0.0;
  const absl::Duration compute = total - comm.time;
  if (printer) {
    std::cout << "prompt: " << absl::StrJoin(prompt, ",") << "\n"
              << "generated: " << absl::StrJoin(generated, ",") << "\n"
              << absl::StrFormat(
                     "tp %d: %d x %d new tokens in %.1f ms = %.1f tokens/s "
                     "(prefill of %d + first token %.1f ms; then %.1f "
                     "tokens/s)%s\n",
                     tp_size, batch, new_tokens, Ms(total), tokens_per_s,
                     prompt.size(), Ms(first_token), decode_tokens_per_s,
                     options.use_kv_cache ? "" : " without KV cache")
              << std::flush;
  }
  // Every rank's split (ranks differ: the faster one waits in collectives).
  std::cout << absl::StrFormat(
                   "rank %d: compute %.1f ms (%.0f%%), communication %.1f ms "
                   "(%.0f%%) in %d collectives of %.3f MB\n",
                   rank, Ms(compute), 100.0 * Ms(compute) / Ms(total),
                   Ms(comm.time), 100.0 * Ms(comm.time) / Ms(total),
                   comm.calls, comm.bytes / 1e6)
            << std::flush;
  return pg->world().Barrier();
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  google::InitGoogleLogging(argv[0]);
  FLAGS_logtostderr = true;
  absl::StatusOr<std::optional<int>> job =
      tp::MaybeRelaunchSelf(absl::GetFlag(FLAGS_nproc), argc, argv);
  if (!job.ok()) {
    std::cerr << "transformer: " << job.status() << "\n";
    return 2;
  }
  if (job->has_value()) return **job;
  const absl::Status status = Run();
  if (!status.ok()) {
    std::cerr << "transformer: " << status << "\n";
    return 1;
  }
  return 0;
}
