// Training equivalence: a 2-layer transformer language model (vocab-parallel
// embedding, two TransformerBlocks, final norm, column-parallel LM head,
// vocab-parallel cross-entropy) trained for 20 AdamW steps gives the TP = 1
// loss curve, to 1e-5 relative in float32, at TP = 2 and 4, with DP x TP =
// 2 x 2, and with sequence parallelism on.
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "layers/linear.h"
#include "layers/norm.h"
#include "layers/optimizer.h"
#include "layers/parameter.h"
#include "layers/transformer_block.h"
#include "layers/vocab_parallel.h"
#include "runtime/init.h"
#include "runtime/status_macros.h"
#include "tests/layers/block_test_util.h"
#include "tests/layers/layer_test_util.h"

namespace tp {
namespace {

using block_testing::GridRank;
using block_testing::RunGrid;

constexpr int64_t kVocab = 64;
constexpr int64_t kHidden = 24;
constexpr int64_t kSeq = 6;
constexpr int64_t kGlobalBatch = 4;  // sequences per step over all DP replicas
constexpr int kSteps = 20;
constexpr uint64_t kSeed = 2024;

// A tiny decoder-only LM. Block 0: LayerNorm, GeLU, 8 heads of 3, biases.
// Block 1: RMSNorm, SwiGLU, 8 query heads over 4 kv heads, no biases.
class TinyLM {
 public:
  static absl::StatusOr<std::unique_ptr<TinyLM>> Create(Communicator& tp,
                                                        bool sp) {
    std::unique_ptr<TinyLM> m(new TinyLM(tp, sp));
    VocabParallelEmbedding::Options eo;
    eo.vocab_size = kVocab;
    eo.hidden_size = kHidden;
    eo.sequence_parallel = sp;
    eo.init = InitSpec::Normal(0.0, 1.0, SeedFor(kSeed, "embed.weight"));
    eo.name = "embed";
    ASSIGN_OR_RETURN(m->embed_, VocabParallelEmbedding::Create(tp, eo));
    for (int i = 0; i < 2; ++i) {
      TransformerBlock::Options o;
      o.hidden = kHidden;
      o.num_heads = 8;
      o.num_kv_heads = i == 0 ? 8 : 4;
      o.head_dim = 3;
      o.ffn = 48;
      o.activation = i == 0 ? MlpActivation::kGeLU : MlpActivation::kSwiGLU;
      o.norm = i == 0 ? NormKind::kLayerNorm : NormKind::kRMSNorm;
      o.bias = i == 0;
      o.sequence_parallel = sp;
      o.init_std = 0.2;
      o.seed = kSeed;
      o.name = absl::StrCat("layers.", i);
      ASSIGN_OR_RETURN(auto blk, TransformerBlock::Create(tp, o));
      m->blocks_.push_back(std::move(blk));
    }
    Norm::Options no;
    no.hidden = kHidden;
    no.sequence_parallel = sp;
    no.name = "final_norm";
    ASSIGN_OR_RETURN(m->final_norm_, Norm::Create(tp, no));
    ColumnParallelLinear::Options ho;
    ho.in_features = kHidden;
    ho.out_features = kVocab;
    ho.bias = false;
    ho.gather_output = false;
    ho.sequence_parallel = sp;
    ho.weight_init = InitSpec::Normal(0.0, 0.2, SeedFor(kSeed, "lm_head.weight"));
    ho.name = "lm_head";
    ASSIGN_OR_RETURN(m->head_, ColumnParallelLinear::Create(tp, ho));
    m->loss_ = std::make_unique<VocabParallelCrossEntropy>(tp);
    return m;
  }

