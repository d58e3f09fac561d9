// Trains a small tensor-parallel (and data-parallel) Llama-style decoder on a
// synthetic sequence task with AdamW, then saves a sharded checkpoint that
// //examples:transformer loads at any TP size.
//
//   bazel run //examples:train -- --nproc=2 --save=/tmp/ckpt
//   bazel run //examples:transformer -- --nproc=2 --checkpoint=/tmp/ckpt
//       --prompt=5,9,3,12,7,4,10,6,1 --max_new_tokens=8     (one line)
//   bazel run //examples:train -- --nproc=4 --tp=2     # 2 replicas x TP 2
//
// The task (--task): a sequence of --seq_len random symbols (token ids
// 2 .. 2 + --symbols - 1), the separator 1, then the answer: the symbols
// reversed (reverse, default), in the same order (copy) or sorted (sort).
// The model reads [symbols, 1, answer[0 .. L-2]] and is trained to predict
// the answer at the L positions from the separator on; the loss is the mean
// cross-entropy over those answer tokens only (the symbols themselves are
// random and cannot be predicted), computed on the vocabulary-parallel logits
// without gathering them (VocabParallelCrossEntropy).
//
// Parallelism: the world is split into tensor-parallel groups of --tp ranks
// (0: all ranks) and data-parallel replicas across them; each replica draws
// its own --batch / replicas sequences per step and AdamW averages the
// gradients over the replicas, clips their global norm and updates every
// shard. Learning rate: linear warm-up, then cosine decay to 10 %. With
// --nproc=N > 1 each rank gets OPENBLAS_NUM_THREADS = cores / N unless the
// variable is set.
//
// Output (rank 0): the plan table, a progress line every --log_every steps
//   step 100/400  loss 1.9321  lr 2.9e-03  grad norm 0.84  41234 tokens/s
// the start and end loss, a greedy-generation evaluation on held-out
// sequences (token and exact-match accuracy) and every rank's time split
// between compute and communication (tokens/s counts the 2 x --seq_len
// input tokens of every sequence of the global batch, over all replicas).
// Exits non-zero on any error and when
// the loss did not fall by at least --min_loss_drop of its start.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "comm/process_group.h"
#include "comm/timed_communicator.h"
#include "examples/decoder_config_json.h"
#include "glog/logging.h"
#include "layers/checkpoint.h"
#include "layers/decoder.h"
#include "layers/model_wrapper.h"
#include "layers/optimizer.h"
#include "layers/vocab_parallel.h"
#include "runtime/status_macros.h"
#include "runtime/tensor.h"
#include "tools/launch.h"

ABSL_FLAG(int, nproc, 1, "ranks to start on this host (re-launches itself)");
ABSL_FLAG(std::string, backend, "auto", "communication backend");
ABSL_FLAG(int, tp, 0,
          "tensor-parallel size (0: the whole world); the world size divided "
          "by it is the number of data-parallel replicas");
// Model.
ABSL_FLAG(int64_t, hidden, 128, "model width");
ABSL_FLAG(int64_t, heads, 4, "query heads");
ABSL_FLAG(int64_t, kv_heads, 2, "key/value heads");
ABSL_FLAG(int64_t, layers, 2, "decoder layers");
ABSL_FLAG(int64_t, ffn, 256, "MLP width (per SwiGLU branch)");
ABSL_FLAG(int64_t, vocab, 64, "vocabulary size (>= symbols + 2)");
ABSL_FLAG(uint64_t, seed, 1, "seed of the initial weights and of the data");
// Task.
ABSL_FLAG(std::string, task, "reverse", "reverse, copy or sort");
ABSL_FLAG(int64_t, seq_len, 8, "symbols per sequence");
ABSL_FLAG(int64_t, symbols, 16, "alphabet size");
// Optimisation.
ABSL_FLAG(int64_t, steps, 400, "optimizer steps");
ABSL_FLAG(int64_t, batch, 32,
          "sequences per step over all replicas (divisible by them)");
ABSL_FLAG(double, lr, 3e-3, "peak learning rate");
ABSL_FLAG(int64_t, warmup_steps, 30, "linear warm-up steps");
ABSL_FLAG(double, weight_decay, 0.01, "AdamW decoupled weight decay");
ABSL_FLAG(double, max_grad_norm, 1.0, "clip the global gradient norm (<= 0: off)");
ABSL_FLAG(int64_t, log_every, 50, "steps between progress lines");
ABSL_FLAG(int64_t, eval_sequences, 64, "held-out sequences for the evaluation");
ABSL_FLAG(double, min_loss_drop, 0.5,
          "fail unless the end loss is below (1 - this) x the start loss");
