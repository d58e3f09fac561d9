// Safetensors: reading and writing the safetensors file format.
//
// Layout of a file (https://github.com/huggingface/safetensors):
//   * 8 bytes: N, the header length, unsigned 64-bit little-endian;
//   * N bytes: a UTF-8 JSON object, starting with '{' and possibly padded at
//     the end with spaces. Each key is a tensor name mapped to
//       {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}
//     plus an optional "__metadata__": {string: string};
//   * the byte buffer: every tensor's elements, row-major, little-endian, at
//     [begin, end) relative to the buffer start. The tensors cover the buffer
//     exactly (no gaps, no overlaps, nothing after the last one).
//
// Open maps the start of the file (mmap, read-only, private) and validates
// the whole header in place: header length against the file size and a
// 100 MB cap, the JSON, every entry (known dtype; shape of non-negative
// integers; end - begin == elements * element size without overflow; offsets
// ordered, inside the buffer, non-overlapping, no gaps), and no duplicate
// keys; then it unmaps it and keeps the file open.
//
// Reads copy only the bytes of the requested tensor or slice (ReadSlice,
// ReadSliceInto), with pread straight into the destination: a dim-0 slice is
// one run of bytes, a slice along another dim one run per row. Runs closer
// than 4 KB to each other are gathered into one system call (preadv into the
// destination rows when they touch, else one pread of the span, at most
// 256 KB, into a bounce buffer). So a rank that loads its shard of a large
// tensor reads only that shard (plus, for rows shorter than a page, the gaps
// between them), and none of the file's pages ever counts toward the
// process's resident memory: it grows by what the read copies out plus at
// most 256 KB. (Copying out of a mapping instead would keep mapped pages
// resident -- the kernel maps whole page-cache folios of up to 2 MB around
// each touched page -- which measured 3-4 MB of extra peak per reader; see
// BENCHMARKS.md.) A file truncated while open gives kDataLoss, not a fault.
//
// Dtypes: F32, F64, F16, BF16, I32, I64 map to tp::DType and can be read.
// The format's other dtypes (BOOL, U8, I8, I16, U16, U32, U64, F8_E4M3,
// F8_E5M2) are validated and listed, but reading them gives kUnimplemented.
//
// Error codes (the message names the file and, when there is one, the
// tensor):
//   kNotFound          the file, or a tensor name, does not exist;
//   kDataLoss          the file is shorter than its header says (shorter
//                      than 8 bytes, a header length past the end of the
//                      file, a tensor whose bytes end past the end of the
//                      file), or that became shorter while open;
//   kInvalidArgument   anything else malformed in the file, or a bad argument
//                      (slice out of range, destination of the wrong shape);
//   kUnimplemented     reading a dtype that has no tp::DType;
//   other codes        from the operating system (errno), e.g.
//                      kPermissionDenied.
//
// Thread safety: a SafetensorsFile is immutable after Open; its const methods
// may be called concurrently (pread has no shared file position). It holds
// the file open until destroyed, so a file replaced by rename (as
// WriteSafetensors does) keeps being read from its old contents.
//
// Example:
//   RETURN_IF_ERROR(tp::WriteSafetensors("/tmp/m.safetensors",
//                                        {{"w", weight}, {"b", bias}}));
//   ASSIGN_OR_RETURN(std::unique_ptr<tp::SafetensorsFile> f,
//                    tp::SafetensorsFile::Open("/tmp/m.safetensors"));
//   ASSIGN_OR_RETURN(tp::Tensor w, f->Read("w"));
//   ASSIGN_OR_RETURN(tp::Tensor rows, f->ReadSlice("w", 0, 16, 16));
#ifndef TENSOR_PARALLEL_RUNTIME_SAFETENSORS_H_
#define TENSOR_PARALLEL_RUNTIME_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "runtime/dtype.h"
#include "runtime/tensor.h"

