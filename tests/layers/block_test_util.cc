#include "tests/layers/block_test_util.h"

#include <cmath>
#include <memory>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "runtime/prefix_store.h"
#include "runtime/status_macros.h"
#include "tests/layers/layer_test_util.h"
#include "tests/testing/communicator_testing.h"
#include "tests/testing/run_ranks.h"

namespace tp {
namespace block_testing {
namespace {

uint64_t NameSeed(uint64_t seed, const std::string& name) {
  uint64_t h = 1469598103934665603ULL ^ seed;
  for (char c : name) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ULL;
  return h;
}

// The slice of `full` (shape `shape`) that a shard with this metadata and
// local shape holds, as doubles.
absl::StatusOr<Vec> Slice(const Vec& full, const Shape& shape,
                          const ParameterShard& s) {
  ASSIGN_OR_RETURN(Tensor t, Tensor::FromDoubles(full, shape, DType::kFloat64));
  if (s.split_dim < 0) return t.ToDoubles();
  if (s.split_dim >= t.ndim()) {
    return absl::InternalError(absl::StrCat(s.name, ": split_dim ", s.split_dim,
                                            " out of range"));
  }
  ASSIGN_OR_RETURN(Tensor v, t.Narrow(s.split_dim, s.offset,
                                      s.tensor.dim(s.split_dim)));
  return v.ToDoubles();
}

}  // namespace

block_ref::Params RandomParams(const Shapes& shapes, uint64_t seed) {
  block_ref::Params p;
  for (const auto& [name, shape] : shapes) {
    const int64_t n = NumElements(shape);
    const uint64_t s = NameSeed(seed, name);
    if (shape.size() == 2) {
      p[name] = testing_layers::RandomVec(n, s, 1.0 / std::sqrt(shape[1]));
    } else if (absl::EndsWith(name, "norm.weight")) {
      Vec v = testing_layers::RandomVec(n, s, 0.2);
      for (double& x : v) x += 1.0;
      p[name] = v;
    } else {
      p[name] = testing_layers::RandomVec(n, s, 0.2);
    }
  }
  return p;
}

absl::Status LoadShards(const std::vector<ParameterShard>& shards,
                        const block_ref::Params& full, const Shapes& shapes) {
  std::set<std::string> seen;
  for (const ParameterShard& s : shards) {
    auto it = shapes.find(s.name);
    if (it == shapes.end()) {
      return absl::InternalError(
          absl::StrCat("unexpected parameter name ", s.name));
    }
    if (s.full_shape != it->second) {
      return absl::InternalError(absl::StrCat(
          s.name, ": full_shape ", ShapeToString(s.full_shape), ", expected ",
          ShapeToString(it->second)));
    }
    ASSIGN_OR_RETURN(Vec slice, Slice(full.at(s.name), it->second, s));
    ASSIGN_OR_RETURN(Tensor t,
                     Tensor::FromDoubles(slice, s.tensor.shape(), s.tensor.dtype()));
    Tensor dst = s.tensor;
    RETURN_IF_ERROR(dst.CopyFrom(t));
    seen.insert(s.name);
  }
  for (const auto& kv : shapes) {
    if (seen.count(kv.first) == 0) {
      return absl::InternalError(absl::StrCat("no shard named ", kv.first));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckShards(const std::vector<ParameterShard>& shards,
                         const block_ref::Params& want, int tp_rank,
                         int tp_size, double tol, const std::string& what) {
  for (const ParameterShard& s : shards) {
    auto it = want.find(s.name);
    if (it == want.end()) {
      return absl::InternalError(absl::StrCat(what, ": unexpected ", s.name));
    }
    if (!s.replicated()) {
      const int64_t len = s.tensor.dim(s.split_dim);
      if (s.offset != tp_rank * len || s.full_shape[s.split_dim] != tp_size * len) {
        return absl::InternalError(absl::StrCat(
            what, ": ", s.name, " shard at offset ", s.offset, " length ", len,
            " of ", ShapeToString(s.full_shape), " on tp rank ", tp_rank,
            " of ", tp_size));
      }
    }
    ASSIGN_OR_RETURN(Vec slice, Slice(it->second, s.full_shape, s));
    RETURN_IF_ERROR(CheckClose(s.tensor, slice, tol, absl::StrCat(what, " ", s.name)));
  }
  return absl::OkStatus();
}

Vec RowSlice(const Vec& m, int64_t cols, int64_t r0, int64_t n) {
  return Vec(m.begin() + r0 * cols, m.begin() + (r0 + n) * cols);
}

Vec PositionRows(const Vec& m, int64_t batch, int64_t seq, int64_t cols,
                 int64_t p0, int64_t n) {
  Vec out;
  for (int64_t b = 0; b < batch; ++b) {
    const Vec r = RowSlice(m, cols, b * seq + p0, n);
    out.insert(out.end(), r.begin(), r.end());
  }
  return out;
}

absl::Status CheckClose(const Tensor& got, const Vec& want, double tol,
                        const std::string& what) {
  if (!got.defined()) return absl::InternalError(what + ": undefined");
  const Vec g = got.ToDoubles();
  if (g.size() != want.size()) {
    return absl::InternalError(absl::StrCat(what, ": ", g.size(),
                                            " elements, want ", want.size()));
  }
  double num = 0.0, den = 1e-30;
  for (size_t i = 0; i < g.size(); ++i) {
    num = std::max(num, std::fabs(g[i] - want[i]));
    den = std::max(den, std::fabs(want[i]));
  }
  if (!(num / den < tol)) {
    return absl::InternalError(absl::StrCat(what, ": relative error ", num / den,
                                            " >= ", tol));
  }
  return absl::OkStatus();
}

absl::Status CheckInputGradient(Tensor& x, const Vec& grad, const LossFn& loss,
                                const std::string& what, double h, double tol) {
  double* xp = x.data<double>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double x0 = xp[i];
    xp[i] = x0 + h;
    ASSIGN_OR_RETURN(double lp, loss());
    xp[i] = x0 - h;
    ASSIGN_OR_RETURN(double lm, loss());
    xp[i] = x0;
    const double fd = (lp - lm) / (2 * h);
    if (std::fabs(fd - grad[i]) > tol * std::max(1.0, std::fabs(fd))) {
      return absl::InternalError(absl::StrCat(what, "[", i, "] = ", grad[i],
                                              ", finite difference ", fd));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckParameterGradients(Communicator& comm,
                                     const std::vector<ParameterShard>& params,
                                     const std::vector<ParameterShard>& grads,
                                     const LossFn& loss, double h, double tol,
                                     int64_t max_elements) {
  if (params.size() != grads.size()) {
    return absl::InternalError("params and grads differ in length");
  }
  for (int owner = 0; owner < comm.size(); ++owner) {
    for (size_t k = 0; k < params.size(); ++k) {
      const ParameterShard& p = params[k];
      if (p.replicated() && owner > 0) continue;
      const bool mine = p.replicated() || comm.rank() == owner;
      const Vec gv = grads[k].tensor.ToDoubles();
      double* pp = p.tensor.data<double>();
      const int64_t n = p.tensor.numel();
      const int64_t count = std::min(n, std::max<int64_t>(max_elements, 2));
      for (int64_t e = 0; e < count; ++e) {
        const int64_t i = count == 1 ? 0 : e * (n - 1) / (count - 1);
        const double p0 = pp[i];
        if (mine) pp[i] = p0 + h;
        ASSIGN_OR_RETURN(double lp, loss());
        if (mine) pp[i] = p0 - h;
        ASSIGN_OR_RETURN(double lm, loss());
        pp[i] = p0;
        const double fd = (lp - lm) / (2 * h);
        if (mine && std::fabs(fd - gv[i]) > tol * std::max(1.0, std::fabs(fd))) {
          return absl::InternalError(absl::StrCat(
              p.name, "[", i, "] (offset ", p.offset, ") gradient ", gv[i],
              ", finite difference ", fd));
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::Status RunGrid(int dp, int tp,
                     const std::function<absl::Status(GridRank&)>& body) {
  const int world = dp * tp;
  return AllRanksOk(RunRanks(
      world, [&](int rank, std::shared_ptr<Store> store) -> absl::Status {
        GridRank g;
        g.world_rank = rank;
        g.tp_rank = rank % tp;
        g.dp_rank = rank / tp;
        ASSIGN_OR_RETURN(std::unique_ptr<Communicator> w,
                         CreateTestCommunicator("gloo", rank, world, store));
        auto tp_store = std::make_shared<PrefixStore>(
            absl::StrCat("tp", g.dp_rank), store);
        ASSIGN_OR_RETURN(std::unique_ptr<Communicator> t,
                         CreateTestCommunicator("gloo", g.tp_rank, tp, tp_store));
        auto dp_store = std::make_shared<PrefixStore>(
            absl::StrCat("dp", g.tp_rank), store);
        ASSIGN_OR_RETURN(std::unique_ptr<Communicator> d,
                         CreateTestCommunicator("gloo", g.dp_rank, dp, dp_store));
        g.world = w.get();
        g.tp = t.get();
        g.dp = d.get();
        return body(g);
      }));
}

}  // namespace block_testing
}  // namespace tp
