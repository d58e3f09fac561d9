#include "backends/gloo/gloo_communicator.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <utility>

#include "absl/base/dynamic_annotations.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "glog/logging.h"
#include "gloo/allgather.h"
#include "gloo/allreduce.h"
#include "gloo/barrier.h"
#include "gloo/broadcast.h"
#include "gloo/common/error.h"
#include "gloo/common/logging.h"
#include "gloo/math.h"
#include "gloo/rendezvous/context.h"
#include "gloo/rendezvous/store.h"
#include "gloo/transport/tcp/device.h"
#include "gloo/transport/unbound_buffer.h"
#include "gloo/types.h"
#include "runtime/status_macros.h"

namespace tp {

// ---- The consistency envelope ----

namespace {

constexpr int kHeaderDims = 14;
// "tpgloo" and a format version.
constexpr int64_t kEnvelopeMagic = 0x7470676c6f6f0001;

}  // namespace

// Every field is an int64 so that the header has one layout on every rank.
struct GlooCommunicator::Envelope {
  int64_t magic = kEnvelopeMagic;
  int64_t call = 0;        // collective: call number; Send/Recv: message
                           // number between the two ranks
  int64_t kind = 0;        // OpKind
  int64_t dtype = -1;      // DType, or -1
  int64_t reduce_op = -1;  // ReduceOp, or -1
  int64_t root = -1;       // Broadcast root; Send/Recv: the sender
  int64_t peer = -1;       // Send/Recv: the receiver
  int64_t numel = -1;
  int64_t ndim = -1;
  int64_t error_bytes = 0;  // > 0: the payload holds this rank's error text
  // The shape; with more than kHeaderDims dimensions the last entry holds the
  // product of the remaining ones.
  int64_t dims[kHeaderDims] = {};
};

namespace {

using Envelope = GlooCommunicator::Envelope;

constexpr size_t kHeaderBytes = sizeof(Envelope);
static_assert(kHeaderBytes == 192,
              "the envelope header is part of the wire format");
static_assert(kGlooInlineBytes % 8 == 0, "payload must keep 8-byte alignment");
constexpr size_t kEnvelopeBytes = kHeaderBytes + kGlooInlineBytes;
constexpr size_t kEnvelopeWords = kEnvelopeBytes / sizeof(uint64_t);

// Gloo tags. Gloo's collectives build their slots from a per-collective
// prefix and the tag; the envelope all-gather must not share a slot with a
// data all-gather. Data tags are fingerprints of the call, from
// kFirstDataTag up (see DataTag).
constexpr uint32_t kEnvelopeTag = 1;
constexpr uint32_t kHandshakeTag = 2;
constexpr uint32_t kGoodbyeTag = 3;
// The destructor waits at most this long (or the timeout, if shorter) for the
// other ranks to destroy their communicators too.
constexpr absl::Duration kMaxGoodbyeWait = absl::Seconds(60);
// Send/Recv slots: prefix 0x40 is not used by Gloo (its collectives use
// 0x01-0x08); bits 24..55 hold the message number between the two ranks.
constexpr uint64_t kP2PSlotPrefix = 0x40;
// The ring reduce-scatter's slots: prefix 0x41, the call's fingerprint tag in
// bits 24..55, the step below.
constexpr uint64_t kRingSlotPrefix = 0x41;

enum class OpKind : int64_t {
  kAllReduce = 1,
  kBroadcast = 2,
  kAllGather = 3,
  kReduceScatter = 4,
  kBarrier = 5,
  kSend = 6,
  kRecv = 7,
};

const char* OpKindName(int64_t kind) {
  switch (static_cast<OpKind>(kind)) {
    case OpKind::kAllReduce:
      return "AllReduce";
    case OpKind::kBroadcast:
      return "Broadcast";
    case OpKind::kAllGather:
      return "AllGather";
    case OpKind::kReduceScatter:
      return "ReduceScatter";
    case OpKind::kBarrier:
      return "Barrier";
    case OpKind::kSend:
      return "Send";
    case OpKind::kRecv:
      return "Recv";
  }
  return "unknown call";
}

// Thrown by the store adapter (through Gloo's rendezvous) and caught in
// Create, carrying the store's status.
class StoreFailure : public std::runtime_error {
 public:
  explicit StoreFailure(absl::Status status)
      : std::runtime_error(std::string(status.message())),
        status_(std::move(status)) {}
  const absl::Status& status() const { return status_; }

 private:
  absl::Status status_;
};

// gloo::rendezvous::Store over a tp::Store. Keys get the prefix "gloo/";
// Gloo's full-mesh rendezvous uses the decimal rank as key, so a missing key
// names a missing rank. Every wait is bounded by one overall deadline.
class GlooStoreAdapter : public gloo::rendezvous::Store {
 public:
  GlooStoreAdapter(tp::Store& store, int size, absl::Time deadline,
                   absl::Duration timeout)
      : store_(store), size_(size), deadline_(deadline), timeout_(timeout) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    absl::Status s =
        store_.Set(Key(key), absl::string_view(data.data(), data.size()));
    if (!s.ok()) throw StoreFailure(std::move(s));
  }

  std::vector<char> get(const std::string& key) override {
    absl::StatusOr<std::string> v = store_.Get(Key(key), Remaining());
    if (!v.ok()) throw StoreFailure(Explain(v.status(), {key}));
    return std::vector<char>(v->begin(), v->end());
  }

  void wait(const std::vector<std::string>& keys) override { WaitFor(keys); }

  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& /*timeout*/) override {
    // The overall rendezvous deadline applies, not Gloo's per-key timeout.
    WaitFor(keys);
  }

 private:
  std::string Key(const std::string& key) const {
    return absl::StrCat("gloo/", key);
  }

  absl::Duration Remaining() const {
    return std::max(deadline_ - absl::Now(), absl::Milliseconds(1));
  }

  void WaitFor(const std::vector<std::string>& keys) {
    std::vector<std::string> full;
    full.reserve(keys.size());
    for (const std::string& k : keys) full.push_back(Key(k));
    absl::Status s = store_.Wait(full, Remaining());
    if (!s.ok()) throw StoreFailure(Explain(s, keys));
  }

  // Turns "key gloo/3 missing" into "rank 3 did not join".
  absl::Status Explain(const absl::Status& s,
                       const std::vector<std::string>& keys) const {
    if (s.code() != absl::StatusCode::kDeadlineExceeded) {
      return absl::Status(
          s.code(), absl::StrCat("gloo rendezvous through the store failed: ",
                                 s.message()));
    }
    std::vector<std::string> missing;
    for (const std::string& k : keys) {
      absl::StatusOr<bool> present = store_.Check({Key(k)});
      if (!present.ok() || !*present) missing.push_back(k);
    }
    if (missing.empty()) missing = keys;
    return absl::DeadlineExceededError(absl::StrCat(
        "gloo rendezvous: rank", missing.size() > 1 ? "s " : " ",
        absl::StrJoin(missing, ", "), " of ", size_, " did not join within ",
        absl::FormatDuration(timeout_),
        " (store keys under \"gloo/\" missing; ", s.message(), ")"));
  }

  tp::Store& store_;
  const int size_;
  const absl::Time deadline_;
  const absl::Duration timeout_;
};

// ---- Element types and reductions ----

static_assert(sizeof(gloo::float16) == 2, "gloo::float16 must be binary16");
static_assert(sizeof(BFloat16) == 2, "BFloat16 must be 2 bytes");

// Calls fn(G{}) with G the element type Gloo handles for `dtype`.
template <typename Fn>
void DispatchGlooType(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      fn(float{});
      return;
    case DType::kFloat64:
      fn(double{});
      return;
    case DType::kFloat16:
      fn(gloo::float16{});
      return;
    case DType::kBFloat16:
      fn(BFloat16{});
      return;
    case DType::kInt32:
      fn(int32_t{});
      return;
    case DType::kInt64:
      fn(int64_t{});
      return;
  }
}

