// Tests of runtime/dtype.h: exhaustive fp16/bf16 decoding and round trips
// over all 65,536 bit patterns, float32 -> fp16/bf16 rounding against an
// independent nearest-even reference (a sorted table of every representable
// value, built with ldexp), and the dtype names/sizes/parsing.
#include "runtime/dtype.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tp {
namespace {

using ::testing::HasSubstr;

// A 16-bit float format described by its field widths.
struct Format {
  const char* name;
  int exp_bits;
  int man_bits;
  uint16_t (*encode)(float);
  float (*decode)(uint16_t);
};

const Format kHalf = {"float16", 5, 10, FloatToHalfBits, HalfBitsToFloat};
const Format kBF16 = {"bfloat16", 8, 7, FloatToBFloat16Bits, BFloat16BitsToFloat};

void PrintTo(const Format& f, std::ostream* os) { *os << f.name; }

int Bias(const Format& f) { return (1 << (f.exp_bits - 1)) - 1; }
uint16_t ExpMask(const Format& f) {
  return static_cast<uint16_t>(((1 << f.exp_bits) - 1) << f.man_bits);
}
uint16_t InfBits(const Format& f) { return ExpMask(f); }
bool IsNaNBits(const Format& f, uint16_t b) {
  return (b & ExpMask(f)) == ExpMask(f) && (b & ((1 << f.man_bits) - 1)) != 0;
}

// Value of a bit pattern from the IEEE definition (independent of the code
// under test): (-1)^s * m * 2^(1 - bias - man_bits) for subnormals, else
// (-1)^s * (2^man_bits + m) * 2^(e - bias - man_bits).
double RefDecode(const Format& f, uint16_t b) {
  const int s = b >> 15;
  const int e = (b >> f.man_bits) & ((1 << f.exp_bits) - 1);
  const int m = b & ((1 << f.man_bits) - 1);
  double v;
  if (e == (1 << f.exp_bits) - 1) {
    v = m == 0 ? INFINITY : NAN;
  } else if (e == 0) {
    v = std::ldexp(m, 1 - Bias(f) - f.man_bits);
  } else {
    v = std::ldexp((1 << f.man_bits) + m, e - Bias(f) - f.man_bits);
  }
  return s ? -v : v;
}

// Every non-negative finite value in bit order (index == bit pattern), plus
// one pseudo-value at the position of +Inf: the next value of the exponent
// range, 2^(bias + 1). Rounding to nearest even against this table is IEEE
// rounding with overflow to Inf (whose bit pattern is even).
std::vector<double> Table(const Format& f) {
  std::vector<double> t;
  for (uint32_t b = 0; b < InfBits(f); ++b) t.push_back(RefDecode(f, b));
  t.push_back(std::ldexp(1.0, Bias(f) + 1));
  return t;
}

uint16_t RefEncode(const Format& f, const std::vector<double>& table, float x) {
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const double a = std::fabs(static_cast<double>(x));
  if (a >= table.back()) return sign | InfBits(f);
  const size_t hi = std::lower_bound(table.begin(), table.end(), a) - table.begin();
  if (table[hi] == a) return sign | static_cast<uint16_t>(hi);
  const size_t lo = hi - 1;
  const double dlo = a - table[lo], dhi = table[hi] - a;
  size_t pick;
  if (dlo < dhi) {
    pick = lo;
  } else if (dhi < dlo) {
    pick = hi;
  } else {
    pick = (lo % 2 == 0) ? lo : hi;  // tie: even bit pattern
  }
  return sign | static_cast<uint16_t>(pick);
}

float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

class SixteenBitTest : public ::testing::TestWithParam<Format> {};

TEST_P(SixteenBitTest, DecodesAllBitPatternsExactly) {
  const Format& f = GetParam();
  for (uint32_t b = 0; b < 65536; ++b) {
    const double want = RefDecode(f, b);
    const float got = f.decode(static_cast<uint16_t>(b));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << std::hex << b;
      EXPECT_EQ(std::signbit(got), (b >> 15) != 0) << std::hex << b;
    } else {
      ASSERT_EQ(static_cast<double>(got), want) << std::hex << b;
      EXPECT_EQ(std::signbit(got), (b >> 15) != 0) << std::hex << b;  // -0
    }
  }
}

