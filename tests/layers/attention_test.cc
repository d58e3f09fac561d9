// ParallelSelfAttention against the float64 reference at TP = 1..4
// (multi-head and grouped-query, with and without sequence parallelism), the
// KV cache against full-sequence forward, finite differences, and errors.
#include "layers/attention.h"

#include <memory>
#include <string>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "layers/attention_core.h"
#include "runtime/status_macros.h"
#include "tests/layers/block_reference.h"
#include "tests/layers/block_test_util.h"
#include "tests/layers/layer_test_util.h"

namespace tp {
namespace {

using block_testing::CheckClose;
using block_testing::CheckShards;
using block_testing::LoadShards;
using block_testing::PositionRows;
using block_testing::RandomParams;
using block_testing::RowSlice;
using block_testing::Vec;
using testing_layers::ExpectError;
using testing_layers::MakeTensor;
using testing_layers::RandomVec;
using testing_layers::RunGloo;

block_ref::Dims AttnDims(int64_t heads, int64_t kv_heads) {
  block_ref::Dims d;
  d.batch = 2;
  d.seq = 6;
  d.hidden = 48;
  d.heads = heads;
  d.kv_heads = kv_heads;
  d.head_dim = 4;
  return d;
}

ParallelSelfAttention::Options AttnOptions(const block_ref::Dims& d, bool sp,
                                           DType dtype) {
  ParallelSelfAttention::Options o;
  o.hidden = d.hidden;
  o.num_heads = d.heads;
  o.num_kv_heads = d.kv_heads;
  o.head_dim = d.head_dim;
  o.bias = d.bias;
  o.sequence_parallel = sp;
  o.dtype = dtype;
  return o;
}

// Forward and backward of one configuration at TP = tp against the reference.
absl::Status CheckAgainstReference(const block_ref::Dims& d, int tp, bool sp) {
  const auto shapes = block_ref::AttentionShapes(d, "");
  const block_ref::Params params = RandomParams(shapes, 21);
  const int64_t T = d.tokens(), H = d.hidden;
  const Vec x = RandomVec(T * H, 22);
  const Vec dy = RandomVec(T * H, 23);
  const Vec y_ref = block_ref::Attention(params, "", d, x);
  block_ref::Params g_ref = block_ref::ZerosLike(params);
  const Vec dx_ref = block_ref::AttentionBackward(params, "", d, x, dy, &g_ref);
  return RunGloo(tp, [&](Communicator& comm) -> absl::Status {
    ASSIGN_OR_RETURN(auto attn, ParallelSelfAttention::Create(
                                    comm, AttnOptions(d, sp, DType::kFloat32)));
    if (attn->local_heads() != d.heads / tp ||
        attn->local_kv_heads() != d.kv_heads / tp) {
      return absl::InternalError("wrong local head counts");
    }
    RETURN_IF_ERROR(LoadShards(attn->parameters(), params, shapes));
    const int64_t rows = sp ? T / tp : T;
    const int64_t r0 = sp ? comm.rank() * rows : 0;
    ASSIGN_OR_RETURN(
        Tensor y, attn->Forward(MakeTensor(RowSlice(x, H, r0, rows), {rows, H},
                                           DType::kFloat32),
                                {d.batch, d.seq}));
    RETURN_IF_ERROR(CheckClose(y, RowSlice(y_ref, H, r0, rows), 1e-5, "y"));
    ASSIGN_OR_RETURN(Tensor dx,
                     attn->Backward(MakeTensor(RowSlice(dy, H, r0, rows),
                                               {rows, H}, DType::kFloat32)));
    RETURN_IF_ERROR(CheckClose(dx, RowSlice(dx_ref, H, r0, rows), 1e-5, "dx"));
    return CheckShards(attn->grads(), g_ref, comm.rank(), tp, 1e-5, "grads");
  });
}

class ParallelSelfAttentionTest
    : public ::testing::TestWithParam<std::tuple<int, bool, bool>> {};

// 12 heads (multi-head) or 24 query heads over 12 key/value heads (GQA);
// head_dim 4 with hidden 48 (so GQA's 24 * 4 = 96 differs from hidden).
TEST_P(ParallelSelfAttentionTest, ForwardAndBackwardEqualFloat64Reference) {
  const auto [tp, gqa, sp] = GetParam();
  TP_EXPECT_OK(
      CheckAgainstReference(gqa ? AttnDims(24, 12) : AttnDims(12, 12), tp, sp));
}

INSTANTIATE_TEST_SUITE_P(
    TpGqaSp, ParallelSelfAttentionTest,
    ::testing::Combine(::testing::Values(1, 2, 3, 4), ::testing::Bool(),
                       ::testing::Bool()),
    [](const ::testing::TestParamInfo<std::tuple<int, bool, bool>>& info) {
      return absl::StrCat("tp", std::get<0>(info.param),
                          std::get<1>(info.param) ? "_gqa" : "_mha",
                          std::get<2>(info.param) ? "_sp" : "");
    });

TEST(ParallelSelfAttentionGqa, GroupSizesThreeAndFourAndMultiQuery) {
  // 12 query heads over 4 kv heads (groups of 3) at TP 1, 2, 4.
  for (int tp : {1, 2, 4}) {
    SCOPED_TRACE(tp);
    TP_EXPECT_OK(CheckAgainstReference(AttnDims(12, 4), tp, false));
  }
  // 12 over 3 (groups of 4) at TP 3; multi-query (one kv head) at TP 1.
  TP_EXPECT_OK(CheckAgainstReference(AttnDims(12, 3), 3, false));
  TP_EXPECT_OK(CheckAgainstReference(AttnDims(12, 1), 1, false));
}

// Prompt of 2 positions, then 4 single positions through a KV cache, equals
// one Forward over all 6 positions.
TEST(ParallelSelfAttentionKVCache, GenerationEqualsFullSequenceForward) {
  for (int tp : {1, 2, 4}) {
    for (bool sp : {false, true}) {
      SCOPED_TRACE(absl::StrCat("tp ", tp, " sp ", sp));
      block_ref::Dims d = AttnDims(24, 12);
      d.batch = 4;  // rows of a single-position step divide by tp
      const auto shapes = block_ref::AttentionShapes(d, "");
      const block_ref::Params params = RandomParams(shapes, 31);
      const int64_t B = d.batch, S = d.seq, H = d.hidden;
      const Vec x = RandomVec(B * S * H, 32);
      const Vec y_ref = block_ref::Attention(params, "", d, x);
      // Rows of positions [p0, p0 + n) of every sequence, batch-major.
      auto positions = [&](const Vec& m, int64_t p0, int64_t n) {
        return PositionRows(m, B, S, H, p0, n);
      };
      TP_EXPECT_OK(RunGloo(tp, [&](Communicator& comm) -> absl::Status {
        ASSIGN_OR_RETURN(auto attn,
                         ParallelSelfAttention::Create(
                             comm, AttnOptions(d, sp, DType::kFloat32)));
        RETURN_IF_ERROR(LoadShards(attn->parameters(), params, shapes));
        KVCache cache;
        int64_t p0 = 0;
        for (int64_t n : {2, 1, 1, 1, 1}) {
          const Vec xs = positions(x, p0, n);
          const int64_t rows = sp ? B * n / tp : B * n;
          const int64_t r0 = sp ? comm.rank() * rows : 0;
          ASSIGN_OR_RETURN(Tensor y,
                           attn->Forward(MakeTensor(RowSlice(xs, H, r0, rows),
                                                    {rows, H}, DType::kFloat32),
                                         {B, n}, &cache));
          RETURN_IF_ERROR(CheckClose(
              y, RowSlice(positions(y_ref, p0, n), H, r0, rows), 1e-5,
              absl::StrCat("positions ", p0, "..", p0 + n - 1)));
          p0 += n;
          if (cache.length() != p0) {
            return absl::InternalError(
                absl::StrCat("cache length ", cache.length(), " != ", p0));
          }
        }
        // A cached Forward prepares no Backward.
        RETURN_IF_ERROR(ExpectError(
            attn->Backward(Tensor::Zeros({sp ? B / tp : B, H}, DType::kFloat32))
                .status(),
            absl::StatusCode::kFailedPrecondition, {"Backward"}, "cached"));
        // A batch that does not fit the cache is rejected; the cache stays.
        const Tensor keys = cache.keys();
        RETURN_IF_ERROR(ExpectError(
            attn->Forward(Tensor::Zeros({sp ? 2 * B / tp : 2 * B, H},
                                        DType::kFloat32),
                          {2 * B, 1}, &cache)
                .status(),
            absl::StatusCode::kInvalidArgument, {"KV cache", "batch"},
            "cache batch"));
        if (cache.length() != S || !cache.keys().SharesStorageWith(keys)) {
          return absl::InternalError("a rejected Forward changed the cache");
        }
        cache.Clear();
        if (cache.length() != 0) return absl::InternalError("Clear");
        return absl::OkStatus();
      }));
    }
  }
}

// A cache that grows past its first capacities (16, 32 positions) keeps
// giving the full-sequence outputs; views taken earlier stay unchanged; a
// copy (fork) appends into its own storage: stepping the fork with other
// inputs after the original does not disturb the original's positions.
TEST(ParallelSelfAttentionKVCache, GrowsPastCapacityAndForksByCopy) {
  for (int tp : {1, 2}) {
    SCOPED_TRACE(absl::StrCat("tp ", tp));
    block_ref::Dims d = AttnDims(12, 4);
    d.batch = 2;
    d.seq = 40;
    const auto shapes = block_ref::AttentionShapes(d, "");
    const block_ref::Params params = RandomParams(shapes, 41);
    const int64_t B = d.batch, S = d.seq, H = d.hidden;
    const Vec x = RandomVec(B * S * H, 42);
    const Vec other = RandomVec(B * H, 43);
    const Vec y_ref = block_ref::Attention(params, "", d, x);
    auto positions = [&](const Vec& m, int64_t p0, int64_t n) {
      return PositionRows(m, B, S, H, p0, n);
    };
    TP_EXPECT_OK(RunGloo(tp, [&](Communicator& comm) -> absl::Status {
      ASSIGN_OR_RETURN(auto attn,
                       ParallelSelfAttention::Create(
                           comm, AttnOptions(d, false, DType::kFloat32)));
      RETURN_IF_ERROR(LoadShards(attn->parameters(), params, shapes));
      auto step = [&](KVCache& c, const Vec& rows, int64_t n) {
        return attn->Forward(MakeTensor(rows, {B * n, H}, DType::kFloat32),
                             {B, n}, &c);
      };
      KVCache cache, fork;
      ASSIGN_OR_RETURN(Tensor y, step(cache, positions(x, 0, 3), 3));
      RETURN_IF_ERROR(CheckClose(y, positions(y_ref, 0, 3), 1e-5, "prompt"));
      const Tensor first_keys = cache.keys();
      const Vec first_values = first_keys.ToDoubles();
      if (cache.capacity() != 16) {
        return absl::InternalError(
            absl::StrCat("capacity ", cache.capacity(), " after 3"));
      }
      for (int64_t p = 3; p < S; ++p) {
        if (p == 20) fork = cache;
        ASSIGN_OR_RETURN(y, step(cache, positions(x, p, 1), 1));
        RETURN_IF_ERROR(CheckClose(y, positions(y_ref, p, 1), 1e-5,
                                   absl::StrCat("position ", p)));
        if (p == 20) {
          // The fork takes other inputs at the same position.
          RETURN_IF_ERROR(step(fork, other, 1).status());
          if (fork.length() != 21 ||
              fork.keys().SharesStorageWith(cache.keys())) {
            return absl::InternalError("the fork shares the original's cache");
          }
        }
        const int64_t want_capacity = p + 1 <= 16 ? 16 : p + 1 <= 32 ? 32 : 64;
        if (cache.length() != p + 1 || cache.capacity() != want_capacity) {
          return absl::InternalError(
              absl::StrCat("length ", cache.length(), " capacity ",
                           cache.capacity(), " after position ", p));
        }
      }
      if (first_keys.ToDoubles() != first_values) {
        return absl::InternalError("an append changed an earlier view");
      }
      return absl::OkStatus();
    }));
  }
}

// KVCache semantics that the layers never exercise: two steps from one
// cache state (the second must not write over the first's positions), a
// truncated cache appending over positions a view still holds, and a
// moved-from cache (empty and usable, not an abort).
TEST(KVCacheTest, BranchesTruncationAndMoves) {
  const int64_t b = 2, kv = 2, g = 3, d = 4;
  auto rand5 = [&](int64_t s, int64_t n, uint64_t seed) {
    return MakeTensor(RandomVec(b * s * kv * n * d, seed), {b, s, kv, n, d},
                      DType::kFloat32);
  };
  KVCache cache;
  {
    auto r = attention_core::ForwardCached(rand5(3, g, 1), rand5(3, 1, 2),
                                           rand5(3, 1, 3), cache);
    ASSERT_TRUE(r.ok()) << r.status();
    cache = std::move(r->next_cache);
  }
  ASSERT_EQ(cache.length(), 3);
  ASSERT_EQ(cache.capacity(), 16);
  // Two branches from the same state.
  auto one = attention_core::ForwardCached(rand5(1, g, 4), rand5(1, 1, 5),
                                           rand5(1, 1, 6), cache);
  ASSERT_TRUE(one.ok()) << one.status();
  const std::vector<double> one_keys = one->next_cache.keys().ToDoubles();
  auto two = attention_core::ForwardCached(rand5(1, g, 7), rand5(1, 1, 8),
                                           rand5(1, 1, 9), cache);
  ASSERT_TRUE(two.ok()) << two.status();
  EXPECT_EQ(one->next_cache.keys().ToDoubles(), one_keys)
      << "the second branch overwrote the first's position 3";
  EXPECT_NE(two->next_cache.keys().ToDoubles(), one_keys);
  EXPECT_EQ(cache.length(), 3);
  // Truncation: a view of 4 positions survives appends after Truncate(3).
  KVCache branch = std::move(one->next_cache);
  EXPECT_EQ(one->next_cache.length(), 0);  // moved-from: empty
  EXPECT_FALSE(one->next_cache.keys().defined());
  const Tensor view = branch.keys();
  EXPECT_EQ(branch.Truncate(5).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(branch.Truncate(-1).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(branch.Truncate(3).ok());
  EXPECT_EQ(branch.length(), 3);
  auto after = attention_core::ForwardCached(rand5(1, g, 10), rand5(1, 1, 11),
                                             rand5(1, 1, 12), branch);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(view.ToDoubles(), one_keys) << "an append changed a held view";
  // A moved-from cache is a usable empty cache.
  auto again = attention_core::ForwardCached(rand5(2, g, 13), rand5(2, 1, 14),
                                             rand5(2, 1, 15), one->next_cache);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->next_cache.length(), 2);
  // A cache of another batch is an error, not a crash.
  auto other = attention_core::ForwardCached(
      MakeTensor(RandomVec(1 * kv * g * d, 16), {1, 1, kv, g, d},
                 DType::kFloat32),
      MakeTensor(RandomVec(kv * d, 17), {1, 1, kv, 1, d}, DType::kFloat32),
      MakeTensor(RandomVec(kv * d, 18), {1, 1, kv, 1, d}, DType::kFloat32),
      cache);
  EXPECT_EQ(other.status().code(), absl::StatusCode::kInvalidArgument);
  // Growth is capped by max_positions, but never below what is needed.
  auto capped = attention_core::ForwardCached(
      rand5(14, g, 19), rand5(14, 1, 20), rand5(14, 1, 21), cache, 20);
  ASSERT_TRUE(capped.ok()) << capped.status();
  EXPECT_EQ(capped->next_cache.capacity(), 20);
  EXPECT_EQ(capped->next_cache.length(), 17);
}

TEST(ParallelSelfAttentionFiniteDifference, BackwardMatchesFiniteDifferences) {
  block_ref::Dims d;
  d.batch = 2;
  d.seq = 3;
  d.hidden = 6;
  d.heads = 4;
  d.kv_heads = 2;
  d.head_dim = 2;
  const auto shapes = block_ref::AttentionShapes(d, "");
  const block_ref::Params params = RandomParams(shapes, 41);
  const int64_t T = d.tokens(), H = d.hidden;
  const Vec x = RandomVec(T * H, 42);
  const Vec r = RandomVec(T * H, 43);
  TP_EXPECT_OK(RunGloo(2, [&](Communicator& comm) -> absl::Status {
    ASSIGN_OR_RETURN(auto attn,
                     ParallelSelfAttention::Create(
                         comm, AttnOptions(d, false, DType::kFloat64)));
    RETURN_IF_ERROR(LoadShards(attn->parameters(), params, shapes));
    Tensor xt = MakeTensor(x, {T, H}, DType::kFloat64);
    auto loss = [&]() -> absl::StatusOr<double> {
      ASSIGN_OR_RETURN(Tensor y, attn->Forward(xt, {d.batch, d.seq}));
      const Vec yv = y.ToDoubles();
      double l = 0;
      for (size_t i = 0; i < yv.size(); ++i) l += yv[i] * r[i];
      return l;
    };
    RETURN_IF_ERROR(loss().status());
    ASSIGN_OR_RETURN(Tensor dx,
                     attn->Backward(MakeTensor(r, {T, H}, DType::kFloat64)));
    RETURN_IF_ERROR(
        block_testing::CheckInputGradient(xt, dx.ToDoubles(), loss, "dx"));
    return block_testing::CheckParameterGradients(comm, attn->parameters(),
                                                  attn->grads(), loss);
  }));
}

TEST(ParallelSelfAttentionErrors, IndivisibleHeadsAndBadShapes) {
  TP_EXPECT_OK(RunGloo(4, [&](Communicator& comm) -> absl::Status {
    ParallelSelfAttention::Options o =
        AttnOptions(AttnDims(12, 6), false, DType::kFloat32);
    o.name = "layers.1.attention";
    RETURN_IF_ERROR(ExpectError(ParallelSelfAttention::Create(comm, o).status(),
                                absl::StatusCode::kInvalidArgument,
                                {"layers.1.attention", "num_kv_heads 6",
                                 "num_heads 12", "tensor-parallel size 4"},
                                "kv heads % tp"));
    o.num_heads = 10;
    o.num_kv_heads = 4;
    RETURN_IF_ERROR(ExpectError(ParallelSelfAttention::Create(comm, o).status(),
                                absl::StatusCode::kInvalidArgument,
                                {"num_heads 10", "num_kv_heads 4"},
                                "heads % kv heads"));
    o.num_heads = 12;
    o.num_kv_heads = 0;  // = 12
    o.head_dim = 0;
    o.hidden = 50;
    RETURN_IF_ERROR(ExpectError(ParallelSelfAttention::Create(comm, o).status(),
                                absl::StatusCode::kInvalidArgument,
                                {"hidden 50", "num_heads 12"},
                                "hidden % heads"));
    o.hidden = 48;
    o.num_heads = -1;
    RETURN_IF_ERROR(ExpectError(ParallelSelfAttention::Create(comm, o).status(),
                                absl::StatusCode::kInvalidArgument,
                                {"num_heads (-1)"}, "negative heads"));
    o.num_heads = 12;
    ASSIGN_OR_RETURN(auto attn, ParallelSelfAttention::Create(comm, o));
    if (attn->head_dim() != 4) return absl::InternalError("head_dim default");
    const Tensor x = Tensor::Zeros({12, 48}, DType::kFloat32);
    RETURN_IF_ERROR(ExpectError(
        attn->Forward(x, {5, 2}).status(), absl::StatusCode::kInvalidArgument,
        {"layers.1.attention", "batch 5", "seq 2", "12 rows"}, "layout"));
    RETURN_IF_ERROR(ExpectError(
        attn->Forward(Tensor::Zeros({2, 6, 48}, DType::kFloat32), {2, 6})
            .status(),
        absl::StatusCode::kInvalidArgument, {"[2, 6, 48]"}, "rank 3"));
    RETURN_IF_ERROR(ExpectError(
        attn->Forward(Tensor::Zeros({12, 48}, DType::kFloat64), {2, 6})
            .status(),
        absl::StatusCode::kInvalidArgument, {"float64"}, "dtype"));
    RETURN_IF_ERROR(ExpectError(attn->Backward(x).status(),
                                absl::StatusCode::kFailedPrecondition,
                                {"layers.1.attention"}, "no forward"));
    RETURN_IF_ERROR(attn->Forward(x, {2, 6}).status());
    RETURN_IF_ERROR(ExpectError(
        attn->Backward(Tensor::Zeros({6, 48}, DType::kFloat32)).status(),
        absl::StatusCode::kInvalidArgument, {"[6, 48]"}, "grad shape"));
    return absl::OkStatus();
  }));
}

}  // namespace
}  // namespace tp