// Gloo's options API takes an untyped reduction: c[i] = a[i] op b[i].
using RawReduceFn = void (*)(void*, const void*, const void*, size_t);

// bfloat16: Gloo has no type for it, so each step converts to float32,
// applies the op and rounds back to nearest even (as Gloo's float16 does).
struct AddOp {
  float operator()(float a, float b) const { return a + b; }
};
struct MulOp {
  float operator()(float a, float b) const { return a * b; }
};
struct MaxOp {
  float operator()(float a, float b) const { return std::max(a, b); }
};
struct MinOp {
  float operator()(float a, float b) const { return std::min(a, b); }
};

template <typename Op>
void Bf16Reduce(void* c_, const void* a_, const void* b_, size_t n) {
  auto* c = static_cast<BFloat16*>(c_);
  const auto* a = static_cast<const BFloat16*>(a_);
  const auto* b = static_cast<const BFloat16*>(b_);
  const Op op;
  for (size_t i = 0; i < n; ++i) {
    c[i].bits = FloatToBFloat16Bits(
        op(BFloat16BitsToFloat(a[i].bits), BFloat16BitsToFloat(b[i].bits)));
  }
}

template <typename G>
RawReduceFn RawReduce(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return &gloo::sum<G>;
    case ReduceOp::kProduct:
      return &gloo::product<G>;
    case ReduceOp::kMax:
      return &gloo::max<G>;
    case ReduceOp::kMin:
      return &gloo::min<G>;
  }
  return &gloo::sum<G>;
}

template <>
RawReduceFn RawReduce<BFloat16>(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return &Bf16Reduce<AddOp>;
    case ReduceOp::kProduct:
      return &Bf16Reduce<MulOp>;
    case ReduceOp::kMax:
      return &Bf16Reduce<MaxOp>;
    case ReduceOp::kMin:
      return &Bf16Reduce<MinOp>;
  }
  return &Bf16Reduce<AddOp>;
}

// kAvg's division: rounded by the type's own division (toward zero for
// integers).
template <typename T>
T DivideElement(T v, int n) {
  return static_cast<T>(v / static_cast<T>(n));
}
template <>
Half DivideElement(Half v, int n) {
  return ToHalf(ToFloat(v) / static_cast<float>(n));
}
template <>
BFloat16 DivideElement(BFloat16 v, int n) {
  return ToBFloat16(ToFloat(v) / static_cast<float>(n));
}

void DivideBySize(Tensor& t, int n) {
  if (n == 1) return;
  DispatchDType(t.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* p = static_cast<T*>(t.raw_data());
    const int64_t count = t.numel();
    for (int64_t i = 0; i < count; ++i) p[i] = DivideElement(p[i], n);
  });
}

// Reduces `n` payloads of `count` elements each (payload(r) for r in rank
// order) into `out`: out = p0 op p1 op ... (left to right).
template <typename PayloadFn>
void ReduceInRankOrder(DType dtype, ReduceOp op, int n, int64_t count,
                       void* out, PayloadFn payload) {
  DispatchGlooType(dtype, [&](auto tag) {
    using G = decltype(tag);
    const RawReduceFn fn = RawReduce<G>(op);
    if (count == 0) return;
    std::memcpy(out, payload(0), count * sizeof(G));
    for (int r = 1; r < n; ++r) fn(out, out, payload(r), count);
  });
}

// ---- Validation and messages ----

absl::Status ValidateTensor(const Tensor& t, absl::string_view op,
                            absl::string_view name) {
  if (!t.defined()) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": `", name, "` is an undefined tensor"));
  }
  if (!t.device().is_cpu()) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": `", name, "` is on ", t.device().ToString(),
                     "; the gloo backend moves CPU tensors only"));
  }
  if (!t.is_contiguous()) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": `", name, "` ", ShapeToString(t.shape()),
                     " is not contiguous; pass t.Contiguous()"));
  }
  return absl::OkStatus();
}

// Checks out = concat of size pieces of `piece` along dim 0: `whole` has
// dim(0) == size * piece.dim(0) and the same other dims and dtype.
absl::Status ValidateSplit(const Tensor& whole, absl::string_view whole_name,
                           const Tensor& piece, absl::string_view piece_name,
                           int size, absl::string_view op) {
  if (whole.dtype() != piece.dtype()) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": `", whole_name, "` is ", DTypeName(whole.dtype()),
                     " but `", piece_name, "` is ", DTypeName(piece.dtype())));
  }
  if (piece.ndim() == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": `", piece_name,
        "` is a scalar; it needs a dimension 0 (reshape it to [1])"));
  }
  Shape expected = piece.shape();
  expected[0] *= size;
  if (whole.shape() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": `", whole_name, "` has shape ", ShapeToString(whole.shape()),
        " but must have ", ShapeToString(expected), " (size() = ", size,
        " times `", piece_name, "` ", ShapeToString(piece.shape()),
        " along dim 0)"));
  }
  return absl::OkStatus();
}

Envelope MakeHeader(OpKind kind, const Tensor* t, int64_t reduce_op,
                    int64_t root) {
  Envelope h;
  h.kind = static_cast<int64_t>(kind);
  h.reduce_op = reduce_op;
  h.root = root;
  if (t != nullptr && t->defined()) {
    h.dtype = static_cast<int64_t>(t->dtype());
    h.numel = t->numel();
    h.ndim = t->ndim();
    for (int d = 0; d < t->ndim(); ++d) {
      if (d < kHeaderDims - 1 || t->ndim() == kHeaderDims) {
        h.dims[d] = t->dim(d);
      } else {
        h.dims[kHeaderDims - 1] =
            (d == kHeaderDims - 1 ? 1 : h.dims[kHeaderDims - 1]) * t->dim(d);
      }
    }
  }
  return h;
}

// Same call, same arguments (the error fields aside). For Send/Recv pairs the
// kinds are complementary instead of equal.
bool SameCall(const Envelope& a, const Envelope& b, bool p2p) {
  if (p2p) {
    if (a.kind + b.kind != static_cast<int64_t>(OpKind::kSend) +
                               static_cast<int64_t>(OpKind::kRecv) ||
        a.kind == b.kind) {
      return false;
    }
  } else if (a.kind != b.kind) {
    return false;
  }
  if (a.magic != b.magic || a.call != b.call || a.dtype != b.dtype ||
      a.reduce_op != b.reduce_op || a.root != b.root || a.peer != b.peer ||
      a.numel != b.numel || a.ndim != b.ndim) {
    return false;
  }
  return std::equal(std::begin(a.dims), std::end(a.dims), std::begin(b.dims));
}

std::string Describe(const Envelope& h) {
  if (h.magic != kEnvelopeMagic) return "an incompatible tensor_parallel build";
  std::string s = absl::StrCat(OpKindName(h.kind), "(");
  std::vector<std::string> parts;
  if (h.dtype >= 0) {
    std::string shape = "[";
    for (int64_t d = 0; d < std::min<int64_t>(h.ndim, kHeaderDims); ++d) {
      absl::StrAppend(&shape, d > 0 ? ", " : "", h.dims[d]);
    }
    if (h.ndim > kHeaderDims) absl::StrAppend(&shape, ", ...");
    absl::StrAppend(&shape, "]");
    parts.push_back(
        absl::StrCat(DTypeName(static_cast<DType>(h.dtype)), " ", shape));
  }
  if (h.reduce_op >= 0) {
    parts.push_back(
        std::string(ReduceOpName(static_cast<ReduceOp>(h.reduce_op))));
  }
  const auto kind = static_cast<OpKind>(h.kind);
  if (kind == OpKind::kSend || kind == OpKind::kRecv) {
    parts.push_back(absl::StrCat("rank ", h.root, " -> rank ", h.peer,
                                 ", message #", h.call));
  } else {
    if (h.root >= 0) parts.push_back(absl::StrCat("root ", h.root));
    parts.push_back(absl::StrCat("call #", h.call));
  }
  absl::StrAppend(&s, absl::StrJoin(parts, ", "), ")");
  return s;
}

