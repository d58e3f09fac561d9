// Sharded checkpoints in safetensors: each tensor-parallel rank saves its own
// shards, and any TP size loads them back (resharding), reading only the
// bytes that overlap its own shards.
//
// Layout of a checkpoint directory saved at TP = n:
//   model-rank-<r>-of-<n>.safetensors   one file per rank r: that rank's
//       piece of every split parameter under the parameter's (Hugging Face)
//       name, plus (rank 0 only) the replicated parameters. Its
//       "__metadata__" records "tp_rank", "tp_size" and "tp_shards", a JSON
//       string {name: {"full_shape": [..], "split_dim": d, "offset": o}}, so
//       each file describes itself.
//   model.safetensors.index.json        written by rank 0:
//       {"metadata": {"total_size": <bytes of the full tensors>,
//                     "tp_size": n, "format": "tensor_parallel"},
//        "weight_map": {name: file holding the first piece},   (Hugging Face)
//        "__tp__": {"tp_size": n, "tensors": {name: {
//            "dtype": "F32", "full_shape": [..], "split_dim": d,   (-1: whole)
//            "slices": [{"file": f, "offset": o, "length": l}, ...]}}}}
//       where slice k of a split tensor is full.Narrow(d, o, l), stored whole
//       in file f under the tensor's name; the slices tile [0, full_shape[d]).
//
// Loading (LoadShardedCheckpoint) fills each ParameterShard's tensor with its
// piece of the full tensor (tensor = full.Narrow(split_dim, offset, len), or
// the full tensor when replicated). It works from:
//   * a directory saved above at any TP size, with any split dims (a piece
//     saved along one dim and loaded along another is read as the one slice
//     that intersects it);
//   * a Hugging Face checkpoint: a directory with model.safetensors, or with
//     a model.safetensors.index.json whose "weight_map" names the file of
//     each full tensor, or the path of a single .safetensors file.
// For each parameter it reads, from the files whose slices overlap its
// shard, only the overlapping bytes, straight into the parameter
// (SafetensorsFile::ReadSliceInto: pread, no file page stays resident); files
// that hold nothing of its shards are never opened. Peak memory is therefore
// the parameters themselves plus under 1 MB (BENCHMARKS.md, "Checkpoint
// loading memory"). Tensors of the checkpoint that match no parameter are
// ignored; a parameter missing from the checkpoint is an error. Dtypes are
// not converted: a parameter's dtype must be the checkpoint's.
//
// Interoperability: every file is a valid safetensors file, but a split
// tensor appears in several rank files under the same name, so tools that
// expect whole tensors (Hugging Face transformers) can read a checkpoint
// saved at TP = 1 (one rank file holding every tensor whole, and a
// weight_map naming it), not a sharded one. Load a sharded checkpoint at
// TP = 1 and save it again to convert it.
//
// Errors (the message names the checkpoint path and the tensor):
//   kInvalidArgument   bad arguments (rank/size, a ParameterShard whose tensor
//                      does not fit its full_shape/split_dim/offset, duplicate
//                      names), a dtype or full shape that differs between a
//                      parameter and the checkpoint, a malformed index;
//   kNotFound          no checkpoint at the path, a parameter missing from the
//                      checkpoint, a file named by the index missing;
//   kDataLoss          a checkpoint whose slices leave part of a tensor
//                      uncovered or overlap, or whose files disagree with its
//                      index; truncated files;
//   kFailedPrecondition a parameter tensor that is not materialised;
//   kAborted           (collective save) another rank failed;
//   others             file-system errors (errno), communicator errors.
//
// Example (every rank of the TP group):
//   RETURN_IF_ERROR(tp::SaveShardedCheckpoint("/ckpt", pg->tensor_parallel(),
//                                             model->parameters()));
//   ...   // later, possibly at another TP size:
//   RETURN_IF_ERROR(tp::LoadShardedCheckpoint("/ckpt", tp_rank, tp_size,
//                                             model->parameters()));
#ifndef TENSOR_PARALLEL_LAYERS_CHECKPOINT_H_
#define TENSOR_PARALLEL_LAYERS_CHECKPOINT_H_

#include <string>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "comm/communicator.h"
#include "layers/parameter.h"

namespace tp {

// "model.safetensors.index.json".
extern const char kCheckpointIndexFileName[];

// "model-rank-<tp_rank>-of-<tp_size>.safetensors".
std::string CheckpointShardFileName(int tp_rank, int tp_size);

// Writes rank `tp_rank`'s file into `dir` (created if absent) without
// communicating; rank 0 also writes the index. Rank 0 derives the other
// ranks' pieces from its own: every split parameter must be cut in tp_size
// equal pieces in rank order (full_shape[split_dim] == tp_size * local
// length), as every parallel layer of this project does; otherwise rank 0
// returns kInvalidArgument naming the parameter (use the Communicator
// overload, or WriteCheckpointIndex, for other layouts). The checkpoint is
// complete when every rank has returned; synchronise (a barrier) before
// loading it from another process. Files are replaced atomically.
absl::Status SaveShardedCheckpoint(const std::string& dir, int tp_rank,
                                   int tp_size,
                                   absl::Span<const ParameterShard> params);

// Collective over `tp_group` (every rank calls it with its own params):
// each rank writes its file, then rank 0 builds the index from the headers
// of all files (any layout) and every rank returns when the checkpoint is
// complete. If any rank fails, every rank returns an error (its own, or
// kAborted naming how many ranks failed).
absl::Status SaveShardedCheckpoint(const std::string& dir,
                                   Communicator& tp_group,
                                   absl::Span<const ParameterShard> params);

// (Re)writes `dir`/model.safetensors.index.json from the "tp_shards" metadata
// of the tp_size rank files in `dir`. kNotFound for a missing file,
// kDataLoss when the pieces do not tile a tensor or disagree between files.
absl::Status WriteCheckpointIndex(const std::string& dir, int tp_size);

// Fills every parameter's tensor (through its shared storage) from the
// checkpoint at `path` (a directory or a .safetensors file; see the file
// comment). tp_rank/tp_size describe the loading process (checked for
// range); where each shard lies comes from the ParameterShards themselves.
// On error some parameters may have been filled already.
absl::Status LoadShardedCheckpoint(const std::string& path, int tp_rank,
                                   int tp_size,
                                   absl::Span<const ParameterShard> params);

}  // namespace tp

#endif  // TENSOR_PARALLEL_LAYERS_CHECKPOINT_H_
