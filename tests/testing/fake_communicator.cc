#include "tests/testing/fake_communicator.h"

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <cstring>
#include <deque>
#include <map>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "glog/logging.h"

namespace tp {

namespace {

enum class Kind { kAllReduce, kBroadcast, kAllGather, kReduceScatter, kBarrier };

const char* KindName(Kind k) {
  switch (k) {
    case Kind::kAllReduce:
      return "AllReduce";
    case Kind::kBroadcast:
      return "Broadcast";
    case Kind::kAllGather:
      return "AllGather";
    case Kind::kReduceScatter:
      return "ReduceScatter";
    case Kind::kBarrier:
      return "Barrier";
  }
  return "?";
}

// What one rank brings to one collective.
struct Contribution {
  Kind kind = Kind::kBarrier;
  bool has_tensor = false;
  DType dtype = DType::kFloat32;
  Shape shape;
  int root = -1;
  int op = -1;
  Tensor data;                  // a private copy of the input
  absl::Status local;           // the rank's own argument error
  absl::Status failed;          // an injected failure
};

std::string Describe(const Contribution& c) {
  std::string s = absl::StrCat(KindName(c.kind), "(");
  if (c.has_tensor) {
    absl::StrAppend(&s, DTypeName(c.dtype), " ", ShapeToString(c.shape));
  }
  if (c.op >= 0) {
    absl::StrAppend(&s, ", ", ReduceOpName(static_cast<ReduceOp>(c.op)));
  }
  if (c.root >= 0) absl::StrAppend(&s, ", root ", c.root);
  return s + ")";
}

bool Same(const Contribution& a, const Contribution& b) {
  return a.kind == b.kind && a.has_tensor == b.has_tensor &&
         (!a.has_tensor || (a.dtype == b.dtype && a.shape == b.shape)) &&
         a.root == b.root && a.op == b.op;
}

struct Round {
  explicit Round(int n) : slots(n) {}
  std::vector<std::unique_ptr<Contribution>> slots;
  int arrived = 0;
};

// One reduction step in the element type (fp16/bf16 through float).
template <typename T>
T Combine(T a, T b, ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return static_cast<T>(a + b);
    case ReduceOp::kProduct:
      return static_cast<T>(a * b);
    case ReduceOp::kMax:
      return std::max(a, b);
    case ReduceOp::kMin:
      return std::min(a, b);
  }
  return a;
}
template <>
Half Combine(Half a, Half b, ReduceOp op) {
  return ToHalf(Combine(ToFloat(a), ToFloat(b), op));
}
template <>
BFloat16 Combine(BFloat16 a, BFloat16 b, ReduceOp op) {
  return ToBFloat16(Combine(ToFloat(a), ToFloat(b), op));
}

template <typename T>
T Divide(T v, int n) {
  return static_cast<T>(v / static_cast<T>(n));
}
template <>
Half Divide(Half v, int n) {
  return ToHalf(ToFloat(v) / static_cast<float>(n));
}
template <>
BFloat16 Divide(BFloat16 v, int n) {
  return ToBFloat16(ToFloat(v) / static_cast<float>(n));
}

// out[i] = reduce over r (in rank order) of input(r)[offset + i].
void ReduceInto(Tensor& out, const std::vector<const Tensor*>& inputs,
                int64_t offset, ReduceOp op) {
  DispatchDType(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* o = static_cast<T*>(out.raw_data());
    const int64_t n = out.numel();
    const int ranks = static_cast<int>(inputs.size());
    for (int64_t i = 0; i < n; ++i) {
      T acc = static_cast<const T*>(inputs[0]->raw_data())[offset + i];
      for (int r = 1; r < ranks; ++r) {
        acc = Combine(acc, static_cast<const T*>(inputs[r]->raw_data())[offset + i],
                      op);
      }
      o[i] = op == ReduceOp::kAvg ? Divide(acc, ranks) : acc;
    }
  });
}

absl::Status ValidateTensor(const Tensor& t, absl::string_view op,
                            absl::string_view name) {
  if (!t.defined()) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": `", name, "` is undefined"));
  }
  if (!t.device().is_cpu()) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": `", name, "` is not on the CPU"));
  }
  if (!t.is_contiguous()) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": `", name, "` is not contiguous"));
  }
  return absl::OkStatus();
}