std::chrono::milliseconds Remaining(absl::Time deadline) {
  const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
  return std::chrono::milliseconds(std::max<int64_t>(ms, 1));
}

bool IsTimeoutMessage(absl::string_view what) {
  const std::string lower = absl::AsciiStrToLower(what);
  return absl::StrContains(lower, "timed out") ||
         absl::StrContains(lower, "timeout");
}

// Bits 3..23 of a Send/Recv data slot with check_consistency=off (the other
// modes compare headers first and leave them 0): 21 bits of FNV-1a over the
// tensor's dtype and shape, so a Send and a Recv that disagree use different
// slots and exchange no data (but for a 2^-21 chance of equal
// fingerprints). Before, such a pair "succeeded": a test saw OK on both
// ranks for a Recv 3 elements longer than its Send and for float32 read as
// int32. Now they time out instead. (An empty tensor never reaches a slot:
// its side returns at once, and the other side, if not empty, times out.)
uint64_t P2PFingerprint(const Tensor& t) {
  uint64_t hash = 0xcbf29ce484222325ull;
  auto mix = [&hash](int64_t v) {
    for (int i = 0; i < 8; ++i) {
      hash = (hash ^ ((static_cast<uint64_t>(v) >> (8 * i)) & 0xff)) *
             0x100000001b3ull;
    }
  };
  mix(static_cast<int64_t>(t.dtype()));
  mix(t.ndim());
  for (int64_t d : t.shape()) mix(d);
  return (hash ^ (hash >> 21) ^ (hash >> 42)) & ((uint64_t{1} << 21) - 1);
}

// Without the header exchange a Send and a Recv that disagree time out
// (their slots differ; the later side may see the connection closed by the
// one that timed out first): say so in the error.
absl::Status P2PTimeoutHint(absl::Status& broken, const absl::Status& s,
                            ConsistencyCheck mode) {
  if (mode != ConsistencyCheck::kOff ||
      (s.code() != absl::StatusCode::kDeadlineExceeded &&
       s.code() != absl::StatusCode::kUnavailable)) {
    return s;
  }
  broken = absl::Status(
      s.code(), absl::StrCat(s.message(),
                             " (check_consistency=off: a Send and a Recv that "
                             "differ in shape or dtype wait for each other "
                             "until the timeout, and the side that gives up "
                             "first closes the connection)"));
  return broken;
}

uint64_t P2PSlot(uint32_t message, int src, int dst, int which,
                 uint64_t fingerprint = 0) {
  const uint64_t direction = src < dst ? 0 : 3;
  return (kP2PSlotPrefix << 56) | (static_cast<uint64_t>(message) << 24) |
         (fingerprint << 3) | (direction + static_cast<uint64_t>(which));
}

bool IsLoopback(const struct sockaddr* addr) {
  if (addr->sa_family == AF_INET) {
    const auto* in = reinterpret_cast<const struct sockaddr_in*>(addr);
    return (ntohl(in->sin_addr.s_addr) >> 24) == 127;
  }
  if (addr->sa_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const struct sockaddr_in6*>(addr);
    return IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr);
  }
  return false;
}

// The local address whose route reaches `master_addr` (a connected UDP
// socket sends nothing; getsockname reveals the source address the kernel
// chose).
absl::StatusOr<std::string> LocalAddressToward(const std::string& master_addr) {
  if (master_addr.empty()) return std::string("127.0.0.1");
  struct addrinfo hints;
  std::memset(&hints, 0, sizeof(hints));
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  struct addrinfo* result = nullptr;
  const int rv = getaddrinfo(master_addr.c_str(), "9", &hints, &result);
  if (rv != 0 || result == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("gloo: cannot resolve master address \"", master_addr,
                     "\": ", gai_strerror(rv)));
  }
  std::unique_ptr<struct addrinfo, decltype(&freeaddrinfo)> guard(
      result, &freeaddrinfo);
  if (IsLoopback(result->ai_addr)) return std::string("127.0.0.1");
  const int fd = socket(result->ai_family, SOCK_DGRAM, 0);
  if (fd < 0) {
    return absl::UnavailableError(
        absl::StrCat("gloo: socket(): ", std::strerror(errno)));
  }
  struct sockaddr_storage local;
  socklen_t len = sizeof(local);
  const bool ok =
      connect(fd, result->ai_addr, result->ai_addrlen) == 0 &&
      getsockname(fd, reinterpret_cast<struct sockaddr*>(&local), &len) == 0;
  const int err = errno;
  close(fd);
  if (!ok) {
    return absl::UnavailableError(
        absl::StrCat("gloo: no route to master address \"", master_addr,
                     "\": ", std::strerror(err)));
  }
  char text[INET6_ADDRSTRLEN] = {};
  const void* src =
      local.ss_family == AF_INET
          ? static_cast<const void*>(
                &reinterpret_cast<struct sockaddr_in*>(&local)->sin_addr)
          : static_cast<const void*>(
                &reinterpret_cast<struct sockaddr_in6*>(&local)->sin6_addr);
  if (inet_ntop(local.ss_family, src, text, sizeof(text)) == nullptr) {
    return absl::InternalError(
        absl::StrCat("gloo: inet_ntop: ", std::strerror(errno)));
  }
  return std::string(text);
}

absl::Status StatusFromException(absl::string_view what, int rank, int size,
                                 absl::Duration timeout) {
  // Called inside a catch block: rethrow to classify.
  const std::string where =
      absl::StrCat("gloo ", what, " on rank ", rank, " of ", size);
  try {
    throw;
  } catch (const StoreFailure& e) {
    return absl::Status(e.status().code(),
                        absl::StrCat(where, ": ", e.status().message()));
  } catch (const gloo::IoException& e) {
    if (IsTimeoutMessage(e.what())) {
      return absl::DeadlineExceededError(absl::StrCat(
          where, ": no answer from a peer within ",
          absl::FormatDuration(timeout),
          " (a rank is missing, too slow, dead, or made a different call): ",
          e.what()));
    }
    return absl::UnavailableError(
        absl::StrCat(where, ": lost the connection to a peer: ", e.what()));
  } catch (const gloo::EnforceNotMet& e) {
    return absl::InternalError(
        absl::StrCat(where, ": Gloo check failed: ", e.what()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(where, ": ", e.what()));
  } catch (...) {
    return absl::InternalError(absl::StrCat(where, ": unknown exception"));
  }
}

}  // namespace

// ---- Options ----

absl::string_view ConsistencyCheckName(ConsistencyCheck check) {
  switch (check) {
    case ConsistencyCheck::kOff:
      return "off";
    case ConsistencyCheck::kFirstUse:
      return "first_use";
    case ConsistencyCheck::kAlways:
      return "always";
  }
  return "unknown";
}

absl::StatusOr<GlooOptions> ParseGlooOptions(
    const std::map<std::string, std::string>& options) {
  GlooOptions parsed;
  for (const auto& [key, value] : options) {
    if (!absl::StartsWith(key, "gloo.")) continue;
    if (key == "gloo.hostname") {
      parsed.hostname = value;
    } else if (key == "gloo.iface") {
      parsed.iface = value;
    } else if (key == "gloo.check_consistency") {
      const std::string v = absl::AsciiStrToLower(value);
      if (v == "first_use") {
        parsed.check_consistency = ConsistencyCheck::kFirstUse;
      } else if (v == "always" || v == "true" || v == "1") {
        parsed.check_consistency = ConsistencyCheck::kAlways;
      } else if (v == "off" || v == "false" || v == "0") {
        parsed.check_consistency = ConsistencyCheck::kOff;
      } else {
        return absl::InvalidArgumentError(absl::StrCat(
            "gloo.check_consistency must be first_use, always or off "
            "(true/1: always, false/0: off), got \"",
            value, "\""));
      }
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "unknown gloo option \"", key,
          "\"; known: gloo.hostname, gloo.iface, gloo.check_consistency"));
    }
  }
  return parsed;
}

