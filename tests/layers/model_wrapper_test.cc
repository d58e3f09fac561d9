// Tests of layers/model_wrapper.h: the decoder wrapped at TP = 1, 2, 3, 4
// over real Gloo communicators (threads) equals the serial decoder (logits,
// loss, gradients, AdamW training), deferred initialisation generates
// exactly the slices of the full weights, greedy generation is identical at
// every TP size, and the plan (automatic = explicit Llama plan, table,
// errors).
#include "layers/model_wrapper.h"

#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/timed_communicator.h"
#include "glog/logging.h"
#include "gtest/gtest.h"
#include "layers/decoder.h"
#include "layers/module.h"
#include "layers/optimizer.h"
#include "layers/parallel_modules.h"
#include "runtime/status_macros.h"
#include "tests/layers/decoder_test_util.h"
#include "tests/layers/layer_test_util.h"
#include "tests/testing/fake_communicator.h"

namespace tp {
namespace {

using decoder_testing::GptConfig;
using decoder_testing::Ids;
using decoder_testing::IdTensor;
using decoder_testing::LlamaConfig;
using decoder_testing::Randomize;
using testing_layers::Close;
using testing_layers::ExpectError;
using testing_layers::RunGloo;
using testing_layers::ToStatus;

constexpr uint64_t kParamSeed = 41;
constexpr int64_t kBatch = 2, kSeq = 6;

std::unique_ptr<Decoder> MustCreate(const DecoderConfig& c,
                                    bool materialize = true) {
  absl::StatusOr<std::unique_ptr<Decoder>> d = Decoder::Create(c, materialize);
  CHECK(d.ok()) << d.status();
  return *std::move(d);
}

// A serial decoder with the test's parameters.
std::unique_ptr<Decoder> SerialModel(const DecoderConfig& c) {
  auto d = MustCreate(c);
  Randomize(*d, kParamSeed);
  return d;
}

// What the serial decoder computes for one batch.
struct SerialResult {
  Tensor logits;  // [B, S, V]
  double loss = 0;
  std::map<std::string, Tensor> grads;
};

SerialResult RunSerial(const DecoderConfig& c, const Tensor& ids,
                       const Tensor& tgt) {
  auto d = SerialModel(c);
  SerialResult r;
  r.logits = d->Forward(ids).value();
  r.loss = d->ForwardLoss(ids, tgt).value();
  CHECK(d->BackwardLoss().ok());
  for (const ParameterShard& g : d->NamedGrads()) r.grads[g.name] = g.tensor;
  return r;
}

// Checks `shard` against the slice of `full` its metadata describes: exactly,
// or to relative error `tol` measured against max(max |slice|, 1e-3). The
// floor matters for gradients that are 0 in exact arithmetic and rounding
// noise (~1e-10) in floating point: the key-projection bias (softmax is
// invariant to a shift shared by a row's scores).
absl::Status CheckSlice(const ParameterShard& shard, const Tensor& full,
                        double tol, bool exact) {
  if (shard.full_shape != full.shape()) {
    return absl::InternalError(absl::StrCat(
        shard.name, ": full_shape ", ShapeToString(shard.full_shape), " vs ",
        ShapeToString(full.shape())));
  }
  Tensor want = full;
  if (!shard.replicated()) {
    ASSIGN_OR_RETURN(want, full.Narrow(shard.split_dim, shard.offset,
                                       shard.tensor.dim(shard.split_dim)));
  }
  if (want.shape() != shard.tensor.shape()) {
    return absl::InternalError(absl::StrCat(
        shard.name, ": shard ", ShapeToString(shard.tensor.shape()),
        " vs slice ", ShapeToString(want.shape())));
  }
  if (exact) {
    if (want.ToDoubles() != shard.tensor.ToDoubles()) {
      return absl::InternalError(
          absl::StrCat(shard.name, ": shard differs from the slice"));
    }
    return absl::OkStatus();
  }
  const std::vector<double> a = shard.tensor.ToDoubles(), b = want.ToDoubles();
  double diff = 0, scale = 1e-3;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  if (!(diff <= tol * scale)) {
    return absl::InternalError(absl::StrCat(shard.name, ": max difference ",
                                            diff, " > ", tol, " x ", scale));
  }
  return absl::OkStatus();
}

// The split dim the automatic plan gives each parameter (-1 replicated).
int ExpectedSplitDim(const std::string& name) {
  for (const char* col : {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",
                          "embed_tokens", "lm_head"}) {
    if (absl::StrContains(name, col)) return 0;
  }
  for (const char* row : {"o_proj", "down_proj"}) {
    if (absl::StrContains(name, row)) {
      return absl::EndsWith(name, ".bias") ? -1 : 1;  // row bias replicated
    }
  }
  return -1;  // norms
}

// ---------------------------------------------------------------------------
// TP = N equals the serial decoder.
// ---------------------------------------------------------------------------

class WrappedDecoderTest
    : public ::testing::TestWithParam<std::tuple<bool, int>> {};

TEST_P(WrappedDecoderTest, LogitsLossAndGradientsEqualSerial) {
  const bool llama = std::get<0>(GetParam());
  const int tp = std::get<1>(GetParam());
  const DecoderConfig c = llama ? LlamaConfig() : GptConfig();
  const Tensor ids = IdTensor(Ids(kBatch * kSeq, c.vocab, 3), {kBatch, kSeq});
  const Tensor tgt = IdTensor(Ids(kBatch * kSeq, c.vocab, 4), {kBatch, kSeq});
  const SerialResult serial = RunSerial(c, ids, tgt);
  TP_EXPECT_OK(RunGloo(tp, [&](Communicator& gloo) -> absl::Status {
    // Counted, to check how many collectives the backward makes.
    TimedCommunicator comm(gloo);
    ASSIGN_OR_RETURN(auto wrapped,
                     DistributedModelWrapper::Create(SerialModel(c), comm));
    Decoder* dec = wrapped->module_as<Decoder>();
    if (dec == nullptr || dec->vocab_group() != &comm) {
      return absl::InternalError("wrapped decoder or its vocab group");
    }
    // Logits: this rank's vocabulary slice.
    ASSIGN_OR_RETURN(Tensor logits, dec->Forward(ids));
    const int64_t vl = c.vocab / tp;
    if (logits.shape() != Shape{kBatch, kSeq, vl}) {
      return absl::InternalError(
          absl::StrCat("logits shape ", ShapeToString(logits.shape())));
    }
    ASSIGN_OR_RETURN(Tensor want,
                     serial.logits.Narrow(2, comm.rank() * vl, vl));
    RETURN_IF_ERROR(ToStatus(Close(logits, want.ToDoubles(), 1e-5, "logits")));
    // Loss and gradients.
    ASSIGN_OR_RETURN(double loss, dec->ForwardLoss(ids, tgt));
    if (!(std::abs(loss - serial.loss) < 1e-5 * std::abs(serial.loss))) {
      return absl::InternalError(
          absl::StrCat("loss ", loss, " vs serial ", serial.loss));
    }
    comm.Reset();
    RETURN_IF_ERROR(dec->BackwardLoss());
    // Megatron's count: one all-reduce of the input gradient per attention
    // (q/k/v together) and per MLP (gate/up together), one for the LM head;
    // nothing else. None at TP = 1.
    const CommStats& st = comm.stats();
    const int64_t want_ar = tp > 1 ? 2 * c.layers + 1 : 0;
    if (st.op(CommOp::kAllReduce).calls != want_ar ||
        st.total().calls != st.op(CommOp::kAllReduce).calls) {
      return absl::InternalError(
          absl::StrCat("backward collectives: ", st.ToString(), "; want ",
                       want_ar, " all-reduces and nothing else"));
    }
    const std::vector<ParameterShard> grads = wrapped->grads();
    if (grads.size() != serial.grads.size()) {
      return absl::InternalError("parameter count differs");
    }
    for (const ParameterShard& g : grads) {
      auto it = serial.grads.find(g.name);
      if (it == serial.grads.end()) {
        return absl::InternalError(absl::StrCat("unexpected name ", g.name));
      }
      const int want_dim = ExpectedSplitDim(g.name);
      if (g.split_dim != want_dim) {
        return absl::InternalError(absl::StrCat(
            g.name, ": split_dim ", g.split_dim, ", want ", want_dim));
      }
      if (!g.replicated() &&
          g.offset != comm.rank() * g.tensor.dim(g.split_dim)) {
        return absl::InternalError(absl::StrCat(g.name, ": offset ", g.offset));
      }
      RETURN_IF_ERROR(CheckSlice(g, it->second, 1e-5, /*exact=*/false));
    }
    return absl::OkStatus();
  }));
}

INSTANTIATE_TEST_SUITE_P(
    LlamaAndGptAtTp1To4, WrappedDecoderTest,
    ::testing::Combine(::testing::Bool(), ::testing::Values(1, 2, 3, 4)),
    [](const ::testing::TestParamInfo<std::tuple<bool, int>>& i) {
      return absl::StrCat(std::get<0>(i.param) ? "Llama" : "Gpt", "Tp",
                          std::get<1>(i.param));
    });

TEST(DistributedModelWrapperTest, AdamWTrainingEqualsSerial) {
  // Five AdamW steps on one batch with global-norm clipping: the TP = 2 loss
  // curve and final parameters equal the serial ones to 1e-5. (eps = 1e-4:
  // with the default 1e-8, Adam's first update m / sqrt(v) is +-lr for an
  // element whose gradient is rounding noise, which TP changes.)
  const DecoderConfig c = LlamaConfig();
  AdamWOptions opt;
  opt.lr = 1e-2;
  opt.max_grad_norm = 0.5;  // below the initial norm: clipping is active
  opt.eps = 1e-4;
  constexpr int kSteps = 5;
  auto batch = [&](int step, uint64_t salt) {
    return IdTensor(Ids(kBatch * kSeq, c.vocab, 100 + salt), {kBatch, kSeq});
  };
  std::vector<double> serial_losses, serial_norms;
  auto serial = SerialModel(c);
  {
    auto adamw =
        AdamW::Create(serial->NamedParameters(), serial->NamedGrads(), opt);
    ASSERT_TRUE(adamw.ok()) << adamw.status();
    for (int s = 0; s < kSteps; ++s) {
      serial->ZeroGrad();
      serial_losses.push_back(
          serial->ForwardLoss(batch(s, 0), batch(s, 1)).value());
      TP_EXPECT_OK(serial->BackwardLoss());
      TP_EXPECT_OK((*adamw)->Step());
      serial_norms.push_back((*adamw)->last_grad_norm());
    }
    EXPECT_GT(serial_norms[0], opt.max_grad_norm);
  }
  std::map<std::string, Tensor> final_params;
  for (const ParameterShard& p : serial->NamedParameters()) {
    final_params[p.name] = p.tensor;
  }
  TP_EXPECT_OK(RunGloo(2, [&](Communicator& comm) -> absl::Status {
    ASSIGN_OR_RETURN(auto model,
                     DistributedModelWrapper::Create(SerialModel(c), comm));
    Decoder& dec = *model->module_as<Decoder>();
    ASSIGN_OR_RETURN(auto adamw, AdamW::Create(model->parameters(),
                                               model->grads(), opt, {&comm}));
    for (int s = 0; s < kSteps; ++s) {
      model->ZeroGrad();
      ASSIGN_OR_RETURN(double loss, dec.ForwardLoss(batch(s, 0), batch(s, 1)));
      if (!(std::abs(loss - serial_losses[s]) <
            1e-5 * std::abs(serial_losses[s]))) {
        return absl::InternalError(absl::StrCat("step ", s, ": loss ", loss,
                                                " vs ", serial_losses[s]));
      }
      RETURN_IF_ERROR(dec.BackwardLoss());
      RETURN_IF_ERROR(adamw->Step());
      // The global norm over shards (replicated parameters counted once).
      if (!(std::abs(adamw->last_grad_norm() - serial_norms[s]) <
            1e-5 * serial_norms[s])) {
        return absl::InternalError(absl::StrCat("step ", s, ": grad norm ",
                                                adamw->last_grad_norm(), " vs ",
                                                serial_norms[s]));
      }
    }
    for (const ParameterShard& p : model->parameters()) {
      RETURN_IF_ERROR(
          CheckSlice(p, final_params.at(p.name), 1e-5, /*exact=*/false));
    }
    return absl::OkStatus();
  }));
  EXPECT_LT(serial_losses.back(), serial_losses.front());
}

TEST(DistributedModelWrapperTest, DeferredInitGeneratesExactSlices) {
  // Deferred leaves are never materialised; each rank's shard is
  // bit-identical to the slice of the eagerly built full weight.
  for (const DecoderConfig& c : {LlamaConfig(), GptConfig()}) {
    auto eager = MustCreate(c);
    std::map<std::string, Tensor> full;
    for (const ParameterShard& p : eager->NamedParameters()) {
      full[p.name] = p.tensor;
    }
    for (int tp : {2, 3}) {
      TP_EXPECT_OK(RunGloo(tp, [&](Communicator& comm) -> absl::Status {
        ASSIGN_OR_RETURN(auto model,
                         DistributedModelWrapper::Create(
                             MustCreate(c, /*materialize=*/false), comm));
        for (const ParameterShard& p : model->parameters()) {
          if (!p.tensor.defined()) {
            return absl::InternalError(absl::StrCat(p.name, " undefined"));
          }
          RETURN_IF_ERROR(CheckSlice(p, full.at(p.name), 0, /*exact=*/true));
        }
        return absl::OkStatus();
      }));
    }
  }
}

TEST(DistributedModelWrapperTest, MixedExplicitPlanEqualsSerial) {
  // Only the MLPs sharded; attention, embedding and LM head replicated (the
  // loss is then the serial one on every rank).
  const DecoderConfig c = GptConfig();
  const Tensor ids = IdTensor(Ids(kBatch * kSeq, c.vocab, 13), {kBatch, kSeq});
  const Tensor tgt = IdTensor(Ids(kBatch * kSeq, c.vocab, 14), {kBatch, kSeq});
  const SerialResult serial = RunSerial(c, ids, tgt);
  const ParallelPlan plan = ParallelPlan::Explicit(
      {{"model.layers.*.mlp.up_proj", ParallelStyle::kColwise},
       {"model.layers.?.mlp.down_proj", ParallelStyle::kRowwise}});
  TP_EXPECT_OK(RunGloo(2, [&](Communicator& comm) -> absl::Status {
    ASSIGN_OR_RETURN(auto model, DistributedModelWrapper::Create(SerialModel(c),
                                                                 comm, plan));
    Decoder& dec = *model->module_as<Decoder>();
    if (dec.vocab_group() != nullptr) {
      return absl::InternalError("lm_head should stay replicated");
    }
    ASSIGN_OR_RETURN(double loss, dec.ForwardLoss(ids, tgt));
    if (!(std::abs(loss - serial.loss) < 1e-5 * std::abs(serial.loss))) {
      return absl::InternalError(
          absl::StrCat("loss ", loss, " vs ", serial.loss));
    }
    RETURN_IF_ERROR(dec.BackwardLoss());
    for (const ParameterShard& g : model->grads()) {
      const bool mlp = absl::StrContains(g.name, "mlp.up_proj") ||
                       (absl::StrContains(g.name, "mlp.down_proj.weight"));
      if (g.replicated() == mlp) {
        return absl::InternalError(absl::StrCat(g.name, ": wrong layout"));
      }
      RETURN_IF_ERROR(CheckSlice(g, serial.grads.at(g.name), 1e-5, false));
    }
    return absl::OkStatus();
  }));
}

// ---------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------

TEST(DistributedModelWrapperTest, GreedyGenerationIdenticalAtTp1To4) {
  for (const DecoderConfig& c : {LlamaConfig(), GptConfig()}) {
    const int64_t P = 3, N = 12;
    const Tensor prompt = IdTensor(Ids(kBatch * P, c.vocab, 51), {kBatch, P});
    GenerateOptions g;
    g.max_new_tokens = N;
    auto serial = SerialModel(c);
    g.use_kv_cache = false;
    const std::vector<int64_t> want =
        *serial->Generate(prompt, g).value().ToVector<int64_t>();
    std::set<int64_t> distinct(want.begin() + P, want.end());
    EXPECT_GT(distinct.size(), 3u) << "degenerate continuation";
    for (int tp : {1, 2, 4}) {
      TP_EXPECT_OK(RunGloo(tp, [&](Communicator& comm) -> absl::Status {
        ASSIGN_OR_RETURN(auto model,
                         DistributedModelWrapper::Create(SerialModel(c), comm));
        Decoder& dec = *model->module_as<Decoder>();
        for (bool cache : {true, false}) {
          if (!cache && tp != 2) continue;
          GenerateOptions o = g;
          o.use_kv_cache = cache;
          ASSIGN_OR_RETURN(Tensor out, dec.Generate(prompt, o));
          ASSIGN_OR_RETURN(std::vector<int64_t> got, out.ToVector<int64_t>());
          if (got != want) {
            return absl::InternalError(absl::StrCat(
                "tp ", tp, " cache ", cache, ": tokens differ from serial"));
          }
        }
        return absl::OkStatus();
      }));
    }
  }
}

// GreedyTokens over vocabulary-split logits at TP 2, 3, 4: the first maximum
// of the full row, with ties across ranks, NaNs (never win) and an all-NaN
// row (id 0), in one collective per call.
TEST(DistributedModelWrapperTest, GreedyTokensAcrossRanksInOneCollective) {
  const DecoderConfig c = LlamaConfig();
  const int64_t V = c.vocab, B = 7;
  const double nan = std::nan("");
  std::vector<double> full(B * V, -1.0);
  std::vector<int64_t> want(B);
  // Row 0: the maximum at the last id. Row 1: a tie between id 20 and 90
  // (different ranks at tp 2, 3, 4). Row 2: NaN everywhere except id 70.
  // Row 3: all NaN. Row 4: a tie inside one rank's slice (ids 3 and 5) with
  // NaN at id 0. Row 5: all -inf (the first id). Row 6: NaN on rank 0's
  // slice, -inf everywhere else (the first id after rank 0's slice).
  full[0 * V + V - 1] = 4.0;
  want[0] = V - 1;
  full[1 * V + 20] = full[1 * V + 90] = 2.5;
  want[1] = 20;
  for (int64_t j = 0; j < V; ++j) full[2 * V + j] = j == 70 ? -7.0 : nan;
  want[2] = 70;
  for (int64_t j = 0; j < V; ++j) full[3 * V + j] = nan;
  want[3] = 0;
  full[4 * V + 0] = nan;
  full[4 * V + 3] = full[4 * V + 5] = 1.0;
  want[4] = 3;
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < V; ++j) full[5 * V + j] = -inf;
  want[5] = 0;
  for (int tp : {2, 3, 4}) {
    TP_EXPECT_OK(RunGloo(tp, [&](Communicator& gloo) -> absl::Status {
      TimedCommunicator comm(gloo);
      ASSIGN_OR_RETURN(auto model,
                       DistributedModelWrapper::Create(SerialModel(c), comm));
      Decoder& dec = *model->module_as<Decoder>();
      const int64_t vl = V / tp;
      std::vector<double> rows = full;
      for (int64_t j = 0; j < V; ++j) rows[6 * V + j] = j < vl ? nan : -inf;
      std::vector<int64_t> expect = want;
      expect[6] = vl;
      std::vector<double> mine;
      for (int64_t b = 0; b < B; ++b) {
        mine.insert(mine.end(), rows.begin() + b * V + comm.rank() * vl,
                    rows.begin() + b * V + (comm.rank() + 1) * vl);
      }
      ASSIGN_OR_RETURN(Tensor logits,
                       Tensor::FromDoubles(mine, {B, vl}, DType::kFloat32));
      comm.Reset();
      ASSIGN_OR_RETURN(Tensor ids, dec.GreedyTokens(logits));
      ASSIGN_OR_RETURN(std::vector<int64_t> got, ids.ToVector<int64_t>());
      if (got != expect) {
        return absl::InternalError(
            absl::StrCat("tp ", tp, ": tokens ", absl::StrJoin(got, ","),
                         ", want ", absl::StrJoin(expect, ",")));
      }
      if (comm.stats().total().calls != 1) {
        return absl::InternalError(comm.stats().ToString());
      }
      return absl::OkStatus();
    }));
  }
}

// A ForwardStep that fails in its second layer (an injected failure of that
// layer's attention all-reduce, call 3 of the step: embedding, layer 0
// attention, layer 0 MLP, layer 1 attention) leaves the cache as it was on
// every rank, although layer 0 had already appended; retrying the step on
// that cache then gives the logits of a fresh cache. Without the roll-back
// layer 0 would stay one step ahead of the others.
TEST(DistributedModelWrapperTest, FailedForwardStepLeavesTheCacheAsItWas) {
  const DecoderConfig c = LlamaConfig();
  ASSERT_GE(c.layers, 2);
  const int64_t P = 3;
  const Tensor prompt = IdTensor(Ids(kBatch * P, c.vocab, 61), {kBatch, P});
  for (int failing : {0, 1}) {
    std::vector<FakeCommunicatorOptions> options(2);
    options[failing].fail_on_call = 3;
    const std::vector<absl::Status> statuses = testing_layers::RunFake(
        2, options, [&](Communicator& comm) -> absl::Status {
          ASSIGN_OR_RETURN(auto model, DistributedModelWrapper::Create(
                                           SerialModel(c), comm));
          Decoder& dec = *model->module_as<Decoder>();
          DecoderCache cache, fresh;
          if (dec.ForwardStep(prompt, cache).ok()) {
            return absl::InternalError("the step did not fail");
          }
          if (cache.length() != 0) {
            return absl::InternalError(absl::StrCat(
                "cache length ", cache.length(), " after a failed step"));
          }
          ASSIGN_OR_RETURN(Tensor retried, dec.ForwardStep(prompt, cache));
          ASSIGN_OR_RETURN(Tensor want, dec.ForwardStep(prompt, fresh));
          if (cache.length() != P || retried.ToDoubles() != want.ToDoubles()) {
            return absl::InternalError(
                "the retried step differs from a fresh cache's");
          }
          return absl::OkStatus();
        });
    for (const absl::Status& st : statuses) TP_EXPECT_OK(st);
  }
}

// ---------------------------------------------------------------------------
// Plans
// ---------------------------------------------------------------------------

TEST(ResolvePlanTest, TableOfAOneLayerLlama) {
  DecoderConfig c = LlamaConfig();
  c.layers = 1;
  auto dec = MustCreate(c, /*materialize=*/false);
  absl::StatusOr<std::vector<PlanEntry>> plan =
      ResolvePlan(*dec, 4, ParallelPlan::Auto());
  ASSERT_TRUE(plan.ok()) << plan.status();
  const std::string table = FormatPlanTable(*plan, 4);
  const std::string want =
      "module                                  | type      | style          | "
      "full shape | shard shape\n"
      "----------------------------------------|-----------|----------------|-"
      "-----------|------------\n"
      "model.embed_tokens                      | Embedding | vocab_parallel | "
      "[96, 48]   | [24, 48]\n"
      "model.layers.0.input_layernorm          | RMSNorm   | replicate      | "
      "[48]       | [48]\n"
      "model.layers.0.self_attn.q_proj         | Linear    | colwise        | "
      "[96, 48]   | [24, 48]\n"
      "model.layers.0.self_attn.k_proj         | Linear    | colwise        | "
      "[48, 48]   | [12, 48]\n"
      "model.layers.0.self_attn.v_proj         | Linear    | colwise        | "
      "[48, 48]   | [12, 48]\n"
      "model.layers.0.self_attn.o_proj         | Linear    | rowwise        | "
      "[48, 96]   | [48, 24]\n"
      "model.layers.0.post_attention_layernorm | RMSNorm   | replicate      | "
      "[48]       | [48]\n"
      "model.layers.0.mlp.gate_proj            | Linear    | colwise        | "
      "[96, 48]   | [24, 48]\n"
      "model.layers.0.mlp.up_proj              | Linear    | colwise        | "
      "[96, 48]   | [24, 48]\n"
      "model.layers.0.mlp.down_proj            | Linear    | rowwise        | "
      "[48, 96]   | [48, 24]\n"
      "model.norm                              | RMSNorm   | replicate      | "
      "[48]       | [48]\n"
      "lm_head                                 | Linear    | vocab_parallel | "
      "[96, 48]   | [24, 48]\n"
      // Sharded: 7 * 96*48 + 2 * 48*48 = 36864, / 4 = 9216; plus 3 norms
      // of 48 on every rank.
      "tensor parallel size 4: 9360 of 37008 parameters per rank\n";
  EXPECT_EQ(table, want) << table;
}

void ExpectSamePlans(const std::vector<PlanEntry>& a,
                     const std::vector<PlanEntry>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].module, b[i].module);
    EXPECT_EQ(a[i].type, b[i].type) << a[i].module;
    EXPECT_EQ(a[i].full_shape, b[i].full_shape) << a[i].module;
    EXPECT_EQ(a[i].shard_shape, b[i].shard_shape) << a[i].module;
    EXPECT_EQ(a[i].shard_elements, b[i].shard_elements) << a[i].module;
  }
}