TEST_P(SixteenBitTest, BitsFloatBitsRoundTripsAndNaNStaysNaN) {
  const Format& f = GetParam();
  const uint16_t quiet = static_cast<uint16_t>(1 << (f.man_bits - 1));
  for (uint32_t b = 0; b < 65536; ++b) {
    const uint16_t bits = static_cast<uint16_t>(b);
    const uint16_t back = f.encode(f.decode(bits));
    if (IsNaNBits(f, bits)) {
      // NaN stays NaN, sign and payload kept, quiet bit set.
      EXPECT_TRUE(IsNaNBits(f, back)) << std::hex << b;
      EXPECT_EQ(back, bits | quiet) << std::hex << b;
    } else {
      EXPECT_EQ(back, bits) << std::hex << b;
    }
  }
}

TEST_P(SixteenBitTest, RoundsToNearestEvenOnValuesMidpointsAndNeighbours) {
  const Format& f = GetParam();
  const std::vector<double> table = Table(f);
  std::vector<float> probes;
  for (size_t i = 0; i + 1 < table.size(); ++i) {
    const float v = static_cast<float>(table[i]);
    const float mid = static_cast<float>((table[i] + table[i + 1]) / 2);
    ASSERT_EQ(static_cast<double>(mid), (table[i] + table[i + 1]) / 2);  // exact
    for (float p : {v, mid}) {
      probes.push_back(p);
      probes.push_back(std::nextafter(p, INFINITY));
      probes.push_back(std::nextafter(p, -INFINITY));
    }
  }
  probes.push_back(std::numeric_limits<float>::max());
  probes.push_back(std::numeric_limits<float>::infinity());
  probes.push_back(std::numeric_limits<float>::denorm_min());
  probes.push_back(std::numeric_limits<float>::min());
  int bad = 0;
  for (float p : probes) {
    for (float x : {p, -p}) {
      const uint16_t want = RefEncode(f, table, x);
      const uint16_t got = f.encode(x);
      if (got != want && ++bad < 10) {
        ADD_FAILURE() << f.name << "(" << x << ") = 0x" << std::hex << got
                      << ", want 0x" << want;
      }
    }
  }
  EXPECT_EQ(bad, 0) << "of " << 2 * probes.size() << " probes";
}

TEST_P(SixteenBitTest, RoundsAStrideOfAllFloat32BitPatterns) {
  const Format& f = GetParam();
  const std::vector<double> table = Table(f);
  int bad = 0;
  // A prime stride visits ~1M patterns spread over every exponent.
  for (uint64_t u = 0; u < (uint64_t{1} << 32); u += 4099) {
    const float x = BitsToFloat(static_cast<uint32_t>(u));
    if (std::isnan(x)) {
      EXPECT_TRUE(IsNaNBits(f, f.encode(x)));
      continue;
    }
    const uint16_t want = RefEncode(f, table, x);
    const uint16_t got = f.encode(x);
    if (got != want && ++bad < 10) {
      ADD_FAILURE() << f.name << "(" << x << ") = 0x" << std::hex << got
                    << ", want 0x" << want;
    }
  }
  EXPECT_EQ(bad, 0);
}

INSTANTIATE_TEST_SUITE_P(Formats, SixteenBitTest, ::testing::Values(kHalf, kBF16),
                         [](const ::testing::TestParamInfo<Format>& info) {
                           return std::string(info.param.name);
                         });

