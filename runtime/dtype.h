// Element types of tensors, their sizes and names, and exact conversions
// between the 16-bit floating formats and float32.
//
// Example:
//   ASSIGN_OR_RETURN(tp::DType dt, tp::ParseDType("bf16"));
//   size_t bytes = n * tp::DTypeSize(dt);
//   uint16_t h = tp::FloatToHalfBits(1.5f);   // 0x3e00
#ifndef TENSOR_PARALLEL_RUNTIME_DTYPE_H_
#define TENSOR_PARALLEL_RUNTIME_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include "absl/strings/string_view.h"

#include "absl/status/statusor.h"

namespace tp {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16, kInt32, kInt64 };

// All dtypes, in declaration order (for tests and parameterization).
inline constexpr DType kAllDTypes[] = {DType::kFloat32, DType::kFloat64,
                                       DType::kFloat16, DType::kBFloat16,
                                       DType::kInt32,   DType::kInt64};

// Size of one element in bytes.
size_t DTypeSize(DType dtype);

// Canonical lower-case name: "float32", "float64", "float16", "bfloat16",
// "int32", "int64".
absl::string_view DTypeName(DType dtype);

// Parses a canonical name or a common alias ("f32", "fp32", "float", "f64",
// "double", "fp16", "half", "bf16", "i32", "int", "i64", "long"), case
// sensitive. Unknown names give kInvalidArgument listing the canonical names.
absl::StatusOr<DType> ParseDType(absl::string_view name);

bool IsFloatingPoint(DType dtype);  // true for the four float types

// IEEE 754 binary16 stored as its bit pattern.
struct Half {
  uint16_t bits = 0;
};
// bfloat16 (the top half of a float32) stored as its bit pattern.
struct BFloat16 {
  uint16_t bits = 0;
};

// float32 -> binary16 with round-to-nearest-even; overflow gives +-Inf,
// values below half the smallest subnormal give +-0, NaN stays NaN (quiet,
// sign and top payload bits kept).
uint16_t FloatToHalfBits(float value);
// binary16 -> float32, exact (subnormals, Inf and NaN included).
float HalfBitsToFloat(uint16_t bits);
// float32 -> bfloat16 with round-to-nearest-even; NaN stays NaN (quiet).
uint16_t FloatToBFloat16Bits(float value);
// bfloat16 -> float32, exact.
float BFloat16BitsToFloat(uint16_t bits);

// `x` rounded to float with round-to-odd: exact values stay, inexact ones are
// truncated toward zero and get their lowest mantissa bit set. Rounding that
// float once more to fp16/bf16 (far fewer mantissa bits) gives the correctly
// rounded result of `x`, with no double rounding.
float RoundToOddFloat(long double x);

inline Half ToHalf(float v) { return Half{FloatToHalfBits(v)}; }
inline float ToFloat(Half h) { return HalfBitsToFloat(h.bits); }
inline BFloat16 ToBFloat16(float v) { return BFloat16{FloatToBFloat16Bits(v)}; }
inline float ToFloat(BFloat16 b) { return BFloat16BitsToFloat(b.bits); }

// Maps a C++ element type to its DType: DTypeOf<float>::value == kFloat32.
template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::kFloat32;
};
template <>
struct DTypeOf<double> {
  static constexpr DType value = DType::kFloat64;
};
template <>
struct DTypeOf<Half> {
  static constexpr DType value = DType::kFloat16;
};
template <>
struct DTypeOf<BFloat16> {
  static constexpr DType value = DType::kBFloat16;
};
template <>
struct DTypeOf<int32_t> {
  static constexpr DType value = DType::kInt32;
};
template <>
struct DTypeOf<int64_t> {
  static constexpr DType value = DType::kInt64;
};

// Calls fn(T{}) with T the C++ type of `dtype` (float, double, Half, BFloat16,
// int32_t, int64_t) and returns its result.
template <typename Fn>
decltype(auto) DispatchDType(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      return fn(float{});
    case DType::kFloat64:
      return fn(double{});
    case DType::kFloat16:
      return fn(Half{});
    case DType::kBFloat16:
      return fn(BFloat16{});
    case DType::kInt32:
      return fn(int32_t{});
    case DType::kInt64:
      break;
  }
  return fn(int64_t{});
}

// Element conversion to and from double, for every element type.
template <typename T>
inline double ElementToDouble(T v) {
  return static_cast<double>(v);
}
template <>
inline double ElementToDouble(Half v) {
  return ToFloat(v);
}
template <>
inline double ElementToDouble(BFloat16 v) {
  return ToFloat(v);
}
template <typename T>
inline T ElementFromDouble(double v) {
  return static_cast<T>(v);
}
template <>
inline Half ElementFromDouble(double v) {
  return ToHalf(RoundToOddFloat(v));
}
template <>
inline BFloat16 ElementFromDouble(double v) {
  return ToBFloat16(RoundToOddFloat(v));
}

}  // namespace tp

#endif  // TENSOR_PARALLEL_RUNTIME_DTYPE_H_