TEST(ResolvePlanTest, ExplicitLlamaPlanEqualsAutomatic) {
  using S = ParallelStyle;
  auto llama = MustCreate(LlamaConfig(), /*materialize=*/false);
  auto gpt = MustCreate(GptConfig(), /*materialize=*/false);
  // PyTorch-style patterns with full paths; the first matching rule wins.
  const ParallelPlan paths = ParallelPlan::Explicit(
      {{"model.embed_tokens", S::kVocabParallel},
       {"*o_proj", S::kRowwise},  // before "?_proj", which also matches it
       {"model.layers.*.self_attn.?_proj", S::kColwise},
       {"model.layers.*.mlp.gate_proj", S::kColwise},
       {"model.layers.*.mlp.up_proj", S::kColwise},
       {"*down_proj", S::kRowwise},
       {"lm_head", S::kColwise}});
  const ParallelPlan gpt_plan =
      ParallelPlan::Explicit({{"*embed_tokens", S::kVocabParallel},
                              {"*.o_proj", S::kRowwise},
                              {"*.?_proj", S::kColwise},
                              {"*.up_proj", S::kColwise},
                              {"*.down_proj", S::kRowwise},
                              {"lm_head", S::kVocabParallel}});
  for (int tp : {1, 2, 3, 4}) {
    auto a = ResolvePlan(*llama, tp, ParallelPlan::Auto());
    auto e = ResolvePlan(*llama, tp, ParallelPlan::Llama());
    auto f = ResolvePlan(*llama, tp, paths);
    ASSERT_TRUE(a.ok() && e.ok() && f.ok())
        << a.status() << e.status() << f.status();
    ExpectSamePlans(*a, *e);
    ExpectSamePlans(*a, *f);
    for (size_t i = 0; i < a->size(); ++i) {
      EXPECT_EQ((*a)[i].style, (*e)[i].style) << (*a)[i].module;
    }
    auto ga = ResolvePlan(*gpt, tp, ParallelPlan::Auto());
    auto ge = ResolvePlan(*gpt, tp, gpt_plan);
    ASSERT_TRUE(ga.ok() && ge.ok()) << ga.status() << ge.status();
    ExpectSamePlans(*ga, *ge);
  }
}