TEST(HalfTest, OverflowSubnormalsAndSpecialValues) {
  EXPECT_EQ(FloatToHalfBits(65504.0f), 0x7bff);      // max finite
  EXPECT_EQ(FloatToHalfBits(65519.99f), 0x7bff);     // below the midpoint
  EXPECT_EQ(FloatToHalfBits(65520.0f), 0x7c00);      // midpoint ties to Inf
  EXPECT_EQ(FloatToHalfBits(1e10f), 0x7c00);
  EXPECT_EQ(FloatToHalfBits(-1e10f), 0xfc00);
  EXPECT_EQ(FloatToHalfBits(INFINITY), 0x7c00);
  EXPECT_EQ(FloatToHalfBits(std::ldexp(1.0f, -24)), 0x0001);  // min subnormal
  EXPECT_EQ(FloatToHalfBits(std::ldexp(1.0f, -25)), 0x0000);  // tie -> even 0
  EXPECT_EQ(FloatToHalfBits(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 0x0001);
  EXPECT_EQ(FloatToHalfBits(std::ldexp(3.0f, -25)), 0x0002);  // 1.5 -> 2
  EXPECT_EQ(FloatToHalfBits(-std::ldexp(1.0f, -26)), 0x8000);  // -0
  EXPECT_EQ(FloatToHalfBits(std::ldexp(1023.5f, -24)), 0x0400);  // -> min normal
  EXPECT_EQ(FloatToHalfBits(1.5f), 0x3e00);
  EXPECT_EQ(HalfBitsToFloat(0x3555), 0.333251953125f);
  EXPECT_TRUE(std::isnan(HalfBitsToFloat(FloatToHalfBits(std::nanf("")))));
}

TEST(BFloat16Test, OverflowSubnormalsAndSpecialValues) {
  EXPECT_EQ(FloatToBFloat16Bits(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(FloatToBFloat16Bits(1.0f + std::ldexp(1.0f, -8)), 0x3f80);  // tie
  EXPECT_EQ(FloatToBFloat16Bits(1.0f + std::ldexp(3.0f, -8)), 0x3f82);  // tie up
  EXPECT_EQ(FloatToBFloat16Bits(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(FloatToBFloat16Bits(-0.0f), 0x8000);
  const float nan_payload = BitsToFloat(0x7f800001u);  // signalling NaN
  EXPECT_TRUE(IsNaNBits(kBF16, FloatToBFloat16Bits(nan_payload)));
  EXPECT_TRUE(IsNaNBits(kHalf, FloatToHalfBits(nan_payload)));
}

TEST(DTypeTest, NamesSizesAndParsing) {
  const std::vector<std::pair<DType, size_t>> sizes = {
      {DType::kFloat32, 4}, {DType::kFloat64, 8}, {DType::kFloat16, 2},
      {DType::kBFloat16, 2}, {DType::kInt32, 4}, {DType::kInt64, 8}};
  for (auto [dt, size] : sizes) {
    EXPECT_EQ(DTypeSize(dt), size) << DTypeName(dt);
    auto parsed = ParseDType(DTypeName(dt));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, dt);
  }
  EXPECT_EQ(DTypeName(DType::kBFloat16), "bfloat16");
  EXPECT_EQ(DTypeName(DType::kInt64), "int64");
  const std::vector<std::pair<std::string, DType>> aliases = {
      {"f32", DType::kFloat32},  {"fp32", DType::kFloat32},
      {"float", DType::kFloat32}, {"double", DType::kFloat64},
      {"fp64", DType::kFloat64}, {"half", DType::kFloat16},
      {"fp16", DType::kFloat16}, {"bf16", DType::kBFloat16},
      {"int", DType::kInt32},    {"long", DType::kInt64},
      {"i64", DType::kInt64}};
  for (const auto& [name, dt] : aliases) EXPECT_EQ(*ParseDType(name), dt) << name;
  for (const char* bad : {"Float32", "", "float8", "fp32 "}) {
    auto r = ParseDType(bad);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(r.status().message()),
                HasSubstr(absl::StrCat("'", bad, "'")));
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("bfloat16"));
  }
  EXPECT_TRUE(IsFloatingPoint(DType::kBFloat16));
  EXPECT_TRUE(IsFloatingPoint(DType::kFloat64));
  EXPECT_FALSE(IsFloatingPoint(DType::kInt32));
  EXPECT_FALSE(IsFloatingPoint(DType::kInt64));
}

}  // namespace
}  // namespace tp

namespace tp {
namespace {

// A double just above an fp16 midpoint rounds to float ON the midpoint, so
// double -> float -> half would round to even (down); the correct result is
// up. ElementFromDouble (used by Tensor::Full/FromDoubles) must not double-round.
TEST(ElementFromDoubleTest, DoesNotDoubleRoundThroughFloat) {
  const double above_half_midpoint = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);
  EXPECT_EQ(ToFloat(ElementFromDouble<Half>(above_half_midpoint)),
            1.0f + std::ldexp(1.0f, -10));
  const double above_bf16_midpoint = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);
  EXPECT_EQ(ToFloat(ElementFromDouble<BFloat16>(above_bf16_midpoint)),
            1.0f + std::ldexp(1.0f, -7));
  // Exact midpoints still tie to even, and exact values stay.
  EXPECT_EQ(ToFloat(ElementFromDouble<Half>(1.0 + std::ldexp(1.0, -11))), 1.0f);
  EXPECT_EQ(ToFloat(ElementFromDouble<Half>(0.5)), 0.5f);
}

}  // namespace
}  // namespace tp
