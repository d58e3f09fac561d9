// GlooCommunicator: the CPU backend ("gloo"), every Communicator method over
// Gloo's TCP transport and Gloo's algorithms.
//
//   AllReduce      gloo::allreduce (ring), or one gloo::allgather + a local
//                  reduction in rank order for messages of at most
//                  kGlooInlineBytes (see "Consistency check")
//   Broadcast      gloo::broadcast (binomial tree)
//   AllGather      gloo::allgather (ring)
//   ReduceScatter  a ring over Gloo unbound buffers, written here because
//                  gloo::ReduceScatterHalvingDoubling returns wrong elements
//                  for large messages (see RingReduceScatter in the .cc)
//   Barrier        gloo::barrier, or the consistency all-gather itself
//   Send / Recv    Gloo unbound buffers on per-peer, per-message slots
//
// DTypes: float32, float64, int32, int64 with Gloo's reduction functions;
// float16 through gloo::float16 (each step computed in float32 and rounded to
// nearest even); bfloat16 with this file's own reduction functions (same
// rule). kAvg sums, then divides by size(): floating types round the quotient
// as their division does; integer types truncate toward zero (C++ `/`), so
// 5 over 2 ranks averages to 2 and -5 to -2. Integer sums and products that
// overflow are undefined, as in C++. kMax/kMin with NaNs follow std::max /
// std::min (the result depends on the order of ranks).
//
// Consistency check (GlooOptions::check_consistency). Before data moves, a
// collective may all-gather a fixed-size envelope from each rank: a header
// (call number, collective, dtype, shape, root, reduce op) and an inline
// payload of up to kGlooInlineBytes. When every rank exchanges it, a
// disagreement between ranks becomes kInvalidArgument on every rank, naming
// the ranks and what each passed, and arguments that a rank rejects locally
// (wrong output size, bad root, a non-contiguous tensor) are reported the
// same way on every rank, so that no rank waits for a peer that has already
// given up; the group stays usable. Messages that fit in the
// inline payload complete from the envelope (AllReduce, ReduceScatter: a local
// reduction over the ranks' inputs in rank order; AllGather, Broadcast:
// copies), so small collectives take a single all-gather. The three modes:
//
//   kFirstUse (default, "first_use")  the envelope is exchanged for
//       AllReduce, AllGather and ReduceScatter messages of at most
//       kGlooInlineBytes (it carries them, faster than Gloo's own algorithm),
//       for Barrier, and for the first call of each signature (collective,
//       dtype, shape, root, reduce op) otherwise. Once every rank has agreed
//       on a signature, later calls with it send only the data: no extra
//       round trip (the 64 most recently used signatures are remembered;
//       every rank remembers the same ones, because they are learnt from the
//       same exchanges and used by the same calls). A rank whose arguments
//       fail locally still exchanges the envelope, so on a verified
//       signature its peers (which skip) time out; see below.
//   kAlways ("always", "true", "1")   every call exchanges the envelope
//       first: one small all-gather more than raw Gloo above 4 KB.
//   kOff ("off", "false", "0")         no envelope; data only. A rank whose
//       arguments fail locally returns at once and its peers time out.
//       A Send and a Recv that differ in shape or dtype fail with
//       kDeadlineExceeded, or kUnavailable on the side whose peer timed out
//       first and closed the connection (their data slots carry a 21-bit
//       fingerprint of the shape and dtype, so they exchange no data but
//       for a 2^-21 chance); the error says so.
//       An empty tensor's side returns at once without waiting.
//
// Why skipping is safe: every collective puts a 32-bit fingerprint of its
// signature into its Gloo tag or slots, so calls that
// disagree use different Gloo slots and never exchange data (a size mismatch
// on one slot would abort the process inside Gloo's I/O thread, which
// enforces buffer sizes, and a dtype mismatch of equal size would give a
// wrong result); ReduceScatter's ring puts it into its slots. A call that
// disagrees with a peer after
// skipping therefore waits instead of crashing. When any collective times
// out, each rank posts a description of its call to the store (under
// "gloo/diag/") and reads its peers' (waiting at most min(timeout, 3 s);
// also after a lost connection, since Gloo closes every connection of a rank
// whose wait timed out). Ranks that called something else, or rejected their
// arguments, turn the error into kInvalidArgument naming every rank's call
// (and the rejection); ranks that never reached the call are named in a
// kDeadlineExceeded. Such a late mismatch is found
// only after the timeout and leaves the group unusable; with kAlways it is
// found at once. Send/Recv exchange headers both ways before the data in
// kFirstUse and kAlways. Every rank must use the same mode (a mismatch fails
// the rendezvous with kInvalidArgument).
//
// Errors: kInvalidArgument for bad or mismatched arguments (found by the
// envelope: the group stays usable; found after a timeout: unusable, see
// above); kDeadlineExceeded when a peer does not answer within the timeout;
// kUnavailable when a peer's connection is lost; kInternal for other Gloo
// failures. Gloo's exceptions never escape. After a timeout, connection loss
// or internal error the communicator is unusable: every later call returns
// kFailedPrecondition carrying the first error. Destroy it and build another.
//
// Timeouts: the group's timeout bounds each call from its start (the envelope
// and the data transfer share one deadline; a failed call then spends at most
// min(timeout, 3 s) more on the diagnosis), and bounds the rendezvous.
//
// Signals: creating a group of two or more ranks sets SIGPIPE to SIG_IGN
// when it still has its default action (Gloo writes to sockets with writev,
// and a dead peer must fail the collective, not kill this process).
//
// Destruction is collective: the destructor waits until every rank has
// started destroying its communicator (a barrier, bounded by the timeout and
// at most 60 s) so that no rank closes its connections while a peer is still
// finishing the last call. Destroy a process's communicators in the same
// order on every rank. A broken communicator closes at once.
//
// Thread safety: calls are serialized by an internal mutex; as for every
// Communicator, ranks must still issue collectives in the same order, so use
// one communicator per thread for concurrent collectives.
//
// Example:
//   tp::BackendContext ctx;
//   ctx.rank = rank;  ctx.size = 4;  ctx.store = store;
//   ctx.timeout = absl::Seconds(30);
//   ctx.options["gloo.iface"] = "eth0";
//   ASSIGN_OR_RETURN(std::unique_ptr<tp::Communicator> comm,
//                    tp::CreateCommunicator("gloo", ctx));
//   RETURN_IF_ERROR(comm->AllReduce(grad, tp::ReduceOp::kAvg));
#ifndef TENSOR_PARALLEL_BACKENDS_GLOO_GLOO_COMMUNICATOR_H_
#define TENSOR_PARALLEL_BACKENDS_GLOO_GLOO_COMMUNICATOR_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "comm/backend_registry.h"
#include "comm/communicator.h"
#include "runtime/tensor.h"