absl::Status ValidateSplit(const Tensor& whole, const Tensor& piece, int size,
                           absl::string_view op) {
  if (whole.dtype() != piece.dtype()) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": dtypes differ"));
  }
  if (piece.ndim() == 0) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": scalar tensor"));
  }
  Shape expected = piece.shape();
  expected[0] *= size;
  if (whole.shape() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": shape ", ShapeToString(whole.shape()), " must be ",
        ShapeToString(expected)));
  }
  return absl::OkStatus();
}

Contribution MakeContribution(Kind kind, const Tensor* t, int op, int root,
                              absl::Status local) {
  Contribution c;
  c.kind = kind;
  c.op = op;
  c.root = root;
  c.local = std::move(local);
  if (t != nullptr && t->defined()) {
    c.has_tensor = true;
    c.dtype = t->dtype();
    c.shape = t->shape();
    if (c.local.ok()) c.data = t->Clone();
  }
  return c;
}

}  // namespace

class FakeGroup {
 public:
  FakeGroup(int size, absl::Duration timeout) : size_(size), timeout_(timeout) {}

  int size() const { return size_; }

  // Deposits `mine` for collective `index` and, unless `wait` is false,
  // waits for every rank's contribution; returns them in rank order (shared
  // by the ranks; read-only).
  absl::StatusOr<std::shared_ptr<Round>> Exchange(int rank, int64_t index,
                                                  Contribution mine,
                                                  bool wait) {
    std::unique_lock<std::mutex> lock(mu_);
    std::shared_ptr<Round>& slot = rounds_[index];
    if (slot == nullptr) slot = std::make_shared<Round>(size_);
    std::shared_ptr<Round> round = slot;
    round->slots[rank] = std::make_unique<Contribution>(std::move(mine));
    ++round->arrived;
    if (round->arrived == size_) {
      rounds_.erase(index);
      cv_.notify_all();
    }
    if (!wait) return round;
    if (!cv_.wait_for(lock, absl::ToChronoMilliseconds(timeout_),
                      [&] { return round->arrived == size_; })) {
      std::vector<int> missing;
      for (int r = 0; r < size_; ++r) {
        if (round->slots[r] == nullptr) missing.push_back(r);
      }
      return absl::DeadlineExceededError(absl::StrCat(
          "fake collective #", index, " on rank ", rank, ": rank(s) ",
          absl::StrJoin(missing, ", "), " did not arrive within ",
          absl::FormatDuration(timeout_)));
    }
    return round;
  }

  void Post(int src, int dst, Tensor t) {
    std::lock_guard<std::mutex> lock(mu_);
    mailboxes_[{src, dst}].push_back(std::move(t));
    cv_.notify_all();
  }

  absl::StatusOr<Tensor> Take(int src, int dst) {
    std::unique_lock<std::mutex> lock(mu_);
    auto& box = mailboxes_[{src, dst}];
    if (!cv_.wait_for(lock, absl::ToChronoMilliseconds(timeout_),
                      [&] { return !box.empty(); })) {
      return absl::DeadlineExceededError(absl::StrCat(
          "fake Recv on rank ", dst, ": nothing from rank ", src, " within ",
          absl::FormatDuration(timeout_)));
    }
    Tensor t = std::move(box.front());
    box.pop_front();
    return t;
  }

 private:
  const int size_;
  const absl::Duration timeout_;
  // std::mutex rather than absl::Mutex so that ThreadSanitizer builds see the
  // synchronization (Debian's Abseil is not instrumented).
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<int64_t, std::shared_ptr<Round>> rounds_;  // guarded by mu_
  std::map<std::pair<int, int>, std::deque<Tensor>> mailboxes_;  // by mu_
};