ABSL_FLAG(std::string, save, "", "save a sharded checkpoint to this directory");

namespace {

constexpr int64_t kSeparator = 1;
constexpr int64_t kFirstSymbol = 2;

double Ms(absl::Duration d) { return absl::ToDoubleMilliseconds(d); }

absl::Duration Since(std::chrono::steady_clock::time_point start) {
  return absl::FromChrono(std::chrono::steady_clock::now() - start);
}

// OPENBLAS_NUM_THREADS as this rank sees it ("unset": all cores).
std::string BlasThreads() {
  const char* v = std::getenv("OPENBLAS_NUM_THREADS");
  return v == nullptr ? "unset" : v;
}

enum class Task { kReverse, kCopy, kSort };

absl::StatusOr<Task> ParseTask(const std::string& name) {
  if (name == "reverse") return Task::kReverse;
  if (name == "copy") return Task::kCopy;
  if (name == "sort") return Task::kSort;
  return absl::InvalidArgumentError(
      absl::StrCat("--task: unknown task \"", name, "\" (reverse, copy, sort)"));
}

std::vector<int64_t> Answer(Task task, std::vector<int64_t> symbols) {
  if (task == Task::kReverse) std::reverse(symbols.begin(), symbols.end());
  if (task == Task::kSort) std::sort(symbols.begin(), symbols.end());
  return symbols;
}

// A batch of B sequences: ids [B, 2L] = symbols, separator, answer[0..L-2];
// answer [B, L] = the tokens to predict at positions L .. 2L-1.
struct Batch {
  tp::Tensor ids, answer, prompt;  // prompt [B, L + 1]: symbols, separator
};

// Deterministic in (seed, stream): std::mt19937_64 is specified exactly, and
// symbols are drawn by rejection-free modulo (the bias of 2^64 mod 16 is 0).
absl::StatusOr<Batch> MakeBatch(Task task, int64_t batch, int64_t len,
                                int64_t symbols, uint64_t seed,
                                uint64_t stream) {
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + stream);
  std::vector<int64_t> ids, answer, prompt;
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<int64_t> s(len);
    for (int64_t& x : s) x = kFirstSymbol + static_cast<int64_t>(rng() % symbols);
    const std::vector<int64_t> a = Answer(task, s);
    ids.insert(ids.end(), s.begin(), s.end());
    ids.push_back(kSeparator);
    ids.insert(ids.end(), a.begin(), a.end() - 1);
    answer.insert(answer.end(), a.begin(), a.end());
    prompt.insert(prompt.end(), s.begin(), s.end());
    prompt.push_back(kSeparator);
  }
  Batch out;
  ASSIGN_OR_RETURN(out.ids, tp::Tensor::FromVector<int64_t>(ids, {batch, 2 * len}));
  ASSIGN_OR_RETURN(out.answer, tp::Tensor::FromVector<int64_t>(answer, {batch, len}));
  ASSIGN_OR_RETURN(out.prompt,
                   tp::Tensor::FromVector<int64_t>(prompt, {batch, len + 1}));
  return out;
}

// One forward + backward on the answer positions; returns the loss (the same
// on every rank of the TP group). Gradients accumulate in the model.
absl::StatusOr<double> TrainStep(tp::Decoder& decoder,
                                 tp::VocabParallelCrossEntropy& loss_fn,
                                 const Batch& batch, int64_t len) {
  ASSIGN_OR_RETURN(tp::Tensor logits, decoder.Forward(batch.ids));  // [B, 2L, V/tp]
  ASSIGN_OR_RETURN(tp::Tensor answer_logits, logits.Narrow(1, len, len));
  ASSIGN_OR_RETURN(double loss,
                   loss_fn.Forward(answer_logits.Contiguous(), batch.answer));
  ASSIGN_OR_RETURN(tp::Tensor grad_answer, loss_fn.Backward());  // [B, L, V/tp]
  tp::Tensor grad = tp::Tensor::Zeros(logits.shape(), logits.dtype());
  ASSIGN_OR_RETURN(tp::Tensor grad_view, grad.Narrow(1, len, len));
  RETURN_IF_ERROR(grad_view.CopyFrom(grad_answer));
  RETURN_IF_ERROR(decoder.Backward(grad).status());
  return loss;
}

