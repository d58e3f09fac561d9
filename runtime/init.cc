#include "runtime/init.h"

#include <cmath>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "runtime/status_macros.h"

namespace tp {
namespace {

// Abseil's generators (absl::BitGen, absl::InsecureBitGen) are sequential and
// cannot jump to element i, so the counter-based Philox is written here by
// hand from the published algorithm; its known-answer vectors are in
// tests/runtime/init_test.cc.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

constexpr double kTwoPi = 6.283185307179586;
constexpr double kTwoPow53 = 9007199254740992.0;

// 53 random bits from two words, as an integer in [0, 2^53).
uint64_t Bits53(uint32_t hi, uint32_t lo) {
  return (static_cast<uint64_t>(hi) << 21) ^ (lo >> 11);
}

absl::string_view InitKindName(InitKind kind) {
  switch (kind) {
    case InitKind::kConstant:
      return "constant";
    case InitKind::kNormal:
      return "normal";
    case InitKind::kUniform:
      return "uniform";
    case InitKind::kXavierUniform:
      return "xavier_uniform";
    case InitKind::kXavierNormal:
      return "xavier_normal";
    case InitKind::kKaimingUniform:
      return "kaiming_uniform";
    case InitKind::kKaimingNormal:
      return "kaiming_normal";
  }
  return "unknown";
}

struct Params {
  InitKind kind;
  double a = 0;  // location: value, mean, or low
  double b = 0;  // scale: std, or high - low
};

absl::StatusOr<Params> Resolve(const InitSpec& spec, const Shape& shape) {
  const auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("Init (", InitKindName(spec.kind), "): ", why, " (shape ", ShapeToString(shape), ")"));
  };
  const auto finite = [](double v) { return std::isfinite(v); };
  double fan_in = 0, fan_out = 0;
  const bool fans = spec.kind == InitKind::kXavierUniform ||
                    spec.kind == InitKind::kXavierNormal ||
                    spec.kind == InitKind::kKaimingUniform ||
                    spec.kind == InitKind::kKaimingNormal;
  if (fans) {
    if (shape.size() < 2) {
      return bad("Xavier/Kaiming need a shape of rank >= 2 ([out, in, ...])");
    }
    if (!(spec.gain > 0) || !finite(spec.gain)) {
      return bad(absl::StrCat("gain must be finite and > 0, got ", spec.gain));
    }
    double receptive = 1;
    for (size_t i = 2; i < shape.size(); ++i) receptive *= shape[i];
    fan_in = static_cast<double>(shape[1]) * receptive;
    fan_out = static_cast<double>(shape[0]) * receptive;
  }
  Params p{spec.kind};
  switch (spec.kind) {
    case InitKind::kConstant:
      if (!finite(spec.value)) return bad("value must be finite");
      p.a = spec.value;
      break;
    case InitKind::kNormal:
      if (!finite(spec.mean) || !finite(spec.std) || spec.std < 0) {
        return bad(absl::StrCat("normal needs finite mean and std >= 0, got ",
                                spec.mean, ", ", spec.std));
      }
      p.a = spec.mean;
      p.b = spec.std;
      break;
    case InitKind::kUniform:
      if (!finite(spec.low) || !finite(spec.high) || spec.low > spec.high ||
          !finite(spec.high - spec.low)) {
        return bad(absl::StrCat("uniform needs finite low <= high, got [",
                                spec.low, ", ", spec.high, ")"));
      }
      p.a = spec.low;
      p.b = spec.high - spec.low;
      break;
    case InitKind::kXavierUniform: {
      const double bound =
          fan_in + fan_out > 0 ? spec.gain * std::sqrt(6.0 / (fan_in + fan_out)) : 0;
      p = Params{InitKind::kUniform, -bound, 2 * bound};
      break;
    }
    case InitKind::kXavierNormal: {
      const double s =
          fan_in + fan_out > 0 ? spec.gain * std::sqrt(2.0 / (fan_in + fan_out)) : 0;
      p = Params{InitKind::kNormal, 0, s};
      break;
    }
    case InitKind::kKaimingUniform:
    case InitKind::kKaimingNormal: {
      const double fan = spec.fan_mode == FanMode::kFanIn ? fan_in : fan_out;
      // fan == 0 only for an empty tensor: nothing is generated.
      const double s = fan > 0 ? spec.gain / std::sqrt(fan) : 0;
      if (spec.kind == InitKind::kKaimingUniform) {
        const double bound = std::sqrt(3.0) * s;
        p = Params{InitKind::kUniform, -bound, 2 * bound};
      } else {
        p = Params{InitKind::kNormal, 0, s};
      }
      break;
    }
    default:
      return bad("unknown InitKind");
  }
  return p;
}

