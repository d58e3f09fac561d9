// Tests of layers/vocab_parallel.h: VocabParallelEmbedding and
// VocabParallelCrossEntropy at TP = 1, 2, 3, 4 over real Gloo communicators
// against the float64 serial reference (tests/layers/layer_reference.h),
// finite differences on tiny float64 shapes, and errors.
#include "layers/vocab_parallel.h"

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "glog/logging.h"
#include "gtest/gtest.h"
#include "runtime/init.h"
#include "runtime/status_macros.h"
#include "tests/layers/layer_reference.h"
#include "tests/layers/layer_test_util.h"

namespace tp {
namespace {

using testing_layers::Close;
using testing_layers::ExpectError;
using testing_layers::MakeTensor;
using testing_layers::RandomIds;
using testing_layers::RandomVec;
using testing_layers::RoundTo;
using testing_layers::RunGloo;
using testing_layers::Tolerance;
using testing_layers::ToStatus;
using testing_layers::Vec;

constexpr int64_t kVocab = 48;  // divisible by 1, 2, 3, 4
constexpr int64_t kHidden = 12;
constexpr int64_t kSeq = 12;
constexpr int64_t kBatch = 2;
constexpr int64_t kTokens = kSeq * kBatch;

const InitSpec kTableInit = InitSpec::Normal(0.0, 1.0, 51);

Tensor IdsTensor(const std::vector<int64_t>& ids, const Shape& shape,
                 DType dtype) {
  Vec d(ids.begin(), ids.end());
  return MakeTensor(d, shape, dtype);
}

// Fails unless `loss` is bit-identical on every rank.
absl::Status ExpectSameOnAllRanks(Communicator& comm, double loss) {
  Tensor mx = Tensor::Full({1}, loss, DType::kFloat64);
  Tensor mn = Tensor::Full({1}, loss, DType::kFloat64);
  RETURN_IF_ERROR(comm.AllReduce(mx, ReduceOp::kMax));
  RETURN_IF_ERROR(comm.AllReduce(mn, ReduceOp::kMin));
  if (mx.ToDoubles()[0] != mn.ToDoubles()[0]) {
    return absl::InternalError(
        absl::StrCat("loss differs between ranks: ", mn.ToDoubles()[0], " .. ",
                     mx.ToDoubles()[0]));
  }
  return absl::OkStatus();
}

class VocabParallelTest : public ::testing::TestWithParam<int> {};

TEST_P(VocabParallelTest, EmbeddingMatchesSerialReference) {
  const int tp = GetParam();
  TP_EXPECT_OK(RunGloo(tp, [&](Communicator& comm) -> absl::Status {
    const int r = comm.rank();
    const int64_t v_l = kVocab / tp;
    for (DType dtype : {DType::kFloat32, DType::kFloat64, DType::kFloat16,
                        DType::kBFloat16}) {
      for (bool sp : {false, true}) {
        for (DType id_dtype : {DType::kInt64, DType::kInt32}) {
          const std::string name =
              absl::StrCat(DTypeName(dtype), sp ? " sequence_parallel" : "",
                           " ids ", DTypeName(id_dtype), " rank ", r);
          const double tol = Tolerance(dtype);
          VocabParallelEmbedding::Options o;
          o.vocab_size = kVocab;
          o.hidden_size = kHidden;
          o.dtype = dtype;
          o.sequence_parallel = sp;
          o.init = kTableInit;
          ASSIGN_OR_RETURN(auto emb, VocabParallelEmbedding::Create(comm, o));
          ASSIGN_OR_RETURN(Tensor full_t,
                           InitTensor(kTableInit, {kVocab, kHidden}, dtype));
          const Vec table = full_t.ToDoubles();
          if (emb->weight().ToDoubles() !=
              ref::Rows(table, kHidden, r * v_l, v_l)) {
            return absl::InternalError(name + ": shard != slice of the table");
          }
          // Ids over every rank's range (both ends of the vocabulary
          // included), with repeats (their gradients accumulate).
          std::vector<int64_t> ids(kTokens);
          for (int64_t i = 0; i < kTokens; ++i) ids[i] = (i * 2) % kVocab;
          ids[1] = ids[0] = 0;
          ids[5] = ids[7] = ids[9] = kVocab - 1;
          const Vec y = ref::EmbeddingForward(table, ids, kHidden);
          const Vec dy = RoundTo(RandomVec(kTokens * kHidden, 53), dtype);
          const Vec dt = ref::EmbeddingBackward(dy, ids, kVocab, kHidden);

          ASSIGN_OR_RETURN(Tensor out, emb->Forward(IdsTensor(
                                           ids, {kSeq, kBatch}, id_dtype)));
          const int64_t rows_l = kTokens / tp;
          const Shape want_shape = {sp ? kSeq / tp : kSeq, kBatch, kHidden};
          if (out.shape() != want_shape) {
            return absl::InternalError(
                absl::StrCat(name, ": shape ", ShapeToString(out.shape())));
          }
          RETURN_IF_ERROR(ToStatus(
              Close(out, sp ? ref::Rows(y, kHidden, r * rows_l, rows_l) : y,
                    tol, name + " y")));
          const Vec dy_in =
              sp ? ref::Rows(dy, kHidden, r * rows_l, rows_l) : dy;
          RETURN_IF_ERROR(emb->Backward(MakeTensor(dy_in, want_shape, dtype)));
          RETURN_IF_ERROR(ToStatus(Close(emb->weight_grad(),
                                         ref::Rows(dt, kHidden, r * v_l, v_l),
                                         tol, name + " dtable")));
          std::vector<ParameterShard> p = emb->parameters();
          if (p.size() != 1 || p[0].name != "weight" || p[0].split_dim != 0 ||
              p[0].offset != r * v_l ||
              p[0].full_shape != Shape({kVocab, kHidden}) ||
              !emb->grads()[0].tensor.SharesStorageWith(emb->weight_grad())) {
            return absl::InternalError(name + ": parameters() metadata");
          }
          emb->ZeroGrad();
          for (double g : emb->weight_grad().ToDoubles()) {
            if (g != 0) return absl::InternalError(name + ": ZeroGrad");
          }
        }
      }
    }
    return absl::OkStatus();
  }));
}

TEST_P(VocabParallelTest, CrossEntropyMatchesSerialReference) {
  const int tp = GetParam();
  TP_EXPECT_OK(RunGloo(tp, [&](Communicator& comm) -> absl::Status {
    const int r = comm.rank();
    const int64_t v_l = kVocab / tp;
    struct Logits {
      double scale, offset;
    };
    for (DType dtype : {DType::kFloat32, DType::kFloat64, DType::kFloat16,
                        DType::kBFloat16}) {
      // Ordinary logits, and large ones (exp would overflow without the
      // max subtraction).
      for (Logits lg : {Logits{4.0, 0.0}, Logits{50.0, 1000.0}}) {
        if (lg.offset > 0 && dtype != DType::kFloat32 &&
            dtype != DType::kFloat64) {
          continue;  // 1000 +- 50 is too coarse in 16 bits to be useful
        }
        const std::string name =
            absl::StrCat(DTypeName(dtype), " scale ", lg.scale, " offset ",
                         lg.offset, " rank ", r);
        const double tol = Tolerance(dtype);
        Vec z = RandomVec(kTokens * kVocab, 61, lg.scale);
        for (double& v : z) v += lg.offset;
        z = RoundTo(z, dtype);
        std::vector<int64_t> tgt = RandomIds(kTokens, kVocab, 62);
        tgt[0] = 0;
        tgt[1] = kVocab - 1;
        const double loss_ref =
            ref::CrossEntropyForward(z, tgt, kTokens, kVocab);
        const Vec g_ref = ref::CrossEntropyBackward(z, tgt, kTokens, kVocab);

        // Local logits [kSeq, kBatch, V/tp]; targets [kSeq, kBatch] int32.
        Tensor local =
            MakeTensor(ref::Columns(z, kTokens, kVocab, r * v_l, v_l),
                       {kSeq, kBatch, v_l}, dtype);
        VocabParallelCrossEntropy ce(comm);
        ASSIGN_OR_RETURN(
            double loss,
            ce.Forward(local, IdsTensor(tgt, {kSeq, kBatch}, DType::kInt32)));
        if (!(std::fabs(loss - loss_ref) < tol * std::fabs(loss_ref))) {
          return absl::InternalError(
              absl::StrCat(name, ": loss ", loss, ", reference ", loss_ref));
        }
        RETURN_IF_ERROR(ExpectSameOnAllRanks(comm, loss));
        if (ce.token_losses().numel() != kTokens) {
          return absl::InternalError(name + ": token_losses");
        }
        ASSIGN_OR_RETURN(Tensor g, ce.Backward());
        if (g.shape() != local.shape() || g.dtype() != dtype) {
          return absl::InternalError(name + ": gradient shape or dtype");
        }
        const Vec g_local = ref::Columns(g_ref, kTokens, kVocab, r * v_l, v_l);
        // Relative to the largest gradient entry (1/T scale).
        RETURN_IF_ERROR(ToStatus(Close(g, g_local, tol, name + " dlogits")));
        ASSIGN_OR_RETURN(Tensor g_half, ce.Backward(0.5));
        Vec half = g_local;
        for (double& v : half) v *= 0.5;
        RETURN_IF_ERROR(
            ToStatus(Close(g_half, half, tol, name + " dlogits * 0.5")));
      }
    }
    return absl::OkStatus();
  }));
}

INSTANTIATE_TEST_SUITE_P(TensorParallelSizes, VocabParallelTest,
                         ::testing::Values(1, 2, 3, 4),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return absl::StrCat("tp", info.param);
                         });

// Finite differences of the loss with respect to each local logit, perturbed
// on the rank that owns it (float64, V = 6, T = 3).
TEST(VocabParallelFiniteDifferences, CrossEntropy) {
  constexpr double kStep = 1e-6;
  for (int tp : {2, 3}) {
    TP_EXPECT_OK(RunGloo(tp, [&](Communicator& comm) -> absl::Status {
      const int64_t t = 3, v = 6, v_l = v / tp;
      const Vec z = RandomVec(t * v, 71, 2.0);
      Tensor local = MakeTensor(ref::Columns(z, t, v, comm.rank() * v_l, v_l),
                                {t, v_l}, DType::kFloat64);
      Tensor tgt = IdsTensor({1, 5, 2}, {t}, DType::kInt64);
      VocabParallelCrossEntropy ce(comm);
      RETURN_IF_ERROR(ce.Forward(local, tgt).status());
      ASSIGN_OR_RETURN(Tensor g, ce.Backward());
      const Vec gv = g.ToDoubles();
      double* lp = local.data<double>();
      for (int owner = 0; owner < tp; ++owner) {
        for (int64_t i = 0; i < t * v_l; ++i) {
          const bool mine = comm.rank() == owner;
          const double keep = lp[i];
          if (mine) lp[i] = keep + kStep;
          ASSIGN_OR_RETURN(double up, ce.Forward(local, tgt));
          if (mine) lp[i] = keep - kStep;
          ASSIGN_OR_RETURN(double down, ce.Forward(local, tgt));
          if (mine) lp[i] = keep;
          const double fd = (up - down) / (2 * kStep);
          if (mine && std::fabs(fd - gv[i]) > 1e-7) {
            return absl::InternalError(absl::StrCat(
                "rank ", owner, " dlogits[", i, "] = ", gv[i], ", fd ", fd));
          }
        }
      }
      return absl::OkStatus();
    }));
  }
}

// Finite differences of sum(embedding(ids) * R) with respect to each table
// entry, perturbed on the owning rank.
TEST(VocabParallelFiniteDifferences, Embedding) {
  constexpr double kStep = 1e-6;
  for (int tp : {2, 3}) {
    TP_EXPECT_OK(RunGloo(tp, [&](Communicator& comm) -> absl::Status {
      VocabParallelEmbedding::Options o;
      o.vocab_size = 6;
      o.hidden_size = 2;
      o.dtype = DType::kFloat64;
      o.init = kTableInit;
      ASSIGN_OR_RETURN(auto emb, VocabParallelEmbedding::Create(comm, o));
      Tensor ids = IdsTensor({0, 5, 3, 3, 1}, {5}, DType::kInt64);
      Tensor rr = MakeTensor(RandomVec(10, 72), {5, 2}, DType::kFloat64);
      auto loss = [&]() -> absl::StatusOr<double> {
        ASSIGN_OR_RETURN(Tensor y, emb->Forward(ids));
        const Vec yv = y.ToDoubles(), rv = rr.ToDoubles();
        double s = 0;
        for (size_t i = 0; i < yv.size(); ++i) s += yv[i] * rv[i];
        return s;
      };
      RETURN_IF_ERROR(loss().status());
      RETURN_IF_ERROR(emb->Backward(rr));
      const Vec gv = emb->weight_grad().ToDoubles();
      double* wp = emb->weight().data<double>();
      for (int owner = 0; owner < tp; ++owner) {
        for (int64_t i = 0; i < emb->weight().numel(); ++i) {
          const bool mine = comm.rank() == owner;
          const double keep = wp[i];
          if (mine) wp[i] = keep + kStep;
          ASSIGN_OR_RETURN(double up, loss());
          if (mine) wp[i] = keep - kStep;
          ASSIGN_OR_RETURN(double down, loss());
          if (mine) wp[i] = keep;
          const double fd = (up - down) / (2 * kStep);
          if (mine && std::fabs(fd - gv[i]) > 1e-7) {
            return absl::InternalError(absl::StrCat(
                "rank ", owner, " dtable[", i, "] = ", gv[i], ", fd ", fd));
          }
        }
      }
      return absl::OkStatus();
    }));
  }
}

// ---------------------------------------------------------------------------
// Errors (validated before any communication: one rank of a fake group).
// ---------------------------------------------------------------------------

TEST(VocabParallelErrors, EmbeddingBadSizesAndTokenIds) {
  auto group = FakeCommunicator::CreateGroup(4);
  VocabParallelEmbedding::Options o;
  o.vocab_size = 10;
  o.hidden_size = 4;
  o.name = "wte";
  TP_EXPECT_OK(
      ExpectError(VocabParallelEmbedding::Create(*group[2], o).status(),
                  absl::StatusCode::kInvalidArgument,
                  {"wte", "vocab_size 10", "4"}, "indivisible vocab"));
  o.vocab_size = 0;
  TP_EXPECT_OK(
      ExpectError(VocabParallelEmbedding::Create(*group[0], o).status(),
                  absl::StatusCode::kInvalidArgument, {"wte", "vocab_size (0)"},
                  "zero vocab"));
  o.vocab_size = 12;
  o.dtype = DType::kInt64;
  TP_EXPECT_OK(ExpectError(
      VocabParallelEmbedding::Create(*group[0], o).status(),
      absl::StatusCode::kInvalidArgument, {"wte", "int64"}, "int table"));
  o.dtype = DType::kFloat32;
  auto emb = VocabParallelEmbedding::Create(*group[1], o);
  ASSERT_TRUE(emb.ok()) << emb.status();
  const Vec before = (*emb)->weight().ToDoubles();
  TP_EXPECT_OK(ExpectError(
      (*emb)->Forward(IdsTensor({1, 2, 12}, {3}, DType::kInt64)).status(),
      absl::StatusCode::kInvalidArgument,
      {"wte", "token id 12", "position 2", "[0, 12)"}, "id == vocab"));
  TP_EXPECT_OK(
      ExpectError((*emb)->Forward(IdsTensor({-1}, {1}, DType::kInt32)).status(),
                  absl::StatusCode::kInvalidArgument, {"wte", "token id -1"},
                  "negative id"));
  TP_EXPECT_OK(
      ExpectError((*emb)->Forward(Tensor::Zeros({3}, DType::kFloat32)).status(),
                  absl::StatusCode::kInvalidArgument,
                  {"wte", "int32 or int64", "float32"}, "float ids"));
  // Nothing changed and nothing is cached for Backward.
  EXPECT_EQ((*emb)->weight().ToDoubles(), before);
  TP_EXPECT_OK(ExpectError(
      (*emb)->Backward(Tensor::Zeros({3, 4}, DType::kFloat32)),
      absl::StatusCode::kFailedPrecondition, {"wte"}, "backward first"));
}

TEST(VocabParallelErrors, CrossEntropyBadTargetsAndLogits) {
  auto group = FakeCommunicator::CreateGroup(2);
  VocabParallelCrossEntropy ce(*group[0], "lm_loss");
  Tensor logits = Tensor::Zeros({3, 4}, DType::kFloat32);  // V = 8
  TP_EXPECT_OK(ExpectError(
      ce.Forward(logits, IdsTensor({0, 8, 1}, {3}, DType::kInt64)).status(),
      absl::StatusCode::kInvalidArgument,
      {"lm_loss", "token id 8", "position 1", "[0, 8)"}, "target == V"));
  TP_EXPECT_OK(ExpectError(
      ce.Forward(logits, IdsTensor({0, 1}, {2}, DType::kInt64)).status(),
      absl::StatusCode::kInvalidArgument, {"lm_loss", "2 ids", "3 tokens"},
      "target count"));
  TP_EXPECT_OK(ExpectError(ce.Forward(Tensor::Zeros({3, 4}, DType::kInt32),
                                      IdsTensor({0, 1, 2}, {3}, DType::kInt64))
                               .status(),
                           absl::StatusCode::kInvalidArgument,
                           {"lm_loss", "int32"}, "int logits"));
  TP_EXPECT_OK(ExpectError(ce.Forward(Tensor::Zeros({0, 4}, DType::kFloat32),
                                      IdsTensor({}, {0}, DType::kInt64))
                               .status(),
                           absl::StatusCode::kInvalidArgument,
                           {"lm_loss", "no tokens"}, "no tokens"));
  TP_EXPECT_OK(ExpectError(ce.Backward().status(),
                           absl::StatusCode::kFailedPrecondition, {"lm_loss"},
                           "backward first"));
}

}  // namespace
}  // namespace tp