namespace tp {

// The largest header Open accepts, in bytes (the reference implementation's
// limit).
inline constexpr uint64_t kSafetensorsMaxHeaderSize = 100000000;

// "F32", "F64", "F16", "BF16", "I32", "I64".
absl::string_view SafetensorsDTypeName(DType dtype);
// The inverse for those six names; kInvalidArgument for any other string
// (including the format's dtypes that have no tp::DType).
absl::StatusOr<DType> ParseSafetensorsDType(absl::string_view name);

// One tensor entry of a file's header.
struct SafetensorsTensorInfo {
  std::string name;
  // The dtype as written in the file ("F32", "BF16", "U8", ...).
  std::string dtype_name;
  // The tp::DType when the dtype is one we can read, else nullopt.
  std::optional<DType> dtype;
  Shape shape;
  // Size of one element in bytes.
  size_t element_size = 0;
  // Byte range of the elements, relative to the start of the byte buffer.
  uint64_t data_begin = 0;
  uint64_t data_end = 0;
};

class SafetensorsFile {
 public:
  // Opens and validates the file at `path`. On success the returned object
  // owns the open file descriptor (closed on destruction). Errors: see the
  // file comment.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(
      const std::string& path);
  // Same validation over bytes held in memory (the object keeps its own copy
  // of `bytes`). `display_name` stands for the path in error messages.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> OpenFromBuffer(
      std::string bytes, std::string display_name = "<buffer>");

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  // The path (or display name) given at Open.
  const std::string& path() const { return path_; }
  // Tensor names in the order of their bytes in the file.
  const std::vector<std::string>& names() const { return names_; }
  bool contains(absl::string_view name) const;
  // The entry for `name`; kNotFound naming the file when absent.
  absl::StatusOr<SafetensorsTensorInfo> info(absl::string_view name) const;
  // The "__metadata__" map (empty when the file has none).
  const std::map<std::string, std::string>& metadata() const {
    return metadata_;
  }
  // Size of the byte buffer (the file minus 8 bytes minus the header).
  uint64_t buffer_size() const { return buffer_size_; }

  // A new contiguous CPU tensor holding a copy of tensor `name`.
  // kNotFound / kUnimplemented (dtype without tp::DType).
  absl::StatusOr<Tensor> Read(absl::string_view name) const;
  // A new contiguous CPU tensor holding `length` entries of dimension `dim`
  // of tensor `name`, starting at `start`: the same values as
  // Read(name)->Narrow(dim, start, length), but only the slice's bytes are
  // read. kInvalidArgument when dim, start or length are out of range.
  absl::StatusOr<Tensor> ReadSlice(absl::string_view name, int dim,
                                   int64_t start, int64_t length) const;
  // Copies the slice of tensor `name` along `dim` that starts at `start` and
  // has dst.dim(dim) entries into `dst`, which may be a strided view (e.g. a
  // Narrow of a parameter), without an intermediate tensor. `dst` must be a
  // CPU tensor whose dtype is the entry's and whose shape is the entry's
  // with dimension `dim` replaced by the slice length; kInvalidArgument
  // naming both shapes otherwise.
  absl::Status ReadSliceInto(absl::string_view name, int dim, int64_t start,
                             Tensor& dst) const;

 private:
  SafetensorsFile() = default;
  class RunReader;
  // Validates the 8-byte length and the header at the start of `bytes` (the
  // first min(size, 8 + kSafetensorsMaxHeaderSize) bytes of a file of `size`
  // bytes) and fills `file`'s entries.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Parse(
      std::unique_ptr<SafetensorsFile> file, const char* bytes, uint64_t size);
  const SafetensorsTensorInfo* Find(absl::string_view name) const;
  absl::StatusOr<const SafetensorsTensorInfo*> FindReadable(
      absl::string_view name, absl::string_view caller) const;
  // Copies buffer bytes [off, off + n) to `out` (pread from the file, or
  // memcpy from the owned bytes). kDataLoss when the file has become
  // shorter; errno codes for I/O errors.
  absl::Status ReadAt(char* out, uint64_t off, uint64_t n) const;

  std::string path_;
  // The open file (read with pread), or -1 for a buffer opened from memory.
  int fd_ = -1;
  // The bytes of a buffer opened from memory.
  std::string owned_;
  // Where the byte buffer starts in the file, and its size.
  uint64_t buffer_offset_ = 0;
  uint64_t buffer_size_ = 0;

  std::vector<std::string> names_;
  std::map<std::string, SafetensorsTensorInfo, std::less<>> entries_;
  std::map<std::string, std::string> metadata_;
};

// Writes `tensors` (name, tensor) and `metadata` to `path` as a safetensors
// file. Tensors may be views (they are written contiguously) of any tp::DType
// on the CPU; names must be non-empty, unique and not "__metadata__"
// (kInvalidArgument naming the tensor). Tensors are laid out by decreasing
// element size, in the given order within a size, so every tensor is aligned
// to its element size; the header is padded with spaces to a multiple of 8.
// The file is written to a temporary name in the same directory and renamed
// over `path`, so readers see the old file or the complete new one. I/O
// errors give the errno's code naming the path.
absl::Status WriteSafetensors(
    const std::string& path,
    const std::vector<std::pair<std::string, Tensor>>& tensors,
    const std::map<std::string, std::string>& metadata = {});

}  // namespace tp

#endif  // TENSOR_PARALLEL_RUNTIME_SAFETENSORS_H_