TEST(DistributedModelWrapperTest, PlanTableLogAndTree) {
  TP_EXPECT_OK(RunGloo(2, [&](Communicator& comm) -> absl::Status {
    ASSIGN_OR_RETURN(auto model, DistributedModelWrapper::Create(
                                     MustCreate(GptConfig(), false), comm));
    model->LogPlan();
    if (model->PlanTable() != FormatPlanTable(model->plan(), 2) ||
        model->tp_size() != 2) {
      return absl::InternalError("PlanTable");
    }
    const std::string tree = model->module().ToString();
    for (const char* s : {"(q_proj): ColumnParallelLinear(in=48, out=48 [",
                          "(down_proj): RowParallelLinear(in=96 [",
                          "(embed_tokens): VocabParallelEmbedding(vocab=96 [",
                          "(input_layernorm): LayerNorm(48"}) {
      if (!absl::StrContains(tree, s)) {
        return absl::InternalError(absl::StrCat("tree lacks ", s, ":\n", tree));
      }
    }
    return absl::OkStatus();
  }));
}

// A leaf type the wrapper does not know, with a parameter.
class Custom final : public Module {
 public:
  Custom() : Module("Custom"), w_(Tensor::Zeros({4}, DType::kFloat32)) {}
  std::vector<ParameterShard> LocalParameters() const override {
    ParameterShard p;
    p.name = "w";
    p.tensor = w_;
    p.full_shape = {4};
    return {p};
  }