// The value of element `index` (flat, row-major, in the full tensor).
double Sample(const Params& p, uint64_t seed, uint64_t index) {
  if (p.kind == InitKind::kConstant) return p.a;
  const std::array<uint32_t, 4> r = Philox4x32(
      {static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), 0, 0},
      {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)});
  if (p.kind == InitKind::kUniform) {
    const double u = static_cast<double>(Bits53(r[0], r[1])) / kTwoPow53;
    return p.a + p.b * u;
  }
  // Box-Muller; u1 in (0, 1] so the log is finite.
  const double u1 = static_cast<double>(Bits53(r[0], r[1]) + 1) / kTwoPow53;
  const double u2 = static_cast<double>(Bits53(r[2], r[3])) / kTwoPow53;
  const double z = std::sqrt(-2.0 * std::log(u1)) * std::cos(kTwoPi * u2);
  return p.a + p.b * z;
}

// Writes `n` consecutive elements starting at global index `first`.
void Fill(const Params& p, uint64_t seed, uint64_t first, int64_t n, DType dtype,
          void* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const double v = Sample(p, seed, first + i);
    const float f = static_cast<float>(v);
    switch (dtype) {
      case DType::kFloat64:
        static_cast<double*>(dst)[i] = v;
        break;
      case DType::kFloat16:
        static_cast<Half*>(dst)[i] = ToHalf(f);
        break;
      case DType::kBFloat16:
        static_cast<BFloat16*>(dst)[i] = ToBFloat16(f);
        break;
      default:
        static_cast<float*>(dst)[i] = f;
        break;
    }
  }
}

}  // namespace

InitSpec InitSpec::Constant(double value) {
  InitSpec s;
  s.kind = InitKind::kConstant;
  s.value = value;
  return s;
}

InitSpec InitSpec::Normal(double mean, double std, uint64_t seed) {
  InitSpec s;
  s.kind = InitKind::kNormal;
  s.mean = mean;
  s.std = std;
  s.seed = seed;
  return s;
}

InitSpec InitSpec::Uniform(double low, double high, uint64_t seed) {
  InitSpec s;
  s.kind = InitKind::kUniform;
  s.low = low;
  s.high = high;
  s.seed = seed;
  return s;
}

InitSpec InitSpec::XavierUniform(double gain, uint64_t seed) {
  InitSpec s;
  s.kind = InitKind::kXavierUniform;
  s.gain = gain;
  s.seed = seed;
  return s;
}

InitSpec InitSpec::XavierNormal(double gain, uint64_t seed) {
  InitSpec s = XavierUniform(gain, seed);
  s.kind = InitKind::kXavierNormal;
  return s;
}

InitSpec InitSpec::KaimingUniform(uint64_t seed, double gain, FanMode mode) {
  InitSpec s;
  s.kind = InitKind::kKaimingUniform;
  s.gain = gain;
  s.fan_mode = mode;
  s.seed = seed;
  return s;
}

InitSpec InitSpec::KaimingNormal(uint64_t seed, double gain, FanMode mode) {
  InitSpec s = KaimingUniform(seed, gain, mode);
  s.kind = InitKind::kKaimingNormal;
  return s;
}