// ---- Construction ----

GlooCommunicator::GlooCommunicator(int rank, int size, absl::Duration timeout,
                                   GlooOptions options, std::string name)
    : name_(std::move(name)),
      rank_(rank),
      size_(size),
      timeout_(timeout),
      options_(std::move(options)),
      sent_(size, 0),
      received_(size, 0),
      envelope_out_(kEnvelopeWords, 0),
      envelope_in_(kEnvelopeWords * std::max(size, 2), 0) {}

GlooCommunicator::~GlooCommunicator() {
  absl::MutexLock lock(&mu_);
  try {
    if (context_ != nullptr && broken_.ok()) {
      // Closing a connection poisons every Gloo buffer of the peer on it,
      // even one whose data has already arrived; a rank that left right
      // after its last call could fail a peer still finishing that call.
      // So leave together: a barrier (errors ignored) ensures every rank has
      // returned from its last call before anyone closes.
      gloo::BarrierOptions opts(context_);
      opts.setTag(kGoodbyeTag);
      opts.setTimeout(std::chrono::milliseconds(
          absl::ToInt64Milliseconds(std::min(timeout_, kMaxGoodbyeWait))));
      gloo::barrier(opts);
    }
  } catch (const std::exception& e) {
    VLOG(1) << "gloo: rank " << rank_
            << " left without its peers: " << e.what();
  }
  try {
    context_.reset();
    device_.reset();
  } catch (...) {
    LOG(ERROR) << "gloo: exception while closing the communicator of rank "
               << rank_;
  }
}

namespace {

// Gloo's TCP pairs write with writev(), which raises SIGPIPE when the peer has
// died. Its default action kills the process, so a lost peer would take the
// survivors down instead of failing their collective with kUnavailable.
// Ignored once per process, and only when nobody installed a handler.
void IgnoreSigpipeOnce() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction current;
    if (sigaction(SIGPIPE, nullptr, &current) == 0 &&
        current.sa_handler == SIG_DFL) {
      signal(SIGPIPE, SIG_IGN);
    }
  });
}

}  // namespace

absl::StatusOr<std::unique_ptr<GlooCommunicator>> GlooCommunicator::Create(
    const BackendContext& ctx, const GlooOptions& options,
    absl::string_view name) {
  if (ctx.size < 1 || ctx.rank < 0 || ctx.rank >= ctx.size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gloo: rank ", ctx.rank, " is out of range for a group of ", ctx.size));
  }
  if (!ctx.device.is_cpu()) {
    return absl::InvalidArgumentError(
        absl::StrCat("gloo: the gloo backend runs on the CPU, not ",
                     ctx.device.ToString(), " (use \"nccl\" for CUDA)"));
  }
  if (ctx.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("gloo: the timeout must be positive");
  }
  std::unique_ptr<GlooCommunicator> comm(new GlooCommunicator(
      ctx.rank, ctx.size, ctx.timeout, options, std::string(name)));
  if (ctx.size == 1) return comm;
  IgnoreSigpipeOnce();
  if (ctx.store == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("gloo: a store is required for a group of ", ctx.size));
  }

  std::string address;
  if (options.iface.empty()) {
    if (!options.hostname.empty()) {
      address = options.hostname;
    } else {
      ASSIGN_OR_RETURN(address, LocalAddressToward(ctx.master_addr));
    }
  }
  const absl::Time deadline = absl::Now() + ctx.timeout;
  try {
    gloo::transport::tcp::attr attr;
    if (!options.iface.empty()) {
      attr.iface = options.iface;
    } else {
      attr.hostname = address;
    }
    try {
      comm->device_ = gloo::transport::tcp::CreateDevice(attr);
    } catch (const std::exception& e) {
      return absl::InvalidArgumentError(
          absl::StrCat("gloo: cannot bind the TCP transport to ",
                       options.iface.empty()
                           ? absl::StrCat("address \"", address, "\"")
                           : absl::StrCat("interface \"", options.iface, "\""),
                       ": ", e.what()));
    }
    comm->bound_address_ = options.iface.empty() ? address : options.iface;
    auto context =
        std::make_shared<gloo::rendezvous::Context>(ctx.rank, ctx.size);
    context->setTimeout(std::chrono::milliseconds(
        std::max<int64_t>(absl::ToInt64Milliseconds(ctx.timeout), 1)));
    comm->store_ = ctx.store;
    GlooStoreAdapter adapter(*ctx.store, ctx.size, deadline, ctx.timeout);
    context->connectFullMesh(adapter, comm->device_);
    comm->context_ = std::move(context);
  } catch (...) {
    return StatusFromException("rendezvous", ctx.rank, ctx.size, ctx.timeout);
  }
  absl::MutexLock lock(&comm->mu_);
  RETURN_IF_ERROR(comm->Handshake(deadline));
  return comm;
}