  // Mean next-token loss over the batch; accumulates every gradient.
  absl::StatusOr<double> ForwardBackward(const Tensor& ids,
                                         const Tensor& targets,
                                         const TokenLayout& layout) {
    ASSIGN_OR_RETURN(Tensor h, embed_->Forward(ids));
    for (auto& blk : blocks_) {
      ASSIGN_OR_RETURN(h, blk->Forward(h, layout));
    }
    ASSIGN_OR_RETURN(h, final_norm_->Forward(h));
    ASSIGN_OR_RETURN(Tensor logits, head_->Forward(h));
    ASSIGN_OR_RETURN(double loss, loss_->Forward(logits, targets));
    ASSIGN_OR_RETURN(Tensor d, loss_->Backward());
    ASSIGN_OR_RETURN(d, head_->Backward(d));
    ASSIGN_OR_RETURN(d, final_norm_->Backward(d));
    for (int i = static_cast<int>(blocks_.size()) - 1; i >= 0; --i) {
      ASSIGN_OR_RETURN(d, blocks_[i]->Backward(d));
    }
    RETURN_IF_ERROR(embed_->Backward(d));
    return loss;
  }

  std::vector<ParameterShard> parameters() const { return Collect(false); }
  std::vector<ParameterShard> grads() const { return Collect(true); }

 private:
  TinyLM(Communicator& tp, bool sp) : tp_(tp), sp_(sp) {}

  std::vector<ParameterShard> Collect(bool grads) const {
    std::vector<ParameterShard> out;
    auto add = [&out](absl::string_view prefix, std::vector<ParameterShard> v) {
      for (auto& p : PrefixNames(prefix, std::move(v))) out.push_back(p);
    };
    add("embed", grads ? embed_->grads() : embed_->parameters());
    for (size_t i = 0; i < blocks_.size(); ++i) {
      add(absl::StrCat("layers.", i),
          grads ? blocks_[i]->grads() : blocks_[i]->parameters());
    }
    add("final_norm", grads ? final_norm_->grads() : final_norm_->parameters());
    add("lm_head", grads ? head_->grads() : head_->parameters());
    return out;
  }

  Communicator& tp_;
  bool sp_;
  std::unique_ptr<VocabParallelEmbedding> embed_;
  std::vector<std::unique_ptr<TransformerBlock>> blocks_;
  std::unique_ptr<Norm> final_norm_;
  std::unique_ptr<ColumnParallelLinear> head_;
  std::unique_ptr<VocabParallelCrossEntropy> loss_;
};

// Tokens of step `step` for the global batch: kGlobalBatch sequences of
// kSeq + 1 ids (inputs are the first kSeq, targets the last kSeq). Two fixed
// batches in turn, so the model can fit them and the loss falls.
std::vector<int64_t> StepTokens(int step) {
  return testing_layers::RandomIds(kGlobalBatch * (kSeq + 1), kVocab,
                                   1000 + step % 2);
}

// Trains on dp x tp ranks; returns the loss curve (averaged over DP replicas)
// seen by every rank (world_rank -> curve).
absl::StatusOr<std::vector<std::vector<double>>> Train(int dp, int tp, bool sp) {
  std::vector<std::vector<double>> curves(dp * tp);
  absl::Status s = RunGrid(dp, tp, [&](GridRank& r) -> absl::Status {
    ASSIGN_OR_RETURN(auto model, TinyLM::Create(*r.tp, sp));
    AdamWOptions o;
    o.lr = 1e-2;
    o.weight_decay = 0.01;
    o.max_grad_norm = 1.0;
    ASSIGN_OR_RETURN(auto adam, AdamW::Create(model->parameters(),
                                              model->grads(), o, {r.tp, r.dp}));
    const int64_t batch = kGlobalBatch / dp;  // this replica's sequences
    for (int step = 0; step < kSteps; ++step) {
      const std::vector<int64_t> all = StepTokens(step);
      std::vector<int64_t> ids, targets;
      for (int64_t b = r.dp_rank * batch; b < (r.dp_rank + 1) * batch; ++b) {
        for (int64_t s = 0; s < kSeq; ++s) {
          ids.push_back(all[b * (kSeq + 1) + s]);
          targets.push_back(all[b * (kSeq + 1) + s + 1]);
        }
      }
      const int64_t T = batch * kSeq;
      ASSIGN_OR_RETURN(Tensor idt, Tensor::FromVector<int64_t>(ids, {T}));
      ASSIGN_OR_RETURN(Tensor tgt, Tensor::FromVector<int64_t>(targets, {T}));
      adam->ZeroGrad();
      ASSIGN_OR_RETURN(double loss,
                       model->ForwardBackward(idt, tgt, {batch, kSeq}));
      RETURN_IF_ERROR(adam->Step());
      Tensor l = Tensor::Full({1}, loss, DType::kFloat64);
      RETURN_IF_ERROR(r.dp->AllReduce(l, ReduceOp::kAvg));
      curves[r.world_rank].push_back(l.ToDoubles()[0]);
    }
    return absl::OkStatus();
  });
  RETURN_IF_ERROR(s);
  return curves;
}

class TrainingEquivalenceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto c = Train(1, 1, false);
    ASSERT_TRUE(c.ok()) << c.status();
    reference_ = new std::vector<double>((*c)[0]);
  }
  static void TearDownTestSuite() {
    delete reference_;
    reference_ = nullptr;
  }

