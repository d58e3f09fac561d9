// Deterministic parameter initialisation that can be generated slice by slice.
//
// Every element of a weight is a pure function of (seed, its flat row-major
// index in the FULL weight): a counter-based generator (Philox4x32-10, keyed
// by the seed, counter = element index) produces its random bits, which are
// then mapped to the requested distribution. So a rank that owns rows
// [start, start + length) of a [out, in] weight generates exactly those rows
// with InitShard(), never materialising the full matrix, and the result is
// bit-identical to Narrow(0, start, length) of InitTensor(). This is what
// makes a model at tensor-parallel degree N equal the same model at N = 1.
//
// Values are computed in double, rounded once to float32, and for
// float16/bfloat16 rounded from that float32 (so a 16-bit init equals
// ops::Cast of the float32 init). Results are reproducible across runs and
// processes of one build; across machines they match as long as the C
// library's log/cos/sqrt agree to the last double bit, which holds for glibc
// on one architecture (and the final rounding to float32 hides almost every
// difference).
//
// Example:
//   tp::InitSpec spec = tp::InitSpec::XavierUniform(/*gain=*/1.0,
//                                                   tp::SeedFor(42, "mlp.up"));
//   // This rank's 1/tp slice of a [4 * h, h] column-parallel weight:
//   ASSIGN_OR_RETURN(tp::Tensor w,
//                    tp::InitShard(spec, {4 * h, h}, /*dim=*/0,
//                                  rank * 4 * h / tp, 4 * h / tp,
//                                  tp::DType::kFloat32));
#ifndef TENSOR_PARALLEL_RUNTIME_INIT_H_
#define TENSOR_PARALLEL_RUNTIME_INIT_H_

#include <array>
#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "runtime/dtype.h"
#include "runtime/tensor.h"

namespace tp {

enum class InitKind {
  kConstant,        // every element = value
  kNormal,          // N(mean, std^2)
  kUniform,         // U[low, high)
  kXavierUniform,   // U[-b, b], b = gain * sqrt(6 / (fan_in + fan_out))
  kXavierNormal,    // N(0, s^2), s = gain * sqrt(2 / (fan_in + fan_out))
  kKaimingUniform,  // U[-b, b], b = gain * sqrt(3 / fan)
  kKaimingNormal,   // N(0, s^2), s = gain / sqrt(fan)
};

// Which fan Kaiming initialisation divides by.
enum class FanMode { kFanIn, kFanOut };

// What to generate. Fans are those of PyTorch: for a full shape
// [out, in, k...] (rank >= 2), fan_in = in * prod(k), fan_out = out * prod(k);
// they always come from the FULL shape, never from a shard's.
struct InitSpec {
  InitKind kind = InitKind::kNormal;
  double value = 0.0;  // kConstant: the value.
  double mean = 0.0;   // kNormal: mean.
  double std = 1.0;    // kNormal: standard deviation, >= 0.
  double low = -1.0;   // kUniform: lower bound (inclusive).
  double high = 1.0;   // kUniform: upper bound (exclusive before rounding
                       // to the dtype, which may round up to `high`).
  // Xavier and Kaiming: scale factor (PyTorch's calculate_gain), > 0.
  // 1 for linear/sigmoid, sqrt(2) for ReLU (the Kaiming factories' default).
  double gain = 1.0;
  FanMode fan_mode = FanMode::kFanIn;  // Kaiming only.
  // Generator key. Different seeds give independent streams; derive one seed
  // per parameter (SeedFor) so that two weights of one shape differ.
  uint64_t seed = 0;

  static InitSpec Constant(double value);
  static InitSpec Normal(double mean, double std, uint64_t seed);
  static InitSpec Uniform(double low, double high, uint64_t seed);
  static InitSpec XavierUniform(double gain, uint64_t seed);
  static InitSpec XavierNormal(double gain, uint64_t seed);
  static InitSpec KaimingUniform(uint64_t seed, double gain = 1.4142135623730951,
                                 FanMode mode = FanMode::kFanIn);
  static InitSpec KaimingNormal(uint64_t seed, double gain = 1.4142135623730951,
                                FanMode mode = FanMode::kFanIn);
};

// The whole tensor of `full_shape` (a floating `dtype`), contiguous.
// kInvalidArgument: a negative dimension, a non-floating dtype, invalid
// parameters (std < 0, low > high, gain <= 0, anything non-finite), or rank
// < 2 for Xavier/Kaiming (fans undefined).
absl::StatusOr<Tensor> InitTensor(const InitSpec& spec, const Shape& full_shape,
                                  DType dtype);

// Only the slice [start, start + length) of dimension `dim` (negative counts
// from the end) of the tensor InitTensor(spec, full_shape, dtype) would
// return, as a new contiguous tensor; bit-identical to that Narrow(), in
// time proportional to the slice. kInvalidArgument: everything InitTensor
// rejects, plus dim out of range, start < 0, length < 0 or
// start + length > full_shape[dim] (the message names the values).
absl::StatusOr<Tensor> InitShard(const InitSpec& spec, const Shape& full_shape,
                                 int dim, int64_t start, int64_t length,
                                 DType dtype);

// A seed for one named parameter, derived from a base seed: a stable hash of
// the name mixed with the base (FNV-1a + splitmix64), identical on every
// machine and run (unlike absl::Hash, which is randomised per process).
uint64_t SeedFor(uint64_t base_seed, absl::string_view name);

// Philox4x32-10 (Salmon et al., SC'11), the counter-based generator above:
// four 32-bit random words for a 128-bit counter and a 64-bit key. Exposed
// for tests (known-answer vectors) and for callers that need raw bits.
std::array<uint32_t, 4> Philox4x32(std::array<uint32_t, 4> counter,
                                   std::array<uint32_t, 2> key);

}  // namespace tp

#endif  // TENSOR_PARALLEL_RUNTIME_INIT_H_