namespace {

// Runs one collective: exchange, then the checks every rank makes the same
// way, then `compute` with every rank's contribution.
template <typename Compute>
absl::Status RunCollective(FakeGroup* group, int rank, int size,
                           int64_t index, absl::Status injected,
                           Contribution mine, Compute compute) {
  const std::string what = KindName(mine.kind);
  if (!injected.ok()) mine.failed = injected;
  std::shared_ptr<Round> round;
  if (group == nullptr) {
    if (!injected.ok()) return injected;
    round = std::make_shared<Round>(1);
    round->slots[0] = std::make_unique<Contribution>(std::move(mine));
    round->arrived = 1;
  } else {
    absl::StatusOr<std::shared_ptr<Round>> r =
        group->Exchange(rank, index, std::move(mine), injected.ok());
    if (!injected.ok()) return injected;
    if (!r.ok()) return r.status();
    round = *std::move(r);
  }
  std::vector<std::string> failed, rejected;
  for (int r = 0; r < size; ++r) {
    const Contribution& c = *round->slots[r];
    if (!c.failed.ok()) {
      failed.push_back(absl::StrCat("rank ", r, " failed: ", c.failed.ToString()));
    } else if (!c.local.ok()) {
      rejected.push_back(absl::StrCat("rank ", r, ": ", c.local.message()));
    }
  }
  if (!failed.empty()) {
    return absl::UnavailableError(absl::StrCat("fake ", what, " on rank ", rank,
                                               ": ", absl::StrJoin(failed, "; ")));
  }
  if (!rejected.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "fake ", what, " on rank ", rank,
        ": rejected arguments: ", absl::StrJoin(rejected, "; ")));
  }
  for (int r = 1; r < size; ++r) {
    if (!Same(*round->slots[0], *round->slots[r])) {
      std::vector<std::string> calls;
      for (int q = 0; q < size; ++q) {
        calls.push_back(absl::StrCat("rank ", q, ": ", Describe(*round->slots[q])));
      }
      return absl::InvalidArgumentError(absl::StrCat(
          "fake ", what, " on rank ", rank,
          ": ranks disagree on the call: ", absl::StrJoin(calls, "; ")));
    }
  }
  std::vector<const Tensor*> inputs;
  for (int r = 0; r < size; ++r) inputs.push_back(&round->slots[r]->data);
  return compute(inputs);
}

}  // namespace

FakeCommunicator::FakeCommunicator(FakeCommunicatorOptions options)
    : FakeCommunicator(nullptr, 0, std::move(options)) {}

FakeCommunicator::FakeCommunicator(std::shared_ptr<FakeGroup> group, int rank,
                                   FakeCommunicatorOptions options)
    : group_(std::move(group)),
      rank_(rank),
      size_(group_ == nullptr ? 1 : group_->size()),
      options_(std::move(options)) {}

FakeCommunicator::~FakeCommunicator() = default;

std::vector<std::unique_ptr<FakeCommunicator>> FakeCommunicator::CreateGroup(
    int size, absl::Duration timeout,
    std::vector<FakeCommunicatorOptions> options) {
  CHECK_GE(size, 1);
  auto group = std::make_shared<FakeGroup>(size, timeout);
  options.resize(size);
  std::vector<std::unique_ptr<FakeCommunicator>> comms;
  for (int r = 0; r < size; ++r) {
    comms.emplace_back(new FakeCommunicator(group, r, options[r]));
  }
  return comms;
}

absl::Status FakeCommunicator::BeginCall() {
  const int64_t call = calls_++;
  if (options_.delay > absl::ZeroDuration()) absl::SleepFor(options_.delay);
  if (call == options_.fail_on_call) {
    return options_.failure.ok() ? absl::UnavailableError("injected failure")
                                 : options_.failure;
  }
  return absl::OkStatus();
}

absl::Status FakeCommunicator::AllReduce(Tensor& t, ReduceOp op) {
  absl::Status injected = BeginCall();
  Contribution c = MakeContribution(Kind::kAllReduce, &t, static_cast<int>(op),
                                    -1, ValidateTensor(t, "AllReduce", "t"));
  return RunCollective(group_.get(), rank_, size_, collectives_++, injected,
                       std::move(c), [&](const std::vector<const Tensor*>& inputs) {
                         ReduceInto(t, inputs, 0, op);
                         return absl::OkStatus();
                       });
}