std::array<uint32_t, 4> Philox4x32(std::array<uint32_t, 4> c,
                                   std::array<uint32_t, 2> k) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k[0] += kPhiloxW0;
      k[1] += kPhiloxW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c[2];
    c = {static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k[0],
         static_cast<uint32_t>(p1),
         static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k[1],
         static_cast<uint32_t>(p0)};
  }
  return c;
}

uint64_t SeedFor(uint64_t base_seed, absl::string_view name) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a offset basis
  for (char ch : name) {
    h ^= static_cast<unsigned char>(ch);
    h *= 0x100000001b3ull;  // FNV prime
  }
  // splitmix64 finaliser over the mix, so nearby base seeds decorrelate.
  uint64_t z = h ^ (base_seed + 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

absl::StatusOr<Tensor> InitShard(const InitSpec& spec, const Shape& full_shape,
                                 int dim, int64_t start, int64_t length,
                                 DType dtype) {
  for (int64_t d : full_shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "InitShard: negative dimension in ", ShapeToString(full_shape)));
    }
  }
  if (!IsFloatingPoint(dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "InitShard: dtype must be floating, got ", DTypeName(dtype)));
  }
  const int nd = static_cast<int>(full_shape.size());
  const int d = dim < 0 ? dim + nd : dim;
  if (nd == 0 || d < 0 || d >= nd) {
    return absl::InvalidArgumentError(absl::StrCat(
        "InitShard: dim ", dim, " out of range for shape ",
        ShapeToString(full_shape)));
  }
  if (start < 0 || length < 0 || start > full_shape[d] ||
      length > full_shape[d] - start) {
    return absl::InvalidArgumentError(absl::StrCat(
        "InitShard: slice start ", start, ", length ", length,
        " out of range for dim ", d, " of shape ", ShapeToString(full_shape)));
  }
  ASSIGN_OR_RETURN(const Params p, Resolve(spec, full_shape));
  Shape out_shape = full_shape;
  out_shape[d] = length;
  Tensor out = Tensor::Empty(out_shape, dtype);
  const int64_t n = out.numel();
  if (n == 0) return out;

  // Row-major strides of the full tensor; the slice's last dimension is a run
  // of consecutive global indices.
  std::vector<int64_t> full_strides(nd);
  int64_t s = 1;
  for (int i = nd - 1; i >= 0; --i) {
    full_strides[i] = s;
    s *= full_shape[i];
  }
  const int64_t inner = out_shape[nd - 1];
  std::vector<int64_t> idx(nd, 0);  // index into the slice, last dim unused
  char* dst = static_cast<char*>(out.raw_data());
  const size_t es = DTypeSize(dtype);
  for (int64_t o = 0; o < n; o += inner) {
    int64_t global = 0;
    for (int i = 0; i < nd; ++i) {
      global += (idx[i] + (i == d ? start : 0)) * full_strides[i];
    }
    Fill(p, spec.seed, static_cast<uint64_t>(global), inner, dtype,
         dst + static_cast<size_t>(o) * es);
    for (int i = nd - 2; i >= 0; --i) {
      if (++idx[i] < out_shape[i]) break;
      idx[i] = 0;
    }
  }
  return out;
}

absl::StatusOr<Tensor> InitTensor(const InitSpec& spec, const Shape& full_shape,
                                  DType dtype) {
  if (full_shape.empty()) {
    // A scalar: view it as [1] for the slicing machinery.
    ASSIGN_OR_RETURN(Tensor t, InitShard(spec, {1}, 0, 0, 1, dtype));
    return t.Reshape({});
  }
  for (int64_t d : full_shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "InitTensor: negative dimension in ", ShapeToString(full_shape)));
    }
  }
  return InitShard(spec, full_shape, 0, 0, full_shape[0], dtype);
}

}  // namespace tp