absl::Status GlooCommunicator::Handshake(absl::Time deadline) {
  // connectFullMesh returns when this rank's connections are up, not every
  // rank's: a rank that left right after it could cut a slower peer off in
  // the middle of its rendezvous. An all-gather completes only when every
  // rank has joined, and compares the settings that must agree.
  const int64_t mine[3] = {kEnvelopeMagic,
                           static_cast<int64_t>(options_.check_consistency),
                           static_cast<int64_t>(kGlooInlineBytes)};
  std::vector<int64_t> all(3 * size_);
  try {
    gloo::AllgatherOptions opts(context_);
    opts.setInput<int64_t>(const_cast<int64_t*>(mine), 3);
    opts.setOutput<int64_t>(all.data(), all.size());
    opts.setTag(kHandshakeTag);
    opts.setTimeout(Remaining(deadline));
    gloo::allgather(opts);
  } catch (...) {
    return StatusFromException("rendezvous", rank_, size_, timeout_);
  }
  for (int r = 0; r < size_; ++r) {
    if (all[3 * r] != mine[0] || all[3 * r + 2] != mine[2]) {
      return absl::InvalidArgumentError(
          absl::StrCat("gloo rendezvous on rank ", rank_, ": rank ", r,
                       " runs an incompatible build of the gloo backend"));
    }
    if (all[3 * r + 1] != mine[1]) {
      const int64_t theirs = all[3 * r + 1];
      const bool known = theirs >= 0 && theirs <= 2;
      return absl::InvalidArgumentError(absl::StrCat(
          "gloo rendezvous on rank ", rank_, ": gloo.check_consistency is ",
          ConsistencyCheckName(options_.check_consistency), " here but ",
          known ? ConsistencyCheckName(static_cast<ConsistencyCheck>(theirs))
                : absl::string_view("unknown"),
          " on rank ", r, "; every rank must use the same setting"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateGlooCommunicator(
    const BackendContext& ctx) {
  ASSIGN_OR_RETURN(GlooOptions options, ParseGlooOptions(ctx.options));
  ASSIGN_OR_RETURN(std::unique_ptr<GlooCommunicator> comm,
                   GlooCommunicator::Create(ctx, options));
  return std::unique_ptr<Communicator>(std::move(comm));
}

// ---- Plumbing ----

template <typename Fn>
absl::Status GlooCommunicator::Guarded(absl::string_view what, Fn&& fn) {
  try {
    fn();
    return absl::OkStatus();
  } catch (...) {
    broken_ = StatusFromException(what, rank_, size_, timeout_);
    return broken_;
  }
}

absl::Status GlooCommunicator::CheckUsable(absl::string_view what) const {
  if (broken_.ok()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "gloo ", what, " on rank ", rank_,
      ": the communicator is unusable after an earlier error; destroy it and "
      "create a new one. The error was: ",
      broken_.ToString()));
}

const char* GlooCommunicator::PeerPayload(int r) const {
  return reinterpret_cast<const char*>(
             envelope_in_.data() + static_cast<size_t>(r) * kEnvelopeWords) +
         kHeaderBytes;
}

namespace {

// Writes the header, and the error text or the inline payload, into `out`.
void FillEnvelope(Envelope h, const absl::Status& local_error,
                  const void* payload, size_t payload_bytes, uint64_t* out) {
  char* bytes = reinterpret_cast<char*>(out);
  if (!local_error.ok()) {
    std::string text(local_error.message());
    if (text.size() > kGlooInlineBytes) text.resize(kGlooInlineBytes);
    h.error_bytes = static_cast<int64_t>(text.size());
    std::memcpy(bytes + kHeaderBytes, text.data(), text.size());
  } else if (payload_bytes > 0) {
    std::memcpy(bytes + kHeaderBytes, payload, payload_bytes);
  }
  std::memcpy(bytes, &h, sizeof(h));
}

Envelope ReadHeader(const uint64_t* envelope) {
  Envelope h;
  std::memcpy(static_cast<void*>(&h), envelope, sizeof(h));
  return h;
}

std::string ErrorText(const Envelope& h, const uint64_t* envelope) {
  const int64_t n = std::clamp<int64_t>(h.error_bytes, 0, kGlooInlineBytes);
  return std::string(reinterpret_cast<const char*>(envelope) + kHeaderBytes, n);
}

}  // namespace

absl::Status GlooCommunicator::ExchangeEnvelopes(
    const Envelope& mine, const absl::Status& local_error,
    const void* inline_payload, size_t inline_bytes, absl::Time deadline) {
  const Envelope& h = mine;
  FillEnvelope(h, local_error, inline_payload, inline_bytes,
               envelope_out_.data());
  const char* what = OpKindName(h.kind);
  RETURN_IF_ERROR(Guarded(what, [&] {
    gloo::AllgatherOptions opts(context_);
    opts.setInput<uint64_t>(envelope_out_.data(), kEnvelopeWords);
    opts.setOutput<uint64_t>(envelope_in_.data(), kEnvelopeWords * size_);
    opts.setTag(kEnvelopeTag);
    opts.setTimeout(Remaining(deadline));
    gloo::allgather(opts);
  }));

  std::vector<Envelope> headers(size_);
  std::vector<std::string> errors;
  for (int r = 0; r < size_; ++r) {
    const uint64_t* env = envelope_in_.data() + r * kEnvelopeWords;
    headers[r] = ReadHeader(env);
    if (headers[r].error_bytes > 0) {
      errors.push_back(
          absl::StrCat("rank ", r, ": ", ErrorText(headers[r], env)));
    }
  }
  if (!errors.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("gloo ", what, " on rank ", rank_, ": ",
                     errors.size() == 1 ? "a rank" : "ranks",
                     " rejected the arguments: ", absl::StrJoin(errors, "; ")));
  }
  bool same = true;
  for (int r = 1; r < size_ && same; ++r) {
    same = SameCall(headers[0], headers[r], /*p2p=*/false);
  }
  if (same) return absl::OkStatus();
  // Group the ranks by what they called, in order of first appearance.
  std::vector<std::pair<std::string, std::vector<int>>> groups;
  for (int r = 0; r < size_; ++r) {
    bool found = false;
    for (auto& g : groups) {
      if (SameCall(headers[g.second[0]], headers[r], false)) {
        g.second.push_back(r);
        found = true;
        break;
      }
    }
    if (!found) groups.push_back({Describe(headers[r]), {r}});
  }
  std::vector<std::string> lines;
  for (const auto& g : groups) {
    lines.push_back(absl::StrCat(g.first, " on rank",
                                 g.second.size() > 1 ? "s " : " ",
                                 absl::StrJoin(g.second, ", ")));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "gloo ", what, " on rank ", rank_,
      ": ranks disagree on the call: ", absl::StrJoin(lines, "; "),
      ". Every rank must make the same collective calls in the same order "
      "with the same shapes and dtypes"));
}

int64_t GlooCommunicator::envelope_exchanges() const {
  absl::MutexLock lock(&mu_);
  return envelope_exchanges_;
}

namespace {

// How many verified signatures a group remembers.
constexpr size_t kMaxVerified = 64;
// Tags below this are the backend's own (envelope, handshake, goodbye).
constexpr uint32_t kFirstDataTag = 16;
// Longest wait for the peers' descriptions after a timeout (peers that
// disagree time out at about the same moment, give or take scheduling).
constexpr absl::Duration kMaxDiagnosisWait = absl::Seconds(3);

// The call without its number and error fields: what ranks must agree on.
Envelope Signature(const Envelope& h) {
  Envelope s = h;
  s.call = 0;
  s.error_bytes = 0;
  return s;
}

}  // namespace

bool GlooCommunicator::IsVerified(const Envelope& h) const {
  const Envelope sig = Signature(h);
  for (const Envelope& v : verified_) {
    if (SameCall(v, sig, /*p2p=*/false)) return true;
  }
  return false;
}

void GlooCommunicator::RememberVerified(const Envelope& h) {
  // Every rank of a usable group makes the same calls, so every rank's list
  // changes the same way, including the order (least recently used first).
  const Envelope sig = Signature(h);
  for (auto it = verified_.begin(); it != verified_.end(); ++it) {
    if (SameCall(*it, sig, /*p2p=*/false)) {
      std::rotate(it, it + 1, verified_.end());
      return;
    }
  }
  if (verified_.size() == kMaxVerified) verified_.erase(verified_.begin());
  verified_.push_back(sig);
}

uint32_t GlooCommunicator::DataTag(const Envelope& h) {
  // FNV-1a over the signature's bytes: stable across processes and builds
  // (absl::Hash is seeded per process, so ranks would disagree).
  const Envelope sig = Signature(h);
  const auto* bytes = reinterpret_cast<const unsigned char*>(&sig);
  uint64_t hash = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < sizeof(sig); ++i) {
    hash = (hash ^ bytes[i]) * 0x100000001b3ull;
  }
  const uint64_t folded = (hash >> 32) ^ (hash & 0xffffffffull);
  return kFirstDataTag +
         static_cast<uint32_t>(folded % (uint64_t{0xffffffff} - kFirstDataTag));
}

absl::Status GlooCommunicator::Agree(Envelope& h, const absl::Status& local,
                                     bool inline_data, const void* payload,
                                     size_t payload_bytes, absl::Time deadline,
                                     bool* exchanged, bool inline_skips) {
  h.call = calls_++;
  *exchanged = false;
  switch (options_.check_consistency) {
    case ConsistencyCheck::kOff:
      // Peers that accepted their arguments wait for this rank until they
      // time out; their diagnosis will find why.
      if (!local.ok()) PostCall(h, local);
      return local;
    case ConsistencyCheck::kFirstUse:
      // A rank whose arguments fail locally exchanges the envelope even for
      // a verified signature (the error is not part of the signature): its
      // peers, which skip, then time out, and the diagnosis names the error.
      if (local.ok() && (!inline_data || inline_skips) && IsVerified(h)) {
        RememberVerified(h);  // most recently used: evicted last
        return absl::OkStatus();
      }
      break;
    case ConsistencyCheck::kAlways:
      break;
  }
  *exchanged = true;
  ++envelope_exchanges_;
  const absl::Status agreed =
      ExchangeEnvelopes(h, local, inline_data ? payload : nullptr,
                        inline_data ? payload_bytes : 0, deadline);
  if (agreed.code() == absl::StatusCode::kDeadlineExceeded ||
      agreed.code() == absl::StatusCode::kUnavailable) {
    return Diagnose(h, agreed, local);
  }
  RETURN_IF_ERROR(agreed);
  if (options_.check_consistency == ConsistencyCheck::kFirstUse &&
      (!inline_data || inline_skips) &&
      h.kind != static_cast<int64_t>(OpKind::kBarrier)) {
    RememberVerified(h);
  }
  return absl::OkStatus();
}

template <typename Fn>
absl::Status GlooCommunicator::GuardedData(const Envelope& h, Fn&& fn) {
  const absl::Status s = Guarded(OpKindName(h.kind), std::forward<Fn>(fn));
  if (s.code() == absl::StatusCode::kDeadlineExceeded ||
      s.code() == absl::StatusCode::kUnavailable) {
    return Diagnose(h, s, absl::OkStatus());
  }
  return s;
}

std::string GlooCommunicator::DiagnosisKey(int64_t call, int rank) {
  return absl::StrCat("gloo/diag/", call, "/", rank);
}

std::string GlooCommunicator::CallText(const Envelope& h,
                                       const absl::Status& local) {
  if (local.ok()) return Describe(h);
  return absl::StrCat(Describe(h), ", rejected there: ", local.message());
}

void GlooCommunicator::PostCall(const Envelope& h, const absl::Status& local) {
  if (store_ == nullptr) return;
  // Best effort: a store that fails here fails the peers' diagnosis too.
  store_->Set(DiagnosisKey(h.call, rank_), CallText(h, local)).IgnoreError();
}

absl::Status GlooCommunicator::Diagnose(const Envelope& h,
                                        const absl::Status& error,
                                        const absl::Status& local) {
  broken_ = error;
  if (store_ == nullptr) return broken_;
  const std::string mine = CallText(h, local);
  if (!store_->Set(DiagnosisKey(h.call, rank_), mine).ok()) return broken_;
  // A peer that timed out too has posted, or will post within moments. A
  // lost connection (`error` kUnavailable) is often a peer that timed out
  // first: Gloo closes every connection of a rank whose wait times out, and
  // that peer posts right after. A dead peer never posts; the wait is
  // bounded, and a store failing otherwise ends it.
  const absl::Time until = absl::Now() + std::min(timeout_, kMaxDiagnosisWait);
  std::vector<std::pair<std::string, std::vector<int>>> groups = {
      {mine, {rank_}}};
  std::vector<int> missing;
  bool store_failed = false;
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    if (store_failed) {
      missing.push_back(r);
      continue;
    }
    absl::StatusOr<std::string> theirs =
        store_->Get(DiagnosisKey(h.call, r),
                    std::max(until - absl::Now(), absl::Milliseconds(1)));
    if (!theirs.ok()) {
      store_failed =
          theirs.status().code() != absl::StatusCode::kDeadlineExceeded;
      missing.push_back(r);
      continue;
    }
    bool found = false;
    for (auto& g : groups) {
      if (g.first == *theirs) {
        g.second.push_back(r);
        found = true;
        break;
      }
    }
    if (!found) groups.push_back({*theirs, {r}});
  }
  for (auto& g : groups) std::sort(g.second.begin(), g.second.end());
  if (groups.size() > 1) {
    std::vector<std::string> lines;
    for (const auto& g : groups) {
      lines.push_back(absl::StrCat(g.first, " on rank",
                                   g.second.size() > 1 ? "s " : " ",
                                   absl::StrJoin(g.second, ", ")));
    }
    broken_ = absl::InvalidArgumentError(absl::StrCat(
        "gloo ", OpKindName(h.kind), " on rank ", rank_,
        ": ranks disagree on the call: ", absl::StrJoin(lines, "; "),
        missing.empty() ? ""
                        : absl::StrCat("; no answer from rank(s) ",
                                       absl::StrJoin(missing, ", ")),
        ". Found after the call timed out (ranks that had verified a call "
        "like this before skip the consistency exchange, and calls that "
        "disagree never exchange data), so the communicator is unusable. "
        "Every rank must make the same collective calls in the same order "
        "with the same shapes and dtypes"));
  } else if (!missing.empty() && !store_failed &&
             (error.code() == absl::StatusCode::kDeadlineExceeded ||
              groups[0].second.size() > 1)) {
    // A lost connection with a peer that answered with this same call was a
    // timeout: a peer that timed out first closed the connection. (With no
    // answer at all it stays kUnavailable: the peer may have died.)
    broken_ = absl::DeadlineExceededError(
        absl::StrCat(error.message(), "; rank(s) ",
                     absl::StrJoin(missing, ", "), " did not reach ", mine));
  }
  return broken_;
}