// Greedy answers for held-out prompts: (token accuracy, exact-match rate).
absl::StatusOr<std::pair<double, double>> Evaluate(tp::Decoder& decoder,
                                                   const Batch& eval,
                                                   int64_t len,
                                                   std::string* example) {
  tp::GenerateOptions options;
  options.max_new_tokens = len;
  ASSIGN_OR_RETURN(tp::Tensor out, decoder.Generate(eval.prompt, options));
  ASSIGN_OR_RETURN(std::vector<int64_t> got, out.ToVector<int64_t>());
  ASSIGN_OR_RETURN(std::vector<int64_t> want, eval.answer.ToVector<int64_t>());
  ASSIGN_OR_RETURN(std::vector<int64_t> prompt, eval.prompt.ToVector<int64_t>());
  const int64_t batch = eval.answer.dim(0), width = 2 * len + 1;
  int64_t right = 0, exact = 0;
  for (int64_t b = 0; b < batch; ++b) {
    bool all = true;
    for (int64_t i = 0; i < len; ++i) {
      const bool ok = got[b * width + len + 1 + i] == want[b * len + i];
      right += ok;
      all = all && ok;
    }
    exact += all;
  }
  const auto row = [](const std::vector<int64_t>& v, int64_t begin,
                      int64_t n) {
    return absl::StrJoin(v.begin() + begin, v.begin() + begin + n, ",");
  };
  *example = absl::StrCat("prompt ", row(prompt, 0, len + 1), " -> ",
                          row(got, len + 1, len), " (expected ",
                          row(want, 0, len), ")");
  return std::make_pair(static_cast<double>(right) / (batch * len),
                        static_cast<double>(exact) / batch);
}

