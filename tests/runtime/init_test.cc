// Tests of runtime/init.h: Philox known answers, the slice-of-init property
// (any shard equals that slice of the full tensor, bit for bit), the moments
// of every distribution against their closed forms, seeding, and errors.
#include "runtime/init.h"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "runtime/ops.h"

namespace tp {
namespace {

using ::testing::HasSubstr;

// Raw bytes of a tensor (contiguous copy), for bit-identity checks.
std::string Bytes(const Tensor& t) {
  Tensor c = t.Contiguous();
  return std::string(static_cast<const char*>(c.raw_data()), c.nbytes());
}

std::vector<InitSpec> AllKinds(uint64_t seed) {
  return {InitSpec::Constant(0.25),
          InitSpec::Normal(0.5, 2.0, seed),
          InitSpec::Uniform(-3.0, 1.0, seed),
          InitSpec::XavierUniform(1.0, seed),
          InitSpec::XavierNormal(2.0, seed),
          InitSpec::KaimingUniform(seed),
          InitSpec::KaimingNormal(seed, 1.0, FanMode::kFanOut)};
}

TEST(PhiloxTest, MatchesRandom123KnownAnswers) {
  EXPECT_EQ(Philox4x32({0, 0, 0, 0}, {0, 0}),
            (std::array<uint32_t, 4>{0x6627e8d5, 0xe169c58d, 0xbc57ac4c,
                                     0x9b00dbd8}));
  EXPECT_EQ(Philox4x32({0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
                       {0xffffffff, 0xffffffff}),
            (std::array<uint32_t, 4>{0x408f276d, 0x41c83b0e, 0xa20bc7c6,
                                     0x6d5451fd}));
  EXPECT_EQ(Philox4x32({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
                       {0xa4093822, 0x299f31d0}),
            (std::array<uint32_t, 4>{0xd16cfe09, 0x94fdcceb, 0x5001e420,
                                     0x24126ea1}));
}

TEST(InitShardTest, EverySliceEqualsThatSliceOfTheFullTensor) {
  const std::vector<Shape> shapes = {{6, 10}, {4, 5, 6}, {3, 1, 2, 7}};
  for (DType dt : {DType::kFloat32, DType::kFloat64, DType::kFloat16,
                   DType::kBFloat16}) {
    for (const InitSpec& spec : AllKinds(1234)) {
      for (const Shape& shape : shapes) {
        auto full = InitTensor(spec, shape, dt);
        ASSERT_TRUE(full.ok()) << full.status();
        ASSERT_EQ(full->shape(), shape);
        ASSERT_EQ(full->dtype(), dt);
        const int nd = static_cast<int>(shape.size());
        for (int dim = -1; dim < nd; ++dim) {
          const int d = dim < 0 ? dim + nd : dim;
          const int64_t size = shape[d];
          for (auto [start, length] :
               std::vector<std::pair<int64_t, int64_t>>{{0, size},
                                                        {0, 1},
                                                        {size / 2, size - size / 2},
                                                        {size - 1, 1},
                                                        {1, size > 2 ? size - 2 : 0},
                                                        {size, 0}}) {
            SCOPED_TRACE(absl::StrCat(DTypeName(dt), " kind ",
                                      static_cast<int>(spec.kind), " shape ",
                                      ShapeToString(shape), " dim ", dim, " [",
                                      start, ", +", length, ")"));
            auto shard = InitShard(spec, shape, dim, start, length, dt);
            ASSERT_TRUE(shard.ok()) << shard.status();
            Tensor want = *full->Narrow(d, start, length);
            ASSERT_EQ(shard->shape(), want.shape());
            EXPECT_TRUE(shard->is_contiguous());
            EXPECT_EQ(Bytes(*shard), Bytes(want));
          }
        }
      }
    }
  }
}

TEST(InitShardTest, TensorParallelShardsConcatenateToTheFullWeight) {
  const Shape shape = {12, 8};
  const InitSpec spec = InitSpec::XavierUniform(1.0, SeedFor(7, "mlp.up"));
  Tensor full = *InitTensor(spec, shape, DType::kFloat32);
  for (int tp_size : {1, 2, 3, 4}) {
    for (int dim : {0, 1}) {
      if (shape[dim] % tp_size != 0) continue;
      const int64_t part = shape[dim] / tp_size;
      std::vector<Tensor> shards;
      for (int r = 0; r < tp_size; ++r) {
        shards.push_back(
            *InitShard(spec, shape, dim, r * part, part, DType::kFloat32));
      }
      EXPECT_EQ(Bytes(*ops::Concat(shards, dim)), Bytes(full))
          << "tp " << tp_size << " dim " << dim;
    }
  }
}

TEST(InitTensorTest, SixteenBitInitIsTheRoundedFloat32Init) {
  const Shape shape = {33, 17};
  for (const InitSpec& spec : AllKinds(99)) {
    Tensor f32 = *InitTensor(spec, shape, DType::kFloat32);
    Tensor f64 = *InitTensor(spec, shape, DType::kFloat64);
    for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
      EXPECT_EQ(Bytes(*InitTensor(spec, shape, dt)), Bytes(*ops::Cast(f32, dt)));
    }
    // float32 is the float64 value rounded once.
    EXPECT_EQ(Bytes(f32), Bytes(*ops::Cast(f64, DType::kFloat32)));
  }
}

TEST(InitTensorTest, SameSeedSameValuesDifferentSeedsDiffer) {
  const Shape shape = {64, 32};
  for (const InitSpec& spec : AllKinds(5)) {
    if (spec.kind == InitKind::kConstant) continue;
    InitSpec other = spec;
    other.seed = 6;
    const std::vector<double> a = InitTensor(spec, shape, DType::kFloat32)->ToDoubles();
    const std::vector<double> b = InitTensor(spec, shape, DType::kFloat32)->ToDoubles();
    const std::vector<double> c = InitTensor(other, shape, DType::kFloat32)->ToDoubles();
    EXPECT_EQ(a, b);
    int same = 0;
    for (size_t i = 0; i < a.size(); ++i) same += a[i] == c[i];
    EXPECT_LT(same, 5) << "kind " << static_cast<int>(spec.kind);
  }
}

TEST(InitTensorTest, SeedForIsStableAndSeparatesNames) {
  EXPECT_EQ(SeedFor(1, "layer.0.weight"), SeedFor(1, "layer.0.weight"));
  EXPECT_NE(SeedFor(1, "layer.0.weight"), SeedFor(1, "layer.1.weight"));
  EXPECT_NE(SeedFor(1, "layer.0.weight"), SeedFor(2, "layer.0.weight"));
  EXPECT_NE(SeedFor(0, ""), SeedFor(1, ""));
}

TEST(InitTensorTest, ConstantAndScalar) {
  EXPECT_EQ(InitTensor(InitSpec::Constant(0.25), {2, 2}, DType::kBFloat16)
                ->ToDoubles(),
            std::vector<double>(4, 0.25));
  auto s = InitTensor(InitSpec::Normal(0, 1, 3), {}, DType::kFloat64);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->ndim(), 0);
  EXPECT_EQ(s->numel(), 1);
  // The scalar is element 0 of the stream.
  EXPECT_EQ(s->ToDoubles()[0],
            InitTensor(InitSpec::Normal(0, 1, 3), {5}, DType::kFloat64)
                ->ToDoubles()[0]);
}

// ---- distribution moments ---------------------------------------------------

struct Moments {
  double mean = 0, std = 0, min = INFINITY, max = -INFINITY, lag1 = 0;
};

Moments Measure(const std::vector<double>& v) {
  Moments m;
  const double n = static_cast<double>(v.size());
  for (double x : v) {
    m.mean += x;
    m.min = std::min(m.min, x);
    m.max = std::max(m.max, x);
  }
  m.mean /= n;
  double var = 0, cov = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    var += (v[i] - m.mean) * (v[i] - m.mean);
    if (i > 0) cov += (v[i] - m.mean) * (v[i - 1] - m.mean);
  }
  m.std = std::sqrt(var / n);
  m.lag1 = cov / var;
  return m;
}

// Sample mean and std within 6 standard errors of the closed form; adjacent
// elements uncorrelated.
void ExpectMoments(const Moments& m, double mean, double std, size_t n) {
  EXPECT_NEAR(m.mean, mean, 6 * std / std::sqrt(n));
  EXPECT_NEAR(m.std, std, 6 * std / std::sqrt(2.0 * n));
  EXPECT_LT(std::fabs(m.lag1), 6 / std::sqrt(n));
}

TEST(InitMomentsTest, NormalAndUniform) {
  const size_t n = 100000;
  const Moments nm = Measure(
      InitTensor(InitSpec::Normal(1.5, 2.0, 11), {100, 1000}, DType::kFloat64)
          ->ToDoubles());
  ExpectMoments(nm, 1.5, 2.0, n);
  // Fraction within one sigma: 0.6827 for a normal.
  const std::vector<double> z =
      InitTensor(InitSpec::Normal(0, 1, 12), {n}, DType::kFloat64)->ToDoubles();
  size_t within = 0;
  for (double x : z) within += std::fabs(x) < 1;
  EXPECT_NEAR(within / static_cast<double>(n), 0.682689, 0.01);

  const std::vector<double> u =
      InitTensor(InitSpec::Uniform(-1, 3, 13), {n}, DType::kFloat64)->ToDoubles();
  const Moments um = Measure(u);
  ExpectMoments(um, 1.0, 4 / std::sqrt(12.0), n);
  EXPECT_GE(um.min, -1.0);
  EXPECT_LT(um.max, 3.0);
  // Ten equal bins each hold n/10 within 6 binomial standard deviations.
  std::vector<int> bins(10, 0);
  for (double x : u) ++bins[std::min(9, static_cast<int>((x + 1) / 0.4))];
  for (int b : bins) EXPECT_NEAR(b, n / 10.0, 6 * std::sqrt(n * 0.09));
}

TEST(InitMomentsTest, XavierAndKaimingUseTheFullShapesFans) {
  const Shape shape = {300, 400};  // fan_out = 300, fan_in = 400
  const size_t n = 120000;
  const auto sample = [&](const InitSpec& spec, const Shape& s) {
    return Measure(InitTensor(spec, s, DType::kFloat64)->ToDoubles());
  };
  const double xb = std::sqrt(6.0 / 700);
  const Moments xu = sample(InitSpec::XavierUniform(1.0, 21), shape);
  ExpectMoments(xu, 0, xb / std::sqrt(3.0), n);
  EXPECT_LE(std::max(-xu.min, xu.max), xb);
  EXPECT_GT(std::max(-xu.min, xu.max), 0.999 * xb);
  ExpectMoments(sample(InitSpec::XavierNormal(2.0, 22), shape), 0,
                2.0 * std::sqrt(2.0 / 700), n);
  const double kb = std::sqrt(2.0) * std::sqrt(3.0 / 400);
  const Moments ku = sample(InitSpec::KaimingUniform(23), shape);
  ExpectMoments(ku, 0, kb / std::sqrt(3.0), n);
  EXPECT_LE(std::max(-ku.min, ku.max), kb);
  ExpectMoments(sample(InitSpec::KaimingNormal(24), shape), 0,
                std::sqrt(2.0 / 400), n);
  ExpectMoments(sample(InitSpec::KaimingNormal(25, 1.0, FanMode::kFanOut), shape),
                0, std::sqrt(1.0 / 300), n);
  // Receptive field: [out, in, 3, 3] has fan_in = in * 9.
  ExpectMoments(sample(InitSpec::KaimingNormal(26), {128, 100, 3, 3}), 0,
                std::sqrt(2.0 / 900), 128 * 900);
  // A shard has the full weight's scale, not its own shape's.
  const Moments shard = Measure(
      InitShard(InitSpec::KaimingNormal(27), shape, 1, 0, 100, DType::kFloat64)
          ->ToDoubles());
  ExpectMoments(shard, 0, std::sqrt(2.0 / 400), 30000);
}

// ---- errors ----------------------------------------------------------------------

void ExpectInvalid(const absl::StatusOr<Tensor>& s,
                   const std::vector<std::string>& parts) {
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << s.status();
  for (const std::string& p : parts) {
    EXPECT_THAT(std::string(s.status().message()), HasSubstr(p));
  }
}

TEST(InitErrorTest, BadSlices) {
  const InitSpec spec = InitSpec::Normal(0, 1, 1);
  const Shape shape = {4, 6};
  const DType f = DType::kFloat32;
  ExpectInvalid(InitShard(spec, shape, 1, 4, 3, f), {"start 4, length 3", "dim 1", "[4, 6]"});
  ExpectInvalid(InitShard(spec, shape, 0, -1, 2, f), {"start -1", "dim 0"});
  ExpectInvalid(InitShard(spec, shape, 0, 1, -1, f), {"length -1"});
  ExpectInvalid(InitShard(spec, shape, 2, 0, 1, f), {"dim 2", "[4, 6]"});
  ExpectInvalid(InitShard(spec, shape, -3, 0, 1, f), {"dim -3"});
  ExpectInvalid(InitShard(spec, shape, 0, INT64_MAX, 2, f), {"out of range"});
}

TEST(InitErrorTest, BadSpecsShapesAndDTypes) {
  const DType f = DType::kFloat32;
  ExpectInvalid(InitTensor(InitSpec::Normal(0, -1, 1), {3}, f), {"normal", "std"});
  ExpectInvalid(InitTensor(InitSpec::Normal(NAN, 1, 1), {3}, f), {"normal"});
  ExpectInvalid(InitTensor(InitSpec::Uniform(2, 1, 1), {3}, f), {"uniform", "[2, 1)"});
  ExpectInvalid(InitTensor(InitSpec::XavierUniform(1, 1), {3}, f),
                {"xavier_uniform", "rank >= 2", "[3]"});
  ExpectInvalid(InitTensor(InitSpec::KaimingNormal(1, 0.0), {3, 3}, f),
                {"kaiming_normal", "gain"});
  ExpectInvalid(InitTensor(InitSpec::Constant(INFINITY), {3}, f), {"constant"});
  ExpectInvalid(InitTensor(InitSpec::Normal(0, 1, 1), {3, -2}, f),
                {"negative", "[3, -2]"});
  ExpectInvalid(InitTensor(InitSpec::Normal(0, 1, 1), {3}, DType::kInt32),
                {"floating", "int32"});
}

}  // namespace
}  // namespace tp