absl::Status GlooCommunicator::ExchangeP2PHeaders(bool is_sender, int peer,
                                                  uint32_t seq, const Tensor& t,
                                                  const absl::Status& local,
                                                  absl::Time deadline) {
  const int src = is_sender ? rank_ : peer;
  const int dst = is_sender ? peer : rank_;
  const char* what = is_sender ? "Send" : "Recv";
  Envelope h = MakeHeader(is_sender ? OpKind::kSend : OpKind::kRecv, &t,
                          /*reduce_op=*/-1, /*root=*/src);
  h.peer = dst;
  h.call = seq;
  const bool inline_data =
      is_sender && local.ok() && t.nbytes() <= kGlooInlineBytes;
  FillEnvelope(h, local, inline_data ? t.raw_data() : nullptr,
               inline_data ? t.nbytes() : 0, envelope_out_.data());
  bool received = true;
  RETURN_IF_ERROR(Guarded(what, [&] {
    auto out =
        context_->createUnboundBuffer(envelope_out_.data(), kEnvelopeBytes);
    auto in =
        context_->createUnboundBuffer(envelope_in_.data(), kEnvelopeBytes);
    out->send(peer, P2PSlot(seq, src, dst, is_sender ? 0 : 1));
    in->recv(peer, P2PSlot(seq, src, dst, is_sender ? 1 : 0));
    received = in->waitRecv(Remaining(deadline));
    if (received) received = out->waitSend(Remaining(deadline));
  }));
  if (!received) {
    broken_ = absl::InternalError(
        absl::StrCat("gloo ", what, " on rank ", rank_,
                     ": the header exchange with rank ", peer, " was aborted"));
    return broken_;
  }
  const Envelope theirs = ReadHeader(envelope_in_.data());
  if (theirs.error_bytes > 0 || !local.ok()) {
    std::vector<std::string> errors;
    if (!local.ok()) {
      errors.push_back(absl::StrCat("rank ", rank_, ": ", local.message()));
    }
    if (theirs.error_bytes > 0) {
      errors.push_back(absl::StrCat("rank ", peer, ": ",
                                    ErrorText(theirs, envelope_in_.data())));
    }
    return absl::InvalidArgumentError(
        absl::StrCat("gloo ", what, " between rank ", src, " and rank ", dst,
                     ": rejected arguments: ", absl::StrJoin(errors, "; ")));
  }
  if (!SameCall(h, theirs, /*p2p=*/true)) {
    return absl::InvalidArgumentError(
        absl::StrCat("gloo ", what, " on rank ", rank_, ": rank ", src,
                     " called ", Describe(is_sender ? h : theirs), " but rank ",
                     dst, " called ", Describe(is_sender ? theirs : h),
                     "; a Recv must match its Send in shape and dtype"));
  }
  return absl::OkStatus();
}

// ---- Collectives ----

absl::Status GlooCommunicator::AllReduce(Tensor& t, ReduceOp op) {
  absl::MutexLock lock(&mu_);
  return AllReduceLocked(t, op);
}

