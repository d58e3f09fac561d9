// Helpers for the tests of the blocks (norm, MLP, attention, transformer
// block), the optimizers and training: random full parameters for the
// float64 reference, loading them into a layer's shards through the shard
// metadata, checking sharded gradients against the reference, and running a
// body on a data-parallel x tensor-parallel grid of ranks over real Gloo
// communicators.
#ifndef TENSOR_PARALLEL_TESTS_LAYERS_BLOCK_TEST_UTIL_H_
#define TENSOR_PARALLEL_TESTS_LAYERS_BLOCK_TEST_UTIL_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "layers/parameter.h"
#include "runtime/dtype.h"
#include "runtime/tensor.h"
#include "tests/layers/block_reference.h"

namespace tp {
namespace block_testing {

using Vec = std::vector<double>;
using Shapes = std::map<std::string, std::vector<int64_t>>;

// Deterministic full parameters for `shapes`: [out, in] weights
// U(-1, 1) / sqrt(in), "*norm.weight" 1 + U(-0.2, 0.2), other vectors
// U(-0.2, 0.2). Seeded by `seed` and the name.
block_ref::Params RandomParams(const Shapes& shapes, uint64_t seed);

// Writes the slice of full[name] described by each shard's metadata into the
// shard's tensor (rounded to its dtype). kInternal when a shard's name is not
// in `shapes`, its full_shape differs from shapes[name], its tensor does not
// have the slice's shape, or when `shapes` has names no shard covers.
absl::Status LoadShards(const std::vector<ParameterShard>& shards,
                        const block_ref::Params& full, const Shapes& shapes);

// Checks every shard against the same slice of want[name] (relative error
// < tol, see ref::RelError) and that split shards sit at offset
// tp_rank * (their length) of a dimension tp_size times as long.
// kInternal naming the parameter otherwise.
absl::Status CheckShards(const std::vector<ParameterShard>& shards,
                         const block_ref::Params& want, int tp_rank,
                         int tp_size, double tol, const std::string& what);

// Rows [r0, r0 + n) of a row-major [rows, cols] matrix.
Vec RowSlice(const Vec& m, int64_t cols, int64_t r0, int64_t n);

// Positions [p0, p0 + n) of every sequence of a batch-major [batch * seq,
// cols] matrix, batch-major: the rows a KV-cache step feeds.
Vec PositionRows(const Vec& m, int64_t batch, int64_t seq, int64_t cols,
                 int64_t p0, int64_t n);

// Relative error max|a - b| / max|b|, and a kInternal status when >= tol.
absl::Status CheckClose(const Tensor& got, const Vec& want, double tol,
                        const std::string& what);

using LossFn = std::function<absl::StatusOr<double>()>;

// Central finite differences (step h) of loss() with respect to every
// element of the float64 tensor `x` (perturbed in place on this rank only)
// against `grad`: |fd - grad| <= tol * max(1, |fd|), else kInternal.
absl::Status CheckInputGradient(Tensor& x, const Vec& grad, const LossFn& loss,
                                const std::string& what, double h = 1e-6,
                                double tol = 1e-7);

// The same for the elements of every float64 parameter, against grads()
// (same order): all of them when a shard has at most `max_elements`, else
// `max_elements` evenly spaced ones (first and last included). Split shards are perturbed one owning rank at a time (every
// rank runs loss() for every perturbation, keeping the collectives in step);
// replicated parameters on every rank at once, since each rank holds a copy.
absl::Status CheckParameterGradients(Communicator& comm,
                                     const std::vector<ParameterShard>& params,
                                     const std::vector<ParameterShard>& grads,
                                     const LossFn& loss, double h = 1e-6,
                                     double tol = 1e-7,
                                     int64_t max_elements = 6);

// The communicators of one rank of a dp x tp grid (Megatron layout: TP groups
// are consecutive world ranks, DP groups strided).
struct GridRank {
  int world_rank = 0;
  int tp_rank = 0;
  int dp_rank = 0;
  Communicator* world = nullptr;
  Communicator* tp = nullptr;
  Communicator* dp = nullptr;
};

// Runs body on dp * tp threads, each with real Gloo world, TP and DP
// communicators; OK when every rank is, else the first error.
absl::Status RunGrid(int dp, int tp,
                     const std::function<absl::Status(GridRank&)>& body);

}  // namespace block_testing
}  // namespace tp

#endif  // TENSOR_PARALLEL_TESTS_LAYERS_BLOCK_TEST_UTIL_H_