namespace gloo {
class Context;
namespace transport {
class Device;
}  // namespace transport
}  // namespace gloo

namespace tp {

// Bytes of each rank's data carried inside the consistency envelope. A
// compile-time constant because every rank must use the same envelope size.
inline constexpr size_t kGlooInlineBytes = 4096;

// When the gloo backend checks that ranks agree on a call (see "Consistency
// check" above).
enum class ConsistencyCheck { kOff, kFirstUse, kAlways };

// "off", "first_use", "always".
absl::string_view ConsistencyCheckName(ConsistencyCheck check);

// Gloo-specific settings, read from BackendContext::options by
// ParseGlooOptions ("gloo.hostname", "gloo.iface", "gloo.check_consistency").
struct GlooOptions {
  // Local host name or address to bind the TCP transport to. Default (empty,
  // with iface empty): the local address that routes to
  // BackendContext::master_addr, or 127.0.0.1 when master_addr is empty or a
  // loopback address (every rank on this host).
  std::string hostname;
  // Network interface to bind ("eth0"); takes precedence over hostname.
  std::string iface;
  // See "Consistency check" above.
  ConsistencyCheck check_consistency = ConsistencyCheck::kFirstUse;
};

// Reads the "gloo.*" keys of `options`; other prefixes are ignored.
// kInvalidArgument naming the key for an unknown "gloo." key or a bad value
// (check_consistency takes first_use, always or off; true/1 mean always,
// false/0 off).
absl::StatusOr<GlooOptions> ParseGlooOptions(
    const std::map<std::string, std::string>& options);

class GlooCommunicator final : public Communicator {
 public:
  // Joins the group: binds a TCP device, publishes its address in ctx.store
  // (under "gloo/"), and connects to every other rank (Gloo's full-mesh
  // rendezvous). Blocks until every rank of ctx.size has joined or
  // ctx.timeout passes: kDeadlineExceeded naming the ranks that did not
  // arrive. kInvalidArgument for a malformed ctx (rank out of range, no store
  // with size > 1, a CUDA device) or an address that cannot be bound;
  // kUnavailable when peers cannot be reached. A group of one needs no store
  // and opens no socket.
  // `name` is what backend() returns (the name the factory was registered
  // under: "gloo", or a plugin's name).
  static absl::StatusOr<std::unique_ptr<GlooCommunicator>> Create(
      const BackendContext& ctx, const GlooOptions& options,
      absl::string_view name = "gloo");