double LearningRate(int64_t step, int64_t steps, int64_t warmup, double peak) {
  if (step < warmup) return peak * (step + 1) / warmup;
  const double progress =
      static_cast<double>(step - warmup) / std::max<int64_t>(1, steps - warmup);
  return peak * (0.1 + 0.9 * 0.5 * (1.0 + std::cos(M_PI * progress)));
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
  const int dp_size = pg->data_parallel_size();
  const int dp_rank = pg->data_parallel_rank();

  ASSIGN_OR_RETURN(const Task task, ParseTask(absl::GetFlag(FLAGS_task)));
  const int64_t len = absl::GetFlag(FLAGS_seq_len);
  const int64_t symbols = absl::GetFlag(FLAGS_symbols);
  const int64_t steps = absl::GetFlag(FLAGS_steps);
  const int64_t global_batch = absl::GetFlag(FLAGS_batch);
  const int64_t log_every = std::max<int64_t>(1, absl::GetFlag(FLAGS_log_every));
  const uint64_t seed = absl::GetFlag(FLAGS_seed);
  tp::DecoderConfig config;
  config.hidden = absl::GetFlag(FLAGS_hidden);
  config.heads = absl::GetFlag(FLAGS_heads);
  config.kv_heads = absl::GetFlag(FLAGS_kv_heads);
  config.layers = absl::GetFlag(FLAGS_layers);
  config.ffn = absl::GetFlag(FLAGS_ffn);
  config.vocab = absl::GetFlag(FLAGS_vocab);
  config.max_seq = 2 * len + 1;
  config.seed = seed;
  if (len < 1 || symbols < 1 || kFirstSymbol + symbols > config.vocab) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--seq_len (", len, ") and --symbols (", symbols,
        ") must be >= 1 and symbols + 2 <= --vocab (", config.vocab, ")"));
  }
  if (steps < 1 || global_batch < 1 || global_batch % dp_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--steps (", steps, ") must be >= 1 and --batch (", global_batch,
        ") a positive multiple of the ", dp_size, " data-parallel replicas"));
  }
  const int64_t batch = global_batch / dp_size;
  if (absl::GetFlag(FLAGS_eval_sequences) < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--eval_sequences must be >= 1, got ",
                     absl::GetFlag(FLAGS_eval_sequences)));
  }

  tp::TimedCommunicator timed_tp(pg->tensor_parallel());
  tp::TimedCommunicator timed_dp(pg->data_parallel());
  ASSIGN_OR_RETURN(std::unique_ptr<tp::Decoder> serial,
                   tp::Decoder::Create(config, /*materialize=*/false));
  ASSIGN_OR_RETURN(std::unique_ptr<tp::DistributedModelWrapper> model,
                   tp::DistributedModelWrapper::Create(std::move(serial),
                                                       timed_tp));
  tp::Decoder* decoder = model->module_as<tp::Decoder>();
  if (decoder == nullptr) return absl::InternalError("the model is no Decoder");
  tp::Communicator* vocab_group = decoder->vocab_group();
  if (vocab_group == nullptr) vocab_group = &timed_tp;  // full logits: TP = 1
  tp::VocabParallelCrossEntropy loss_fn(*vocab_group);

  tp::AdamWOptions adamw_options;
  adamw_options.lr = absl::GetFlag(FLAGS_lr);
  adamw_options.weight_decay = absl::GetFlag(FLAGS_weight_decay);
  adamw_options.max_grad_norm = absl::GetFlag(FLAGS_max_grad_norm);
  ASSIGN_OR_RETURN(std::unique_ptr<tp::AdamW> adamw,
                   tp::AdamW::Create(model->parameters(), model->grads(),
                                     adamw_options, {&timed_tp, &timed_dp}));
  if (printer) {
    std::cout << absl::StrFormat(
                     "train: world %d = %d data-parallel x %d tensor-parallel, "
                     "backend %s, OPENBLAS_NUM_THREADS=%s\nconfig: %s\n"
                     "task: %s %d symbols of %d, "
                     "batch %d (%d per replica), %d steps, AdamW lr %g, "
                     "weight decay %g, clip %g\n",
                     pg->world_size(), dp_size, tp_size, pg->backend(),
                     BlasThreads(), config.ToString(), absl::GetFlag(FLAGS_task), len,
                     symbols, global_batch, batch, steps, adamw_options.lr,
                     adamw_options.weight_decay, adamw_options.max_grad_norm)
              << model->PlanTable()
              << std::flush;
  }

  // Training. Replica r draws stream (step, r); evaluation uses streams past
  // every training stream.
  double start_loss = 0, window_loss = 0, end_loss = 0;
  int64_t window_steps = 0, window_tokens = 0;
  absl::Duration window_time = absl::ZeroDuration(), train_time = window_time;
  RETURN_IF_ERROR(pg->world().Barrier());
  timed_tp.Reset();
  timed_dp.Reset();
  for (int64_t step = 0; step < steps; ++step) {
    const auto step_start = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(Batch data,
                     MakeBatch(task, batch, len, symbols, seed,
                               static_cast<uint64_t>(step) * dp_size + dp_rank));
    RETURN_IF_ERROR(adamw->set_lr(LearningRate(
        step, steps, absl::GetFlag(FLAGS_warmup_steps), adamw_options.lr)));
    model->ZeroGrad();
    ASSIGN_OR_RETURN(double loss, TrainStep(*decoder, loss_fn, data, len));
    RETURN_IF_ERROR(adamw->Step());
    // The replicas' mean loss (for printing only).
    tp::Tensor l = tp::Tensor::Full({1}, loss, tp::DType::kFloat64);
    RETURN_IF_ERROR(timed_dp.AllReduce(l, tp::ReduceOp::kAvg));
    loss = l.ToDoubles()[0];
    const absl::Duration step_time = Since(step_start);
    if (step == 0) start_loss = loss;
    window_loss += loss;
    window_steps += 1;
    window_tokens += global_batch * 2 * len;
    window_time += step_time;
    train_time += step_time;
    if ((step + 1) % log_every == 0 || step + 1 == steps) {
      end_loss = window_loss / window_steps;
      if (printer) {
        std::cout << absl::StrFormat(
                         "step %4d/%d  loss %.4f  lr %.2e  grad norm %.3f  "
                         "%.0f tokens/s\n",
                         step + 1, steps, end_loss, adamw->lr(),
                         adamw->last_grad_norm(),
                         window_tokens / absl::ToDoubleSeconds(window_time))
                  << std::flush;
      }
      window_loss = 0;
      window_steps = window_tokens = 0;
      window_time = absl::ZeroDuration();
    }
  }
  const tp::CommOpStats tp_comm = timed_tp.stats().total();
  const tp::CommOpStats dp_comm = timed_dp.stats().total();
  const double tokens_per_s =
      steps * global_batch * 2 * len / absl::ToDoubleSeconds(train_time);

  // Evaluation: greedy answers to held-out prompts.
  ASSIGN_OR_RETURN(
      Batch eval,
      MakeBatch(task, absl::GetFlag(FLAGS_eval_sequences), len, symbols, seed,
                static_cast<uint64_t>(steps + 1) * dp_size + 1000003));
  std::string example;
  ASSIGN_OR_RETURN(auto accuracy, Evaluate(*decoder, eval, len, &example));

  const double drop = 1.0 - end_loss / start_loss;
  const bool fell = drop >= absl::GetFlag(FLAGS_min_loss_drop);
  if (printer) {
    std::cout << absl::StrFormat(
                     "loss: start %.4f -> end %.4f (mean of the last %d "
                     "steps): fell by %.1f%% -> %s\n"
                     "eval: %d held-out sequences, token accuracy %.1f%%, "
                     "exact %.1f%%; %s\n"
                     "throughput: %.0f tokens/s over %d steps (%.1f ms/step)\n",
                     start_loss, end_loss,
                     steps % log_every == 0 ? log_every : steps % log_every,
                     100 * drop, fell ? "OK" : "NOT ENOUGH",
                     eval.answer.dim(0), 100 * accuracy.first,
                     100 * accuracy.second, example, tokens_per_s, steps,
                     Ms(train_time) / steps)
              << std::flush;
  }
  std::cout << absl::StrFormat(
                   "rank %d: compute %.1f ms (%.0f%%), tensor-parallel "
                   "communication %.1f ms (%.0f%%, %d collectives, %.2f MB), "
                   "data-parallel %.1f ms (%.0f%%, %d collectives, %.2f MB)\n",
                   rank, Ms(train_time - tp_comm.time - dp_comm.time),
                   100 * (1 - (Ms(tp_comm.time) + Ms(dp_comm.time)) /
                                  Ms(train_time)),
                   Ms(tp_comm.time), 100 * Ms(tp_comm.time) / Ms(train_time),
                   tp_comm.calls, tp_comm.bytes / 1e6, Ms(dp_comm.time),
                   100 * Ms(dp_comm.time) / Ms(train_time), dp_comm.calls,
                   dp_comm.bytes / 1e6)
            << std::flush;

  // The checkpoint: replica 0's TP group writes the shards, rank 0 the
  // config.
  const std::string save = absl::GetFlag(FLAGS_save);
  if (!save.empty()) {
    absl::Status saved = absl::OkStatus();
    if (dp_rank == 0) {
      saved = tp::SaveShardedCheckpoint(save, pg->tensor_parallel(),
                                        model->parameters());
      if (saved.ok() && printer) saved = tp::WriteDecoderConfigJson(save, config);
    }
    // Every rank learns whether the save worked.
    tp::Tensor failed = tp::Tensor::Full({1}, saved.ok() ? 0 : 1, tp::DType::kInt32);
    RETURN_IF_ERROR(pg->world().AllReduce(failed, tp::ReduceOp::kMax));
    RETURN_IF_ERROR(saved);
    if (failed.ToDoubles()[0] != 0) {
      return absl::AbortedError("saving the checkpoint failed on another rank");
    }
    if (printer) {
      ASSIGN_OR_RETURN(std::vector<int64_t> prompts,
                       eval.prompt.ToVector<int64_t>());
      std::cout << absl::StrFormat(
                       "saved: %s (tensor parallel %d, %d parameters)\n"
                       "try:   bazel run //examples:transformer -- --nproc=%d "
                       "--checkpoint=%s --prompt=%s --max_new_tokens=%d\n",
                       save, tp_size, model->module().CountParameters(),
                       tp_size, save,
                       absl::StrJoin(prompts.begin(),
                                     prompts.begin() + len + 1, ","),
                       len)
                << std::flush;
    }
  }
  RETURN_IF_ERROR(pg->world().Barrier());
  if (!fell) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "the loss fell by %.1f%% of its start, less than --min_loss_drop "
        "%.0f%%",
        100 * drop, 100 * absl::GetFlag(FLAGS_min_loss_drop)));
  }
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  google::InitGoogleLogging(argv[0]);
  FLAGS_logtostderr = true;
  absl::StatusOr<std::optional<int>> job =
      tp::MaybeRelaunchSelf(absl::GetFlag(FLAGS_nproc), argc, argv);
  if (!job.ok()) {
    std::cerr << "train: " << job.status() << "\n";
    return 2;
  }
  if (job->has_value()) return **job;
  const absl::Status status = Run();
  if (!status.ok()) {
    std::cerr << "train: " << status << "\n";
    return 1;
  }
  return 0;
}