 private:
  Tensor w_;
};

absl::Status PlanError(const Module& m, int tp, const ParallelPlan& plan,
                       const std::vector<std::string>& needles,
                       const std::string& what) {
  return ExpectError(ResolvePlan(m, tp, plan).status(),
                     absl::StatusCode::kInvalidArgument, needles, what);
}

TEST(ResolvePlanTest, IndivisibleSizesNameModuleAndValues) {
  auto llama = MustCreate(LlamaConfig(), false);
  TP_EXPECT_OK(PlanError(
      *llama, 5, ParallelPlan::Auto(),
      {"model.layers.0.self_attn", "heads 24", "kv_heads 12", "size 5"},
      "heads"));
  DecoderConfig c = LlamaConfig();
  c.heads = 8;
  c.kv_heads = 2;
  c.head_dim = 6;
  TP_EXPECT_OK(PlanError(*MustCreate(c, false), 4, ParallelPlan::Auto(),
                         {"self_attn", "kv_heads 2", "size 4"}, "kv_heads"));
  c = GptConfig();
  c.ffn = 90;
  TP_EXPECT_OK(PlanError(
      *MustCreate(c, false), 4, ParallelPlan::Auto(),
      {"model.layers.0.mlp.up_proj", "out_features 90", "size 4"}, "ffn"));
  c = GptConfig();
  c.vocab = 98;
  TP_EXPECT_OK(PlanError(*MustCreate(c, false), 4, ParallelPlan::Auto(),
                         {"model.embed_tokens", "vocab_size 98", "size 4"},
                         "vocab"));
  // The same model is fine where the sizes divide.
  EXPECT_TRUE(ResolvePlan(*MustCreate(c, false), 2, ParallelPlan::Auto()).ok());
  TP_EXPECT_OK(PlanError(*llama, 0, ParallelPlan::Auto(), {"size 0"}, "tp 0"));
}