  ~GlooCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  absl::string_view backend() const override { return name_; }

  absl::Status AllReduce(Tensor& t, ReduceOp op = ReduceOp::kSum) override;
  absl::Status Broadcast(Tensor& t, int root) override;
  absl::Status AllGather(const Tensor& in, Tensor& out) override;
  absl::Status ReduceScatter(const Tensor& in, Tensor& out,
                             ReduceOp op = ReduceOp::kSum) override;
  absl::Status Barrier() override;
  // A rank may not send to or receive from itself (kInvalidArgument).
  absl::Status Send(const Tensor& t, int dst) override;
  absl::Status Recv(Tensor& t, int src) override;

  // The local address the transport is bound to ("127.0.0.1"; empty for a
  // group of one).
  const std::string& bound_address() const { return bound_address_; }
  const GlooOptions& options() const { return options_; }
  // How many collective calls so far exchanged the consistency envelope (for
  // tests and benchmarks: with kFirstUse, repeated large calls do not).
  int64_t envelope_exchanges() const;

  // Internal; public for the implementation's helpers.
  struct Envelope;

 private:
  GlooCommunicator(int rank, int size, absl::Duration timeout,
                   GlooOptions options, std::string name);

  // Ends the rendezvous: waits until every rank has connected and checks
  // that all ranks agree on check_consistency (kInvalidArgument otherwise).
  absl::Status Handshake(absl::Time deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Runs `fn` (a call into Gloo) and converts any exception to a Status,
  // marking the communicator broken for every error but kInvalidArgument.
  template <typename Fn>
  absl::Status Guarded(absl::string_view what, Fn&& fn)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // kFailedPrecondition when an earlier call broke the group.
  absl::Status CheckUsable(absl::string_view what) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // All-gathers this rank's envelope and checks that every rank's header
  // matches (kInvalidArgument on every rank otherwise). `local_error` is this
  // rank's own argument error, sent so that peers fail too.
  absl::Status ExchangeEnvelopes(const Envelope& mine,
                                 const absl::Status& local_error,
                                 const void* inline_payload,
                                 size_t inline_bytes, absl::Time deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Starts collective `h` (call number assigned here): decides, by the mode
  // and the verified signatures, whether the envelope must be exchanged, and
  // exchanges it if so. `inline_data`: the call completes from the envelope
  // (`payload` holds this rank's `payload_bytes`). On return *exchanged says
  // whether the peers' envelopes (PeerPayload) are valid. Returns `local`
  // when no exchange takes place. `inline_skips`: a verified call skips the
  // envelope even when it would fit in it (Broadcast).
  absl::Status Agree(Envelope& h, const absl::Status& local, bool inline_data,
                     const void* payload, size_t payload_bytes,
                     absl::Time deadline, bool* exchanged,
                     bool inline_skips = false)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool IsVerified(const Envelope& h) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RememberVerified(const Envelope& h) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The Gloo tag of collective `h`'s data: a fingerprint of its signature.
  static uint32_t DataTag(const Envelope& h);
  // Runs a collective's data transfer `fn` through Guarded; when it times
  // out, Diagnose turns the error into a better one.
  template <typename Fn>
  absl::Status GuardedData(const Envelope& h, Fn&& fn)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // After collective `h` failed with kDeadlineExceeded or kUnavailable
  // `error`: exchanges descriptions of the call (with this rank's argument
  // error `local`, if any) through the store and returns kInvalidArgument
  // naming ranks that called something else, or kDeadlineExceeded naming the
  // ranks that never reached the call. Marks the group broken.
  absl::Status Diagnose(const Envelope& h, const absl::Status& error,
                        const absl::Status& local)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Posts this rank's description of call `h` for the peers' diagnosis.
  void PostCall(const Envelope& h, const absl::Status& local)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static std::string DiagnosisKey(int64_t call, int rank);
  static std::string CallText(const Envelope& h, const absl::Status& local);
  // The payload rank `r` sent in the last envelope exchange.
  const char* PeerPayload(int r) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Status AllReduceLocked(Tensor& t, ReduceOp op)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status BroadcastLocked(Tensor& t, int root)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status AllGatherLocked(const Tensor& in, Tensor& out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ReduceScatterLocked(const Tensor& in, Tensor& out, ReduceOp op)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The data transfer of ReduceScatter (see the .cc); throws Gloo's errors.
  void RingReduceScatter(const Tensor& in, Tensor& out, ReduceOp op,
                         uint32_t tag, absl::Time deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status SendLocked(const Tensor& t, int dst)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status RecvLocked(Tensor& t, int src)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Exchanges Send/Recv headers with `peer` (both directions at once).
  absl::Status ExchangeP2PHeaders(bool is_sender, int peer, uint32_t seq,
                                  const Tensor& t, const absl::Status& local,
                                  absl::Time deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string name_;
  const int rank_;
  const int size_;
  const absl::Duration timeout_;
  const GlooOptions options_;
  std::string bound_address_;

  mutable absl::Mutex mu_;
  std::shared_ptr<gloo::transport::Device> device_;
  std::shared_ptr<gloo::Context> context_;
  // Collective calls made so far (the header's call number).
  int64_t calls_ ABSL_GUARDED_BY(mu_) = 0;
  // Messages sent to / received from each peer so far (their slot tags).
  std::vector<uint32_t> sent_ ABSL_GUARDED_BY(mu_);
  std::vector<uint32_t> received_ ABSL_GUARDED_BY(mu_);
  // The first error that broke the group (OK while usable).
  absl::Status broken_ ABSL_GUARDED_BY(mu_);
  // Envelope buffers, reused: this rank's, and every rank's after the
  // all-gather. 64-bit words keep the payloads 8-byte aligned.
  std::vector<uint64_t> envelope_out_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> envelope_in_ ABSL_GUARDED_BY(mu_);
  // The group's store (diagnosis after a timeout); null for a group of one.
  std::shared_ptr<Store> store_;
  // Signatures (call number 0) every rank has agreed on, oldest first.
  std::vector<Envelope> verified_ ABSL_GUARDED_BY(mu_);
  int64_t envelope_exchanges_ ABSL_GUARDED_BY(mu_) = 0;
  // ReduceScatter's two chunk-sized running-sum buffers, grown as needed and
  // kept between calls.
  std::vector<uint64_t> scratch_ ABSL_GUARDED_BY(mu_);
};

// The "gloo" factory: ParseGlooOptions(ctx.options), then Create. The
// registration lives in gloo_registration.cc (target
// //backends/gloo:gloo_communicator, alwayslink).
absl::StatusOr<std::unique_ptr<Communicator>> CreateGlooCommunicator(
    const BackendContext& ctx);

}  // namespace tp

#endif  // TENSOR_PARALLEL_BACKENDS_GLOO_GLOO_COMMUNICATOR_H_
