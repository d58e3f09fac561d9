// Inputs with closed-form collective results, for backend and fake tests.
//
// Rank r contributes small integers f(r, i) chosen per ReduceOp so that every
// partial result is exactly representable in every dtype (bfloat16 included):
//   kSum, kAvg      f = ((5 i + 3 r) mod 9) - 4            in [-4, 4]
//   kProduct        f = +-(1 + (i + r) mod 3)              |product| <= 81
//   kMax, kMin      f = ((7 i + 13 r) mod 23) - 11         in [-11, 11]
// so the expected value of a reduction is the exact reduction of those
// integers, with kAvg's division rounded as comm/communicator.h specifies
// (the quotient rounded to the dtype; integers truncated toward zero).
// AllGather / Broadcast / Send use a position-and-rank pattern p(r, i),
// distinct per rank and exact in the dtype.
//
// Checks return absl::Status (kInternal naming the first wrong element) so
// that rank threads can report them through RunRanks.
//
// Example:
//   Tensor t = tp::ReduceInput(op, dtype, rank, /*numel=*/1021);
//   RETURN_IF_ERROR(comm.AllReduce(t, op));
//   RETURN_IF_ERROR(tp::CheckValues(t, tp::ExpectedReduce(op, dtype, world, 1021, 0),
//                                   "AllReduce"));
#ifndef TENSOR_PARALLEL_TESTS_TESTING_COLLECTIVE_CHECKS_H_
#define TENSOR_PARALLEL_TESTS_TESTING_COLLECTIVE_CHECKS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "comm/communicator.h"
#include "runtime/tensor.h"

namespace tp {

inline constexpr ReduceOp kAllReduceOps[] = {ReduceOp::kSum, ReduceOp::kAvg,
                                             ReduceOp::kMax, ReduceOp::kMin,
                                             ReduceOp::kProduct};

// f(r, i) for `op` (see the file comment).
double ReduceValue(ReduceOp op, int rank, int64_t i);

// A 1-D tensor of `numel` elements f(rank, i + offset), i in [0, numel).
Tensor ReduceInput(ReduceOp op, DType dtype, int rank, int64_t numel,
                   int64_t offset = 0);

// The expected reduction over ranks 0..world-1 of f(r, i + offset) for i in
// [0, numel), rounded for `dtype` as the contract says.
std::vector<double> ExpectedReduce(ReduceOp op, DType dtype, int world,
                                   int64_t numel, int64_t offset = 0);

// p(r, i): distinct for every rank and position within the dtype's exact
// integer range (mod 251 for bfloat16, mod 2039 for float16).
double PatternValue(DType dtype, int rank, int64_t i);

// A tensor of `shape` filled with p(rank, flat index + offset).
Tensor PatternInput(DType dtype, int rank, Shape shape, int64_t offset = 0);

// p(rank, i + offset) for i in [0, numel).
std::vector<double> ExpectedPattern(DType dtype, int rank, int64_t numel,
                                    int64_t offset = 0);

// OK when `got` holds exactly `expected` (as doubles); kInternal naming
// `what`, the number of wrong elements and the first one otherwise.
absl::Status CheckValues(const Tensor& got, const std::vector<double>& expected,
                         absl::string_view what);

}  // namespace tp

#endif  // TENSOR_PARALLEL_TESTS_TESTING_COLLECTIVE_CHECKS_H_