TEST(ResolvePlanTest, UnsupportedModulesAndInconsistentPlans) {
  auto dec = MustCreate(LlamaConfig(), false);
  using P = ParallelPlan;
  using S = ParallelStyle;
  TP_EXPECT_OK(
      PlanError(*dec, 2, P::Explicit({{"*.input_layernorm", S::kColwise}}),
                {"unsupported module", "model.layers.0.input_layernorm",
                 "RMSNorm", "colwise"},
                "norm colwise"));
  TP_EXPECT_OK(PlanError(
      *dec, 2, P::Explicit({{"model.embed_tokens", S::kRowwise}}),
      {"unsupported module", "model.embed_tokens", "Embedding", "rowwise"},
      "embedding rowwise"));
  TP_EXPECT_OK(
      PlanError(*dec, 2, P::Explicit({{"*.self_attn", S::kColwise}}),
                {"unsupported module", "model.layers.0.self_attn", "Attention"},
                "composite"));
  TP_EXPECT_OK(PlanError(
      *dec, 2, P::Explicit({{"*.q_proj", S::kColwise}}),
      {"model.layers.0.self_attn", "q_proj colwise", "k_proj replicate"},
      "q only"));
  TP_EXPECT_OK(PlanError(
      *dec, 2,
      P::Explicit({{"*.gate_proj", S::kColwise}, {"*.up_proj", S::kColwise}}),
      {"model.layers.0.mlp", "down_proj replicate"}, "mlp without down"));
  TP_EXPECT_OK(PlanError(*dec, 2, P::Explicit({{"lm_head", S::kRowwise}}),
                         {"Decoder", "lm_head", "rowwise"}, "lm_head rowwise"));
  // Bad patterns.
  TP_EXPECT_OK(PlanError(*dec, 2, P::Explicit({{"", S::kColwise}}),
                         {"bad plan pattern", "empty"}, "empty pattern"));
  TP_EXPECT_OK(PlanError(*dec, 2,
                         P::Explicit({{"model.layers[0].*", S::kColwise}}),
                         {"bad plan pattern", "'['"}, "bracket"));
  TP_EXPECT_OK(PlanError(
      *dec, 2, P::Explicit({{"*.qkv_proj", S::kColwise}}),
      {"bad plan pattern", "*.qkv_proj", "matches no module"}, "no match"));
  // A leaf type the automatic plan does not know; explicit replicate is fine.
  ModuleContainer box("Box");
  box.Add("custom", std::make_unique<Custom>());
  TP_EXPECT_OK(PlanError(box, 2, P::Auto(),
                         {"unsupported module", "custom", "Custom"}, "custom"));
  EXPECT_TRUE(
      ResolvePlan(box, 2, P::Explicit({{"custom", S::kReplicate}})).ok());
  TP_EXPECT_OK(PlanError(box, 2, P::Explicit({{"custom", S::kColwise}}),
                         {"unsupported module", "custom", "Custom"},
                         "custom colwise"));
  // A sharded Linear under a parent that cannot consume its output.
  ModuleContainer plain("Plain");
  LinearOptions lo;
  lo.in_features = 4;
  lo.out_features = 4;
  plain.Add("q_proj", Linear::Create(lo).value());
  TP_EXPECT_OK(PlanError(plain, 2, P::Auto(),
                         {"unsupported plan", "Plain", "q_proj", "colwise"},
                         "plain parent"));
}

TEST(DistributedModelWrapperTest, CreateErrors) {
  // Indivisible at a real TP size: every rank gets the error, nothing runs.
  DecoderConfig c = GptConfig();
  c.heads = 4;
  TP_EXPECT_OK(RunGloo(3, [&](Communicator& comm) -> absl::Status {
    return ExpectError(
        DistributedModelWrapper::Create(MustCreate(c), comm).status(),
        absl::StatusCode::kInvalidArgument, {"self_attn", "heads 4", "size 3"},
        "create");
  }));
  TP_EXPECT_OK(RunGloo(1, [&](Communicator& comm) -> absl::Status {
    RETURN_IF_ERROR(ExpectError(
        DistributedModelWrapper::Create(nullptr, comm).status(),
        absl::StatusCode::kInvalidArgument, {"null"}, "null model"));
    // Wrapping twice: the tree is already parallel.
    ASSIGN_OR_RETURN(auto once,
                     DistributedModelWrapper::Create(MustCreate(c), comm));
    return ExpectError(
        ResolvePlan(once->module(), 1, ParallelPlan::Auto()).status(),
        absl::StatusCode::kInvalidArgument,
        {"unsupported module", "already parallelised"}, "twice");
  }));
}

}  // namespace
}  // namespace tp