absl::Status GlooCommunicator::AllReduceLocked(Tensor& t, ReduceOp op) {
  RETURN_IF_ERROR(CheckUsable("AllReduce"));
  const absl::Time deadline = absl::Now() + timeout_;
  const absl::Status local = ValidateTensor(t, "AllReduce", "t");
  if (size_ == 1) return local;  // every op of one value is the value
  const size_t nbytes = local.ok() ? t.nbytes() : 0;
  const bool inline_data = local.ok() && nbytes <= kGlooInlineBytes;
  Envelope h = MakeHeader(OpKind::kAllReduce, &t, static_cast<int64_t>(op), -1);
  bool exchanged = false;
  RETURN_IF_ERROR(
      Agree(h, local, inline_data, t.raw_data(), nbytes, deadline, &exchanged));
  if (t.numel() == 0) return absl::OkStatus();
  if (exchanged && inline_data) {
    ReduceInRankOrder(t.dtype(), op, size_, t.numel(), t.raw_data(),
                      [&](int r) { return PeerPayload(r); });
    if (op == ReduceOp::kAvg) DivideBySize(t, size_);
    return absl::OkStatus();
  }
  RETURN_IF_ERROR(GuardedData(h, [&] {
    DispatchGlooType(t.dtype(), [&](auto tag) {
      using G = decltype(tag);
      gloo::AllreduceOptions opts(context_);
      opts.setOutput<G>(static_cast<G*>(t.raw_data()),
                        static_cast<size_t>(t.numel()));
      opts.setReduceFunction(RawReduce<G>(op));
      opts.setTag(DataTag(h));
      opts.setTimeout(Remaining(deadline));
      gloo::allreduce(opts);
    });
  }));
  if (op == ReduceOp::kAvg) DivideBySize(t, size_);
  return absl::OkStatus();
}

absl::Status GlooCommunicator::Broadcast(Tensor& t, int root) {
  absl::MutexLock lock(&mu_);
  return BroadcastLocked(t, root);
}

absl::Status GlooCommunicator::BroadcastLocked(Tensor& t, int root) {
  RETURN_IF_ERROR(CheckUsable("Broadcast"));
  const absl::Time deadline = absl::Now() + timeout_;
  absl::Status local = ValidateTensor(t, "Broadcast", "t");
  if (local.ok() && (root < 0 || root >= size_)) {
    local = absl::InvalidArgumentError(absl::StrCat(
        "Broadcast: root ", root, " is out of range [0, ", size_, ")"));
  }
  if (size_ == 1) return local;
  const size_t nbytes = local.ok() ? t.nbytes() : 0;
  const bool inline_data = local.ok() && nbytes <= kGlooInlineBytes;
  const bool send_payload = inline_data && rank_ == root;
  Envelope h = MakeHeader(OpKind::kBroadcast, &t, -1, root);
  bool exchanged = false;
  // Gloo's broadcast of a small message is faster than the envelope
  // all-gather, so verified small broadcasts skip it too.
  RETURN_IF_ERROR(Agree(h, local, inline_data,
                        send_payload ? t.raw_data() : nullptr,
                        send_payload ? nbytes : 0, deadline, &exchanged,
                        /*inline_skips=*/true));
  if (t.numel() == 0) return absl::OkStatus();
  if (exchanged && inline_data) {
    if (rank_ != root) std::memcpy(t.raw_data(), PeerPayload(root), nbytes);
    return absl::OkStatus();
  }
  return GuardedData(h, [&] {
    DispatchGlooType(t.dtype(), [&](auto tag) {
      using G = decltype(tag);
      gloo::BroadcastOptions opts(context_);
      opts.setOutput<G>(static_cast<G*>(t.raw_data()),
                        static_cast<size_t>(t.numel()));
      opts.setRoot(root);
      opts.setTag(DataTag(h));
      opts.setTimeout(Remaining(deadline));
      gloo::broadcast(opts);
    });
  });
}

absl::Status GlooCommunicator::AllGather(const Tensor& in, Tensor& out) {
  absl::MutexLock lock(&mu_);
  return AllGatherLocked(in, out);
}

absl::Status GlooCommunicator::AllGatherLocked(const Tensor& in, Tensor& out) {
  RETURN_IF_ERROR(CheckUsable("AllGather"));
  const absl::Time deadline = absl::Now() + timeout_;
  absl::Status local = ValidateTensor(in, "AllGather", "in");
  if (local.ok()) local = ValidateTensor(out, "AllGather", "out");
  if (local.ok())
    local = ValidateSplit(out, "out", in, "in", size_, "AllGather");
  if (size_ == 1) {
    RETURN_IF_ERROR(local);
    return out.CopyFrom(in);
  }
  const size_t nbytes = local.ok() ? in.nbytes() : 0;
  const bool inline_data = local.ok() && nbytes <= kGlooInlineBytes;
  Envelope h = MakeHeader(OpKind::kAllGather, &in, -1, -1);
  bool exchanged = false;
  RETURN_IF_ERROR(Agree(h, local, inline_data, in.raw_data(), nbytes, deadline,
                        &exchanged));
  if (in.numel() == 0) return absl::OkStatus();
  if (exchanged && inline_data) {
    char* dst = static_cast<char*>(out.raw_data());
    for (int r = 0; r < size_; ++r) {
      std::memcpy(dst + r * nbytes, PeerPayload(r), nbytes);
    }
    return absl::OkStatus();
  }
  // Gloo copies `in` into its slot of `out` first; an `in` that overlaps
  // `out` must be copied out of the way.
  const Tensor source = in.SharesStorageWith(out) ? in.Clone() : in;
  return GuardedData(h, [&] {
    DispatchGlooType(in.dtype(), [&](auto tag) {
      using G = decltype(tag);
      gloo::AllgatherOptions opts(context_);
      opts.setInput<G>(static_cast<G*>(source.raw_data()),
                       static_cast<size_t>(source.numel()));
      opts.setOutput<G>(static_cast<G*>(out.raw_data()),
                        static_cast<size_t>(out.numel()));
      opts.setTag(DataTag(h));
      opts.setTimeout(Remaining(deadline));
      gloo::allgather(opts);
    });
  });
}

// A ring reduce-scatter on Gloo's unbound buffers. Gloo's own
// ReduceScatterHalvingDoubling returns wrong elements for large messages (it
// overwrites the front of its buffer while its own send of that region may
// still be in flight: BENCHMARKS.md, "ReduceScatter: wrong results"), so the
// backend moves the data itself, with the bandwidth-optimal ring: n - 1
// steps; in step k rank r sends the running sum of chunk (r - 1 - k) mod n to
// rank r + 1 and receives that of chunk (r - 2 - k) mod n from rank r - 1,
// adding its own input's piece. After the last step rank r holds chunk r
// summed over all ranks (in the order r + 1, r + 2, ..., r). `in` is only
// read; the running sums live in `out` and, with more than 2 ranks, in two
// chunk-sized buffers kept between calls.
// Throws what Gloo throws (the caller converts it).
void GlooCommunicator::RingReduceScatter(const Tensor& in, Tensor& out,
                                         ReduceOp op, uint32_t tag,
                                         absl::Time deadline) {
  const size_t chunk_bytes = out.nbytes();
  const int next = (rank_ + 1) % size_;
  const int prev = (rank_ + size_ - 1) % size_;
  const char* input = static_cast<const char*>(in.raw_data());
  auto piece = [&](int chunk) {
    return input +
           static_cast<size_t>((chunk % size_ + size_) % size_) * chunk_bytes;
  };
  // The last step receives straight into `out` unless `out` shares storage
  // with `in` (which is still read then); the other steps alternate between
  // two scratch buffers, so 2 ranks need none.
  const bool direct = !out.SharesStorageWith(in);
  const int scratch_steps = size_ - 2 + (direct ? 0 : 1);
  const size_t words = (chunk_bytes + sizeof(uint64_t) - 1) / sizeof(uint64_t);
  const size_t needed = static_cast<size_t>(std::min(scratch_steps, 2)) * words;
  if (scratch_.size() < needed) {
    scratch_ = std::vector<uint64_t>();  // free the old one before growing
    scratch_.resize(needed);
  }
  char* const base = reinterpret_cast<char*>(scratch_.data());
  char* buffers[2] = {
      base, needed > words ? base + words * sizeof(uint64_t) : nullptr};
  DispatchGlooType(in.dtype(), [&](auto type) {
    using G = decltype(type);
    const RawReduceFn reduce = RawReduce<G>(op);
    const size_t count = chunk_bytes / sizeof(G);
    // Step 0 sends straight from the input.
    char* sending = const_cast<char*>(piece(rank_ - 1));
    for (int step = 0; step < size_ - 1; ++step) {
      const bool last = step == size_ - 2;
      char* receiving = last && direct ? static_cast<char*>(out.raw_data())
                                       : buffers[step % 2];
      const uint64_t slot = (kRingSlotPrefix << 56) |
                            (static_cast<uint64_t>(tag) << 24) |
                            static_cast<uint64_t>(step);
      auto send = context_->createUnboundBuffer(sending, chunk_bytes);
      auto recv = context_->createUnboundBuffer(receiving, chunk_bytes);
      recv->recv(prev, slot);
      send->send(next, slot);
      if (!recv->waitRecv(Remaining(deadline)) ||
          !send->waitSend(Remaining(deadline))) {
        throw std::runtime_error("the ring reduce-scatter was aborted");
      }
      reduce(receiving, receiving, piece(rank_ - 2 - step), count);
      if (!last) {
        sending = receiving;
      } else if (!direct) {
        std::memmove(out.raw_data(), receiving, chunk_bytes);
      }
    }
  });
}

