// Failure atomicity of the parallel layers over the FakeCommunicator: when a
// collective inside Forward or Backward fails (injected on one rank; its
// peers see kUnavailable), every rank gets the error back as a Status and its
// weights, biases and gradients are exactly as before the call (no partial
// update); a failed Forward leaves nothing for Backward to use.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "layers/linear.h"
#include "layers/parallel_modules.h"
#include "layers/vocab_parallel.h"
#include "runtime/status_macros.h"
#include "tests/layers/layer_test_util.h"
#include "tests/testing/fake_communicator.h"
#include "tests/testing/run_ranks.h"

namespace tp {
namespace {

using testing_layers::MakeTensor;
using testing_layers::RandomVec;
using testing_layers::RunFake;
using testing_layers::Vec;

constexpr int kTp = 2;

// Every parameter and gradient value of a layer, for before/after checks.
template <typename Layer>
std::vector<Vec> Snapshot(const Layer& layer) {
  std::vector<Vec> s;
  for (const ParameterShard& p : layer.parameters()) {
    s.push_back(p.tensor.ToDoubles());
  }
  for (const ParameterShard& g : layer.grads()) {
    s.push_back(g.tensor.ToDoubles());
  }
  return s;
}

// OK when `s` is the injected failure (on the failing rank) or the peer's
// kUnavailable (elsewhere), annotated with the layer name.
absl::Status ExpectInjected(const absl::Status& s, const std::string& layer,
                            const std::string& what) {
  if (s.code() == absl::StatusCode::kUnavailable &&
      absl::StrContains(s.message(), layer)) {
    return absl::OkStatus();
  }
  return absl::InternalError(absl::StrCat(
      what, ": expected kUnavailable naming ", layer, ", got ", s.ToString()));
}

template <typename Layer>
absl::Status ExpectUnchanged(const Layer& layer, const std::vector<Vec>& before,
                             const std::string& what) {
  if (Snapshot(layer) != before) {
    return absl::InternalError(what + ": parameters or gradients changed");
  }
  return absl::OkStatus();
}

// Runs `body` on a fake group of kTp ranks where rank `failing_rank`'s call
// number `call` fails; expects every rank's body to return OK.
void RunWithFailure(int failing_rank, int64_t call,
                    const testing_layers::Body& body) {
  std::vector<FakeCommunicatorOptions> options(kTp);
  options[failing_rank].fail_on_call = call;
  TP_EXPECT_OK(AllRanksOk(RunFake(kTp, options, body)));
}

Tensor Input(int64_t rows, int64_t cols, uint64_t seed) {
  return MakeTensor(RandomVec(rows * cols, seed), {rows, cols},
                    DType::kFloat32);
}

// Column, gather_output = false: Forward has no collective; Backward's
// all-reduce of dx is call 0 of the first step, call 1 of the second. The
// second step fails: the gradients keep the first step's values.
TEST(LayersFailureTest, ColumnBackwardFailureKeepsGradients) {
  for (int failing : {0, 1}) {
    RunWithFailure(failing, 1, [&](Communicator& comm) -> absl::Status {
      ColumnParallelLinear::Options o;
      o.in_features = 8;
      o.out_features = 12;
      o.gather_output = false;
      o.name = "fc1";
      ASSIGN_OR_RETURN(auto layer, ColumnParallelLinear::Create(comm, o));
      Tensor x = Input(4, 8, 1);
      Tensor dy = Input(4, 6, 2 + comm.rank());
      RETURN_IF_ERROR(layer->Forward(x).status());
      RETURN_IF_ERROR(layer->Backward(dy).status());  // call 0: succeeds
      const std::vector<Vec> before = Snapshot(*layer);
      RETURN_IF_ERROR(layer->Forward(x).status());
      RETURN_IF_ERROR(ExpectInjected(layer->Backward(dy).status(), "fc1",
                                     "column backward"));
      return ExpectUnchanged(*layer, before, "column backward");
    });
  }
}

// Column, gather_output = true: Forward's all-gather fails (call 0); a
// Backward afterwards finds no cached input.
TEST(LayersFailureTest, ColumnForwardFailureCachesNothing) {
  RunWithFailure(1, 0, [&](Communicator& comm) -> absl::Status {
    ColumnParallelLinear::Options o;
    o.in_features = 8;
    o.out_features = 12;
    o.gather_output = true;
    o.name = "head";
    ASSIGN_OR_RETURN(auto layer, ColumnParallelLinear::Create(comm, o));
    const std::vector<Vec> before = Snapshot(*layer);
    RETURN_IF_ERROR(ExpectInjected(layer->Forward(Input(4, 8, 3)).status(),
                                   "head", "column forward"));
    RETURN_IF_ERROR(ExpectUnchanged(*layer, before, "column forward"));
    if (layer->Backward(Input(4, 12, 4)).status().code() !=
        absl::StatusCode::kFailedPrecondition) {
      return absl::InternalError("Backward after a failed Forward ran");
    }
    return absl::OkStatus();
  });
}

// Column, sequence parallel: the backward reduce-scatter (call 1, after the
// forward all-gather) fails.
TEST(LayersFailureTest, ColumnSequenceParallelBackwardFailure) {
  RunWithFailure(0, 1, [&](Communicator& comm) -> absl::Status {
    ColumnParallelLinear::Options o;
    o.in_features = 8;
    o.out_features = 12;
    o.gather_output = false;
    o.sequence_parallel = true;
    o.name = "qkv";
    ASSIGN_OR_RETURN(auto layer, ColumnParallelLinear::Create(comm, o));
    const std::vector<Vec> before = Snapshot(*layer);
    RETURN_IF_ERROR(layer->Forward(Input(2, 8, 5)).status());  // call 0
    RETURN_IF_ERROR(ExpectInjected(layer->Backward(Input(4, 6, 6)).status(),
                                   "qkv", "column sp backward"));
    return ExpectUnchanged(*layer, before, "column sp backward");
  });
}

// Row: the forward all-reduce fails (call 0).
TEST(LayersFailureTest, RowForwardFailure) {
  RunWithFailure(0, 0, [&](Communicator& comm) -> absl::Status {
    RowParallelLinear::Options o;
    o.in_features = 12;
    o.out_features = 8;
    o.input_is_parallel = true;
    o.name = "fc2";
    ASSIGN_OR_RETURN(auto layer, RowParallelLinear::Create(comm, o));
    const std::vector<Vec> before = Snapshot(*layer);
    RETURN_IF_ERROR(ExpectInjected(layer->Forward(Input(4, 6, 7)).status(),
                                   "fc2", "row forward"));
    RETURN_IF_ERROR(ExpectUnchanged(*layer, before, "row forward"));
    if (layer->Backward(Input(4, 8, 8)).status().code() !=
        absl::StatusCode::kFailedPrecondition) {
      return absl::InternalError("Backward after a failed Forward ran");
    }
    return absl::OkStatus();
  });
}

// Row with a full input: the backward all-gather of dx (call 1) fails, and
// with sequence parallelism the backward all-gather of grad_out (call 1).
TEST(LayersFailureTest, RowBackwardFailureKeepsGradients) {
  for (bool sp : {false, true}) {
    RunWithFailure(1, 1, [&](Communicator& comm) -> absl::Status {
      RowParallelLinear::Options o;
      o.in_features = 12;
      o.out_features = 8;
      o.input_is_parallel = sp;
      o.sequence_parallel = sp;
      o.name = "o_proj";
      ASSIGN_OR_RETURN(auto layer, RowParallelLinear::Create(comm, o));
      const std::vector<Vec> before = Snapshot(*layer);
      RETURN_IF_ERROR(layer->Forward(Input(4, sp ? 6 : 12, 9)).status());
      RETURN_IF_ERROR(
          ExpectInjected(layer->Backward(Input(sp ? 2 : 4, 8, 10)).status(),
                         "o_proj", "row backward"));
      return ExpectUnchanged(*layer, before, "row backward");
    });
  }
}

// Embedding: the forward all-reduce fails (call 0); with sequence
// parallelism the backward all-gather (call 1) fails.
TEST(LayersFailureTest, EmbeddingFailures) {
  for (bool sp : {false, true}) {
    RunWithFailure(0, sp ? 1 : 0, [&](Communicator& comm) -> absl::Status {
      VocabParallelEmbedding::Options o;
      o.vocab_size = 8;
      o.hidden_size = 4;
      o.sequence_parallel = sp;
      o.name = "wte";
      ASSIGN_OR_RETURN(auto emb, VocabParallelEmbedding::Create(comm, o));
      const std::vector<Vec> before = Snapshot(*emb);
      ASSIGN_OR_RETURN(Tensor ids,
                       Tensor::FromVector<int64_t>({0, 7, 3, 4}, Shape{4}));
      absl::StatusOr<Tensor> y = emb->Forward(ids);
      if (!sp) {
        RETURN_IF_ERROR(ExpectInjected(y.status(), "wte", "embedding fwd"));
        RETURN_IF_ERROR(ExpectUnchanged(*emb, before, "embedding fwd"));
        if (emb->Backward(Input(4, 4, 11)).code() !=
            absl::StatusCode::kFailedPrecondition) {
          return absl::InternalError("Backward after a failed Forward ran");
        }
        return absl::OkStatus();
      }
      RETURN_IF_ERROR(y.status());
      RETURN_IF_ERROR(ExpectInjected(emb->Backward(Input(2, 4, 12)), "wte",
                                     "embedding sp bwd"));
      return ExpectUnchanged(*emb, before, "embedding sp bwd");
    });
  }
}

// Cross-entropy: the max all-reduce (call 0) or the sum all-reduce (call 1)
// fails; no loss, and nothing for Backward.
TEST(LayersFailureTest, CrossEntropyFailures) {
  for (int64_t call : {0, 1}) {
    RunWithFailure(1, call, [&](Communicator& comm) -> absl::Status {
      VocabParallelCrossEntropy ce(comm, "lm_loss");
      ASSIGN_OR_RETURN(Tensor tgt,
                       Tensor::FromVector<int64_t>({0, 7, 3, 4}, Shape{4}));
      RETURN_IF_ERROR(ExpectInjected(ce.Forward(Input(4, 4, 13), tgt).status(),
                                     "lm_loss", "ce forward"));
      if (ce.Backward().status().code() !=
              absl::StatusCode::kFailedPrecondition ||
          ce.token_losses().defined()) {
        return absl::InternalError("cross-entropy kept a failed Forward");
      }
      return absl::OkStatus();
    });
  }
}

// Two-phase column backward: BackwardPartial's unreduced input gradients,
// summed over the group, equal Backward's input gradient, and
// CommitBackward then accumulates exactly what Backward would have. Call
// order and option errors.
TEST(LayersFailureTest, ColumnTwoPhaseBackwardEqualsBackward) {
  TP_EXPECT_OK(AllRanksOk(RunFake(
      kTp, std::vector<FakeCommunicatorOptions>(kTp),
      [&](Communicator& comm) -> absl::Status {
        ColumnParallelLinear::Options o;
        o.in_features = 8;
        o.out_features = 12;
        o.gather_output = false;
        o.name = "q_proj";
        ASSIGN_OR_RETURN(auto one, ColumnParallelLinear::Create(comm, o));
        ASSIGN_OR_RETURN(auto two, ColumnParallelLinear::Create(comm, o));
        const Tensor x = Input(4, 8, 21);
        const Tensor dy = Input(4, 6, 22 + comm.rank());
        if (two->CommitBackward().code() !=
            absl::StatusCode::kFailedPrecondition) {
          return absl::InternalError("CommitBackward without a pending grad");
        }
        RETURN_IF_ERROR(one->Forward(x).status());
        ASSIGN_OR_RETURN(Tensor want, one->Backward(dy));
        RETURN_IF_ERROR(two->Forward(x).status());
        ASSIGN_OR_RETURN(Tensor dx, two->BackwardPartial(dy));
        if (Snapshot(*two) !=
            Snapshot(*ColumnParallelLinear::Create(comm, o).value())) {
          return absl::InternalError("BackwardPartial changed a gradient");
        }
        RETURN_IF_ERROR(comm.AllReduce(dx, ReduceOp::kSum));
        RETURN_IF_ERROR(two->CommitBackward());
        if (dx.ToDoubles() != want.ToDoubles() ||
            Snapshot(*two) != Snapshot(*one)) {
          return absl::InternalError(
              "two-phase backward differs from Backward");
        }
        if (two->CommitBackward().code() !=
            absl::StatusCode::kFailedPrecondition) {
          return absl::InternalError("a second CommitBackward ran");
        }
        // A Forward in between discards the pending gradient.
        RETURN_IF_ERROR(two->Forward(x).status());
        RETURN_IF_ERROR(two->BackwardPartial(dy).status());
        RETURN_IF_ERROR(two->Forward(x).status());
        if (two->CommitBackward().code() !=
            absl::StatusCode::kFailedPrecondition) {
          return absl::InternalError("a pending gradient survived Forward");
        }
        o.sequence_parallel = true;
        ASSIGN_OR_RETURN(auto sp, ColumnParallelLinear::Create(comm, o));
        RETURN_IF_ERROR(sp->Forward(Input(2, 8, 23)).status());
        if (sp->BackwardPartial(Input(4, 6, 24)).status().code() !=
            absl::StatusCode::kInvalidArgument) {
          return absl::InternalError("BackwardPartial with sequence_parallel");
        }
        return absl::OkStatus();
      })));
}

// ColumnSiblingsBackward over q/k/v-like column modules: one all-reduce
// (call 0 of the backward); when it fails, no module's gradient changed.
TEST(LayersFailureTest, ColumnSiblingsBackwardFailureKeepsGradients) {
  for (int failing : {0, 1}) {
    RunWithFailure(failing, 0, [&](Communicator& comm) -> absl::Status {
      std::vector<std::unique_ptr<ColumnParallelLinearModule>> mods;
      for (const char* name : {"q_proj", "k_proj", "v_proj"}) {
        ColumnParallelLinear::Options o;
        o.in_features = 8;
        o.out_features = 12;
        o.gather_output = false;
        o.name = name;
        ASSIGN_OR_RETURN(auto m, ColumnParallelLinearModule::Create(comm, o));
        mods.push_back(std::move(m));
      }
      const Tensor x = Input(4, 8, 31);
      std::vector<std::pair<Module*, Tensor>> parts;
      std::vector<std::vector<Vec>> before;
      for (auto& m : mods) {
        RETURN_IF_ERROR(m->Forward(x).status());
        parts.emplace_back(m.get(), Input(4, 6, 32 + comm.rank()));
        before.push_back(Snapshot(m->layer()));
      }
      absl::Status s = ColumnSiblingsBackward(parts).status();
      if (s.code() != absl::StatusCode::kUnavailable) {
        return absl::InternalError(absl::StrCat(
            "siblings backward: expected kUnavailable, got ", s.ToString()));
      }
      for (size_t i = 0; i < mods.size(); ++i) {
        RETURN_IF_ERROR(
            ExpectUnchanged(mods[i]->layer(), before[i], "siblings backward"));
      }
      return absl::OkStatus();
    });
  }
}

}  // namespace
}  // namespace tp