absl::Status FakeCommunicator::Broadcast(Tensor& t, int root) {
  absl::Status injected = BeginCall();
  absl::Status local = ValidateTensor(t, "Broadcast", "t");
  if (local.ok() && (root < 0 || root >= size_)) {
    local = absl::InvalidArgumentError(
        absl::StrCat("Broadcast: root ", root, " out of range"));
  }
  Contribution c = MakeContribution(Kind::kBroadcast, &t, -1, root, local);
  return RunCollective(group_.get(), rank_, size_, collectives_++, injected,
                       std::move(c), [&](const std::vector<const Tensor*>& inputs) {
                         return t.CopyFrom(*inputs[root]);
                       });
}

absl::Status FakeCommunicator::AllGather(const Tensor& in, Tensor& out) {
  absl::Status injected = BeginCall();
  absl::Status local = ValidateTensor(in, "AllGather", "in");
  if (local.ok()) local = ValidateTensor(out, "AllGather", "out");
  if (local.ok()) local = ValidateSplit(out, in, size_, "AllGather");
  Contribution c = MakeContribution(Kind::kAllGather, &in, -1, -1, local);
  return RunCollective(
      group_.get(), rank_, size_, collectives_++, injected, std::move(c),
      [&](const std::vector<const Tensor*>& inputs) {
        const size_t bytes = inputs[0]->nbytes();
        char* dst = static_cast<char*>(out.raw_data());
        for (size_t r = 0; r < inputs.size() && bytes > 0; ++r) {
          std::memcpy(dst + r * bytes, inputs[r]->raw_data(), bytes);
        }
        return absl::OkStatus();
      });
}

absl::Status FakeCommunicator::ReduceScatter(const Tensor& in, Tensor& out,
                                             ReduceOp op) {
  absl::Status injected = BeginCall();
  absl::Status local = ValidateTensor(in, "ReduceScatter", "in");
  if (local.ok()) local = ValidateTensor(out, "ReduceScatter", "out");
  if (local.ok()) local = ValidateSplit(in, out, size_, "ReduceScatter");
  Contribution c = MakeContribution(Kind::kReduceScatter, &in,
                                    static_cast<int>(op), -1, local);
  return RunCollective(group_.get(), rank_, size_, collectives_++, injected,
                       std::move(c), [&](const std::vector<const Tensor*>& inputs) {
                         ReduceInto(out, inputs, rank_ * out.numel(), op);
                         return absl::OkStatus();
                       });
}

absl::Status FakeCommunicator::Barrier() {
  absl::Status injected = BeginCall();
  Contribution c =
      MakeContribution(Kind::kBarrier, nullptr, -1, -1, absl::OkStatus());
  return RunCollective(group_.get(), rank_, size_, collectives_++, injected,
                       std::move(c), [](const std::vector<const Tensor*>&) {
                         return absl::OkStatus();
                       });
}

absl::Status FakeCommunicator::Send(const Tensor& t, int dst) {
  absl::Status injected = BeginCall();
  if (!injected.ok()) return injected;
  if (dst < 0 || dst >= size_ || dst == rank_) {
    return absl::InvalidArgumentError(
        absl::StrCat("fake Send on rank ", rank_, ": bad destination ", dst));
  }
  absl::Status local = ValidateTensor(t, "Send", "t");
  if (!local.ok()) return local;
  group_->Post(rank_, dst, t.Clone());
  return absl::OkStatus();
}

absl::Status FakeCommunicator::Recv(Tensor& t, int src) {
  absl::Status injected = BeginCall();
  if (!injected.ok()) return injected;
  if (src < 0 || src >= size_ || src == rank_) {
    return absl::InvalidArgumentError(
        absl::StrCat("fake Recv on rank ", rank_, ": bad source ", src));
  }
  absl::Status local = ValidateTensor(t, "Recv", "t");
  if (!local.ok()) return local;
  absl::StatusOr<Tensor> got = group_->Take(src, rank_);
  if (!got.ok()) return got.status();
  if (got->dtype() != t.dtype() || got->shape() != t.shape()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "fake Recv on rank ", rank_, ": rank ", src, " sent ",
        DTypeName(got->dtype()), " ", ShapeToString(got->shape()),
        " but the receive buffer is ", DTypeName(t.dtype()), " ",
        ShapeToString(t.shape())));
  }
  return t.CopyFrom(*got);
}

}  // namespace tp
