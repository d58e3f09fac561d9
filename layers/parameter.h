// ParameterShard: one rank's piece of a (possibly sharded) parameter, with the
// metadata a checkpoint needs to place it inside the full tensor.
//
// Every parallel layer exposes its parameters and gradients as a list of
// ParameterShard. A shard of a tensor-parallel weight records the shape of the
// full (TP = 1) tensor, the dimension it is split along and where this rank's
// piece starts, so that
//     full.Narrow(split_dim, offset, tensor.dim(split_dim)) == tensor
// for split parameters, and full == tensor for replicated ones
// (split_dim == -1, offset == 0).
//
// The `tensor` member shares storage with the layer's own tensor: writing
// into it (an optimizer step, a checkpoint load) updates the layer.
//
// Example:
//   for (const tp::ParameterShard& p : layer->parameters()) {
//     LOG(INFO) << p.name << " " << tp::ShapeToString(p.tensor.shape())
//               << " of " << tp::ShapeToString(p.full_shape)
//               << " split_dim=" << p.split_dim << " offset=" << p.offset;
//   }
#ifndef TENSOR_PARALLEL_LAYERS_PARAMETER_H_
#define TENSOR_PARALLEL_LAYERS_PARAMETER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "runtime/tensor.h"

namespace tp {

struct ParameterShard {
  // Dotted name within its owner, e.g. "weight", "bias", "mlp.fc1.weight".
  std::string name;
  // This rank's piece (shares storage with the layer's parameter or grad).
  Tensor tensor;
  // Shape of the full parameter as a TP = 1 model holds it.
  Shape full_shape;
  // Dimension of full_shape this rank's piece is cut from; -1 = replicated
  // (every rank holds the full tensor).
  int split_dim = -1;
  // Start of this rank's piece along split_dim (0 when replicated).
  int64_t offset = 0;

  bool replicated() const { return split_dim < 0; }
};

// Returns `shards` with "<prefix>." prepended to every name (no-op for an
// empty prefix). For composing blocks: PrefixNames("fc1", fc1->parameters()).
std::vector<ParameterShard> PrefixNames(absl::string_view prefix,
                                        std::vector<ParameterShard> shards);

}  // namespace tp

#endif  // TENSOR_PARALLEL_LAYERS_PARAMETER_H_