  void ExpectSameCurve(int dp, int tp, bool sp) {
    ASSERT_NE(reference_, nullptr);
    auto curves = Train(dp, tp, sp);
    ASSERT_TRUE(curves.ok()) << curves.status();
    double worst = 0;
    for (size_t rank = 0; rank < curves->size(); ++rank) {
      const std::vector<double>& c = (*curves)[rank];
      ASSERT_EQ(c.size(), reference_->size());
      for (size_t i = 0; i < c.size(); ++i) {
        EXPECT_LT(std::fabs(c[i] - (*reference_)[i]),
                  1e-5 * std::fabs((*reference_)[i]))
            << "rank " << rank << " step " << i << ": loss " << c[i]
            << ", TP=1 loss " << (*reference_)[i];
        worst = std::max(worst, std::fabs(c[i] - (*reference_)[i]) /
                                    std::fabs((*reference_)[i]));
      }
    }
    std::printf("dp %d tp %d sp %d: max relative loss difference vs TP=1 %.3g\n",
                dp, tp, sp ? 1 : 0, worst);
  }

  static std::vector<double>* reference_;
};

std::vector<double>* TrainingEquivalenceTest::reference_ = nullptr;

TEST_F(TrainingEquivalenceTest, ReferenceCurveActuallyTrains) {
  ASSERT_NE(reference_, nullptr);
  ASSERT_EQ(reference_->size(), static_cast<size_t>(kSteps));
  // The model memorises the two batches: the loss must fall clearly, so
  // that the equivalence below is about a model that really trains.
  const double first = reference_->front();
  std::printf("TP=1 loss curve:");
  for (double l : *reference_) std::printf(" %.5f", l);
  std::printf("\n");
  EXPECT_GT(first, 3.0);
  EXPECT_LT(reference_->back(), 0.6 * first) << "the model does not train";
}

TEST_F(TrainingEquivalenceTest, TensorParallel2) { ExpectSameCurve(1, 2, false); }
TEST_F(TrainingEquivalenceTest, TensorParallel4) { ExpectSameCurve(1, 4, false); }
TEST_F(TrainingEquivalenceTest, TensorParallel2SequenceParallel) {
  ExpectSameCurve(1, 2, true);
}
TEST_F(TrainingEquivalenceTest, TensorParallel4SequenceParallel) {
  ExpectSameCurve(1, 4, true);
}
TEST_F(TrainingEquivalenceTest, DataParallel2TensorParallel2) {
  ExpectSameCurve(2, 2, false);
}
TEST_F(TrainingEquivalenceTest, DataParallel2TensorParallel2SequenceParallel) {
  ExpectSameCurve(2, 2, true);
}
TEST_F(TrainingEquivalenceTest, DataParallel2Only) { ExpectSameCurve(2, 1, false); }

}  // namespace
}  // namespace tp