absl::Status GlooCommunicator::ReduceScatter(const Tensor& in, Tensor& out,
                                             ReduceOp op) {
  absl::MutexLock lock(&mu_);
  return ReduceScatterLocked(in, out, op);
}

absl::Status GlooCommunicator::ReduceScatterLocked(const Tensor& in,
                                                   Tensor& out, ReduceOp op) {
  RETURN_IF_ERROR(CheckUsable("ReduceScatter"));
  const absl::Time deadline = absl::Now() + timeout_;
  absl::Status local = ValidateTensor(in, "ReduceScatter", "in");
  if (local.ok()) local = ValidateTensor(out, "ReduceScatter", "out");
  if (local.ok()) {
    local = ValidateSplit(in, "in", out, "out", size_, "ReduceScatter");
  }
  if (size_ == 1) {
    RETURN_IF_ERROR(local);
    return out.CopyFrom(in);
  }
  const size_t in_bytes = local.ok() ? in.nbytes() : 0;
  const size_t chunk_bytes = local.ok() ? out.nbytes() : 0;
  const bool inline_data = local.ok() && in_bytes <= kGlooInlineBytes;
  Envelope h =
      MakeHeader(OpKind::kReduceScatter, &in, static_cast<int64_t>(op), -1);
  bool exchanged = false;
  RETURN_IF_ERROR(Agree(h, local, inline_data, in.raw_data(), in_bytes,
                        deadline, &exchanged));
  if (in.numel() == 0) return absl::OkStatus();
  if (exchanged && inline_data) {
    ReduceInRankOrder(
        in.dtype(), op, size_, out.numel(), out.raw_data(),
        [&](int r) { return PeerPayload(r) + rank_ * chunk_bytes; });
    if (op == ReduceOp::kAvg) DivideBySize(out, size_);
    return absl::OkStatus();
  }
  RETURN_IF_ERROR(GuardedData(
      h, [&] { RingReduceScatter(in, out, op, DataTag(h), deadline); }));
  if (op == ReduceOp::kAvg) DivideBySize(out, size_);
  return absl::OkStatus();
}

absl::Status GlooCommunicator::Barrier() {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(CheckUsable("Barrier"));
  if (size_ == 1) return absl::OkStatus();
  const absl::Time deadline = absl::Now() + timeout_;
  // With a check, the envelope all-gather is the barrier: it completes only
  // when every rank has entered.
  Envelope h = MakeHeader(OpKind::kBarrier, nullptr, -1, -1);
  bool exchanged = false;
  RETURN_IF_ERROR(Agree(h, absl::OkStatus(), /*inline_data=*/true, nullptr, 0,
                        deadline, &exchanged));
  if (exchanged) return absl::OkStatus();
  return GuardedData(h, [&] {
    gloo::BarrierOptions opts(context_);
    opts.setTag(DataTag(h));
    opts.setTimeout(Remaining(deadline));
    gloo::barrier(opts);
  });
}

// ---- Point to point ----

absl::Status GlooCommunicator::Send(const Tensor& t, int dst) {
  absl::MutexLock lock(&mu_);
  return SendLocked(t, dst);
}

absl::Status GlooCommunicator::SendLocked(const Tensor& t, int dst) {
  RETURN_IF_ERROR(CheckUsable("Send"));
  if (dst < 0 || dst >= size_ || dst == rank_) {
    return absl::InvalidArgumentError(
        absl::StrCat("gloo Send on rank ", rank_, ": destination ", dst,
                     " must be another rank in [0, ", size_, ")"));
  }
  const absl::Time deadline = absl::Now() + timeout_;
  const absl::Status local = ValidateTensor(t, "Send", "t");
  const uint32_t seq = sent_[dst]++;
  if (options_.check_consistency != ConsistencyCheck::kOff) {
    RETURN_IF_ERROR(
        ExchangeP2PHeaders(/*is_sender=*/true, dst, seq, t, local, deadline));
    if (t.nbytes() <= kGlooInlineBytes) return absl::OkStatus();
  } else {
    RETURN_IF_ERROR(local);
    if (t.nbytes() == 0) return absl::OkStatus();
  }
  bool sent = true;
  const bool off = options_.check_consistency == ConsistencyCheck::kOff;
  absl::Status data = Guarded("Send", [&] {
    auto buffer = context_->createUnboundBuffer(t.raw_data(), t.nbytes());
    buffer->send(dst, P2PSlot(seq, rank_, dst, 2, off ? P2PFingerprint(t) : 0));
    sent = buffer->waitSend(Remaining(deadline));
  });
  if (!data.ok())
    return P2PTimeoutHint(broken_, data, options_.check_consistency);
  if (!sent) {
    broken_ = absl::InternalError(
        absl::StrCat("gloo Send on rank ", rank_, ": the send was aborted"));
    return broken_;
  }
  return absl::OkStatus();
}

absl::Status GlooCommunicator::Recv(Tensor& t, int src) {
  absl::MutexLock lock(&mu_);
  return RecvLocked(t, src);
}

absl::Status GlooCommunicator::RecvLocked(Tensor& t, int src) {
  RETURN_IF_ERROR(CheckUsable("Recv"));
  if (src < 0 || src >= size_ || src == rank_) {
    return absl::InvalidArgumentError(
        absl::StrCat("gloo Recv on rank ", rank_, ": source ", src,
                     " must be another rank in [0, ", size_, ")"));
  }
  const absl::Time deadline = absl::Now() + timeout_;
  const absl::Status local = ValidateTensor(t, "Recv", "t");
  const uint32_t seq = received_[src]++;
  if (options_.check_consistency != ConsistencyCheck::kOff) {
    RETURN_IF_ERROR(
        ExchangeP2PHeaders(/*is_sender=*/false, src, seq, t, local, deadline));
    if (t.nbytes() <= kGlooInlineBytes) {
      if (t.nbytes() > 0) std::memcpy(t.raw_data(), PeerPayload(0), t.nbytes());
      return absl::OkStatus();
    }
  } else {
    RETURN_IF_ERROR(local);
    if (t.nbytes() == 0) return absl::OkStatus();
  }
  bool received = true;
  const bool off = options_.check_consistency == ConsistencyCheck::kOff;
  absl::Status data = Guarded("Recv", [&] {
    auto buffer = context_->createUnboundBuffer(t.raw_data(), t.nbytes());
    buffer->recv(src, P2PSlot(seq, src, rank_, 2, off ? P2PFingerprint(t) : 0));
    received = buffer->waitRecv(Remaining(deadline));
  });
  if (!data.ok())
    return P2PTimeoutHint(broken_, data, options_.check_consistency);
  if (!received) {
    broken_ = absl::InternalError(
        absl::StrCat("gloo Recv on rank ", rank_, ": the receive was aborted"));
    return broken_;
  }
  return absl::OkStatus();
}

}  // namespace tp
