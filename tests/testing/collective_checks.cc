#include "tests/testing/collective_checks.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "glog/logging.h"

namespace tp {

double ReduceValue(ReduceOp op, int rank, int64_t i) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return static_cast<double>((5 * i + 3 * rank) % 9) - 4;
    case ReduceOp::kProduct: {
      const double magnitude = 1 + (i + rank) % 3;
      return (i + 2 * rank) % 5 == 0 ? -magnitude : magnitude;
    }
    case ReduceOp::kMax:
    case ReduceOp::kMin:
      return static_cast<double>((7 * i + 13 * rank) % 23) - 11;
  }
  return 0;
}

Tensor ReduceInput(ReduceOp op, DType dtype, int rank, int64_t numel,
                   int64_t offset) {
  std::vector<double> v(numel);
  for (int64_t i = 0; i < numel; ++i) v[i] = ReduceValue(op, rank, i + offset);
  absl::StatusOr<Tensor> t = Tensor::FromDoubles(v, {numel}, dtype);
  CHECK(t.ok()) << t.status();
  return *t;
}

namespace {

// The contract's kAvg: the exact sum divided in the dtype's arithmetic.
double AverageFor(DType dtype, double sum, int world) {
  switch (dtype) {
    case DType::kFloat64:
      return sum / world;
    case DType::kFloat32:
      return static_cast<float>(sum) / static_cast<float>(world);
    case DType::kFloat16:
      return ElementToDouble(
          ElementFromDouble<Half>(static_cast<float>(sum) / world));
    case DType::kBFloat16:
      return ElementToDouble(
          ElementFromDouble<BFloat16>(static_cast<float>(sum) / world));
    case DType::kInt32:
    case DType::kInt64:
      return static_cast<double>(static_cast<int64_t>(sum) / world);
  }
  return 0;
}

}  // namespace

std::vector<double> ExpectedReduce(ReduceOp op, DType dtype, int world,
                                   int64_t numel, int64_t offset) {
  std::vector<double> out(numel);
  for (int64_t i = 0; i < numel; ++i) {
    double acc = ReduceValue(op, 0, i + offset);
    for (int r = 1; r < world; ++r) {
      const double v = ReduceValue(op, r, i + offset);
      switch (op) {
        case ReduceOp::kSum:
        case ReduceOp::kAvg:
          acc += v;
          break;
        case ReduceOp::kProduct:
          acc *= v;
          break;
        case ReduceOp::kMax:
          acc = std::max(acc, v);
          break;
        case ReduceOp::kMin:
          acc = std::min(acc, v);
          break;
      }
    }
    out[i] = op == ReduceOp::kAvg ? AverageFor(dtype, acc, world) : acc;
  }
  return out;
}

double PatternValue(DType dtype, int rank, int64_t i) {
  switch (dtype) {
    case DType::kBFloat16:
      return static_cast<double>((37 * rank + 11 * i) % 251);
    case DType::kFloat16:
      return static_cast<double>((397 * rank + 13 * i) % 2039);
    default:
      return static_cast<double>(rank) * (1 << 21) + static_cast<double>(i % (1 << 21));
  }
}

Tensor PatternInput(DType dtype, int rank, Shape shape, int64_t offset) {
  const int64_t n = NumElements(shape);
  std::vector<double> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = PatternValue(dtype, rank, i + offset);
  absl::StatusOr<Tensor> t = Tensor::FromDoubles(v, std::move(shape), dtype);
  CHECK(t.ok()) << t.status();
  return *t;
}

std::vector<double> ExpectedPattern(DType dtype, int rank, int64_t numel,
                                    int64_t offset) {
  std::vector<double> v(numel);
  for (int64_t i = 0; i < numel; ++i) v[i] = PatternValue(dtype, rank, i + offset);
  return v;
}

absl::Status CheckValues(const Tensor& got, const std::vector<double>& expected,
                         absl::string_view what) {
  if (got.numel() != static_cast<int64_t>(expected.size())) {
    return absl::InternalError(absl::StrCat(what, ": ", got.numel(),
                                            " elements, expected ",
                                            expected.size()));
  }
  const std::vector<double> values = got.ToDoubles();
  int64_t wrong = 0;
  int64_t first = -1;
  for (size_t i = 0; i < values.size(); ++i) {
    if (values[i] != expected[i]) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++wrong;
    }
  }
  if (wrong == 0) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(
      what, " (", DTypeName(got.dtype()), ", ", got.numel(), " elements): ",
      wrong, " wrong; first at [", first, "]: got ", values[first],
      ", expected ", expected[first]));
}

}  // namespace tp
