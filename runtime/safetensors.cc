#include "runtime/safetensors.h"

#include <fcntl.h>
#include <limits.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "runtime/status_macros.h"

// The format is little-endian; the byte buffer is copied as is.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors I/O assumes a little-endian host");

namespace tp {
namespace {

using json = nlohmann::json;

// Every dtype of the format, with its element size and tp::DType if any.
struct FormatDType {
  const char* name;
  size_t size;
  std::optional<DType> dtype;
};

const FormatDType kFormatDTypes[] = {
    {"F32", 4, DType::kFloat32},  {"F64", 8, DType::kFloat64},
    {"F16", 2, DType::kFloat16},  {"BF16", 2, DType::kBFloat16},
    {"I32", 4, DType::kInt32},    {"I64", 8, DType::kInt64},
    {"BOOL", 1, std::nullopt},    {"U8", 1, std::nullopt},
    {"I8", 1, std::nullopt},      {"I16", 2, std::nullopt},
    {"U16", 2, std::nullopt},     {"U32", 4, std::nullopt},
    {"U64", 8, std::nullopt},     {"F8_E4M3", 1, std::nullopt},
    {"F8_E5M2", 1, std::nullopt},
};

const FormatDType* FindFormatDType(absl::string_view name) {
  for (const FormatDType& d : kFormatDTypes) {
    if (name == d.name) return &d;
  }
  return nullptr;
}

// Reads are batched: runs of bytes (in file order) separated by gaps of
// fewer than kMaxGap bytes, spanning at most kWindow bytes, are read with one
// system call (preadv into the destinations when they touch, else pread into
// a bounce buffer of kWindow bytes and scattered). Longer gaps are skipped.
constexpr uint64_t kMaxGap = 4096;
constexpr uint64_t kWindow = 256 << 10;

std::string Quote(absl::string_view s) {
  // Tensor names come from untrusted files: show them escaped and bounded.
  std::string out = "'";
  size_t n = 0;
  for (char c : s) {
    if (++n > 200) {
      absl::StrAppend(&out, "...");
      break;
    }
    const unsigned char u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f || c == '\'' || c == '\\') {
      static const char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[u >> 4];
      out += kHex[u & 15];
    } else {
      out += c;
    }
  }
  out += "'";
  return out;
}

std::string FilePrefix(absl::string_view path) {
  return absl::StrCat("safetensors file ", Quote(path), ": ");
}

std::string TensorPrefix(absl::string_view path, absl::string_view name) {
  return absl::StrCat("safetensors file ", Quote(path), ": tensor ",
                      Quote(name), ": ");
}

uint64_t LoadLE64(const char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

std::vector<int64_t> ContiguousStrides(const Shape& shape) {
  std::vector<int64_t> strides(shape.size());
  int64_t s = 1;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
}

// Parses and checks one tensor entry (everything but its place among the
// others).
absl::StatusOr<SafetensorsTensorInfo> ParseEntry(absl::string_view path,
                                                 const std::string& name,
                                                 const json& v) {
  const std::string prefix = TensorPrefix(path, name);
  if (name.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(FilePrefix(path), "empty tensor name"));
  }
  if (!v.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "entry is not a JSON object"));
  }
  SafetensorsTensorInfo info;
  info.name = name;

  auto dtype_it = v.find("dtype");
  if (dtype_it == v.end() || !dtype_it->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "missing \"dtype\" string"));
  }
  info.dtype_name = dtype_it->get_ref<const std::string&>();
  const FormatDType* fd = FindFormatDType(info.dtype_name);
  if (fd == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        prefix, "unknown dtype ", Quote(info.dtype_name),
        " (known: F32, F64, F16, BF16, I32, I64, BOOL, U8, I8, I16, U16, "
        "U32, U64, F8_E4M3, F8_E5M2)"));
  }
  info.dtype = fd->dtype;
  info.element_size = fd->size;

  auto shape_it = v.find("shape");
  if (shape_it == v.end() || !shape_it->is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "missing \"shape\" array"));
  }
  // The product of the non-zero dimensions must fit in int64 (it bounds the
  // strides a Tensor of this shape computes); a zero dimension makes the
  // element count 0.
  int64_t nonzero_product = 1;
  bool has_zero = false;
  for (const json& d : *shape_it) {
    if (!d.is_number_unsigned()) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "shape entry ",
                       d.dump(-1, ' ', true, json::error_handler_t::replace),
                       " is not a non-negative integer"));
    }
    const uint64_t u = d.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "shape dimension ", u, " too large"));
    }
    const int64_t dim = static_cast<int64_t>(u);
    if (dim == 0) {
      has_zero = true;
    } else if (__builtin_mul_overflow(nonzero_product, dim, &nonzero_product)) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "shape has 2^63 or more elements"));
    }
    info.shape.push_back(dim);
  }
  const int64_t numel = has_zero ? 0 : nonzero_product;

  auto off_it = v.find("data_offsets");
  if (off_it == v.end() || !off_it->is_array() || off_it->size() != 2 ||
      !(*off_it)[0].is_number_unsigned() ||
      !(*off_it)[1].is_number_unsigned()) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix,
                     "\"data_offsets\" is not an array of two non-negative "
                     "integers"));
  }
  info.data_begin = (*off_it)[0].get<uint64_t>();
  info.data_end = (*off_it)[1].get<uint64_t>();
  if (info.data_begin > info.data_end) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "data_offsets [", info.data_begin, ", ",
                     info.data_end, "] are reversed"));
  }
  uint64_t nbytes = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(numel),
                             static_cast<uint64_t>(info.element_size),
                             &nbytes) ||
      nbytes != info.data_end - info.data_begin) {
    return absl::InvalidArgumentError(absl::StrCat(
        prefix, "data_offsets [", info.data_begin, ", ", info.data_end,
        ") hold ", info.data_end - info.data_begin, " bytes but shape ",
        ShapeToString(info.shape), " of ", info.dtype_name, " needs ", numel,
        " x ", info.element_size));
  }
  return info;
}

}  // namespace

absl::string_view SafetensorsDTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "F32";
    case DType::kFloat64:
      return "F64";
    case DType::kFloat16:
      return "F16";
    case DType::kBFloat16:
      return "BF16";
    case DType::kInt32:
      return "I32";
    case DType::kInt64:
      break;
  }
  return "I64";
}

absl::StatusOr<DType> ParseSafetensorsDType(absl::string_view name) {
  const FormatDType* fd = FindFormatDType(name);
  if (fd == nullptr || !fd->dtype.has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors dtype ", Quote(name),
                     " has no tp::DType (supported: F32, F64, F16, BF16, "
                     "I32, I64)"));
  }
  return *fd->dtype;
}

// ---- SafetensorsFile ----

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(
    const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    return absl::ErrnoToStatus(err,
                               absl::StrCat(FilePrefix(path), "cannot open"));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::ErrnoToStatus(err, absl::StrCat(FilePrefix(path), "fstat"));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat(FilePrefix(path), "not a regular file"));
  }
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->fd_ = fd;  // Kept open for pread; closed by the destructor.
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size == 0) return Parse(std::move(file), "", 0);
  // The header is validated in place in a mapping of the file's first bytes,
  // unmapped again before returning; tensor data is read with pread.
  const size_t map_size = static_cast<size_t>(
      std::min<uint64_t>(size, 8 + kSafetensorsMaxHeaderSize));
  void* p = ::mmap(nullptr, map_size, PROT_READ, MAP_PRIVATE, fd, /*offset=*/0);
  if (p == MAP_FAILED) {
    const int err = errno;
    return absl::ErrnoToStatus(err, absl::StrCat(FilePrefix(path), "mmap"));
  }
  auto parsed = Parse(std::move(file), static_cast<const char*>(p), size);
  ::munmap(p, map_size);
  return parsed;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>>
SafetensorsFile::OpenFromBuffer(std::string bytes, std::string display_name) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = std::move(display_name);
  file->owned_ = std::move(bytes);
  const char* data = file->owned_.data();
  const uint64_t size = file->owned_.size();
  return Parse(std::move(file), data, size);
}

SafetensorsFile::~SafetensorsFile() {
  if (fd_ >= 0) ::close(fd_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Parse(
    std::unique_ptr<SafetensorsFile> file, const char* bytes, uint64_t size) {
  const std::string& path = file->path_;
  if (size < 8) {
    return absl::DataLossError(
        absl::StrCat(FilePrefix(path), "file is ", size,
                     " bytes, too short for the 8-byte header length"));
  }
  const uint64_t header_size = LoadLE64(bytes);
  if (header_size > kSafetensorsMaxHeaderSize) {
    return absl::InvalidArgumentError(absl::StrCat(
        FilePrefix(path), "header length ", header_size,
        " exceeds the limit of ", kSafetensorsMaxHeaderSize, " bytes"));
  }
  if (header_size > size - 8) {
    return absl::DataLossError(absl::StrCat(
        FilePrefix(path), "header length ", header_size, " but only ", size - 8,
        " bytes follow the length (file truncated?)"));
  }
  const char* header = bytes + 8;
  if (header_size == 0 || header[0] != '{') {
    return absl::InvalidArgumentError(
        absl::StrCat(FilePrefix(path), "header does not start with '{'"));
  }
  file->buffer_offset_ = 8 + header_size;
  file->buffer_size_ = size - 8 - header_size;

  // Parse without exceptions; the callback records duplicate keys at every
  // level (nlohmann keeps the last of duplicates silently).
  std::vector<std::set<std::string>> keys;
  std::string duplicate;
  json::parser_callback_t callback =
      [&keys, &duplicate](int /*depth*/, json::parse_event_t ev, json& parsed) {
        switch (ev) {
          case json::parse_event_t::object_start:
            keys.emplace_back();
            break;
          case json::parse_event_t::key:
            if (!keys.empty() && duplicate.empty()) {
              const std::string* k = parsed.get_ptr<const std::string*>();
              if (k != nullptr && !keys.back().insert(*k).second)
                duplicate = *k;
            }
            break;
          case json::parse_event_t::object_end:
            if (!keys.empty()) keys.pop_back();
            break;
          default:
            break;
        }
        return true;
      };
  json root;
  try {
    root = json::parse(header, header + header_size, callback,
                       /*allow_exceptions=*/false);
  } catch (const std::exception& e) {
    // Not expected with allow_exceptions=false; a bad_alloc on a huge header
    // lands here too.
    return absl::InvalidArgumentError(absl::StrCat(
        FilePrefix(path), "cannot parse the JSON header: ", e.what()));
  }
  if (root.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(FilePrefix(path),
                                                   "header is not valid JSON (",
                                                   header_size, " bytes)"));
  }
  if (!duplicate.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        FilePrefix(path), "duplicate key ", Quote(duplicate), " in header"));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(FilePrefix(path), "header is not a JSON object"));
  }

  std::vector<SafetensorsTensorInfo> infos;
  infos.reserve(root.size());
  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string& key = it.key();
    if (key == "__metadata__") {
      if (!it->is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(
            FilePrefix(path), "\"__metadata__\" is not a JSON object"));
      }
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(FilePrefix(path), "\"__metadata__\" value for ",
                           Quote(m.key()), " is not a string"));
        }
        file->metadata_[m.key()] = m->get_ref<const std::string&>();
      }
      continue;
    }
    ASSIGN_OR_RETURN(SafetensorsTensorInfo info,
                     ParseEntry(path, key, it.value()));
    if (info.data_end > file->buffer_size_) {
      return absl::DataLossError(absl::StrCat(
          TensorPrefix(path, key), "data_offsets [", info.data_begin, ", ",
          info.data_end, ") end past the byte buffer of ", file->buffer_size_,
          " bytes (file truncated?)"));
    }
    infos.push_back(std::move(info));
  }

  // The tensors must tile the buffer: in offset order, each starts where the
  // previous one ended, and the last ends at the end of the file.
  std::stable_sort(
      infos.begin(), infos.end(),
      [](const SafetensorsTensorInfo& a, const SafetensorsTensorInfo& b) {
        return a.data_begin != b.data_begin ? a.data_begin < b.data_begin
                                            : a.data_end < b.data_end;
      });
  uint64_t expected = 0;
  const SafetensorsTensorInfo* previous = nullptr;
  for (const SafetensorsTensorInfo& info : infos) {
    if (info.data_begin < expected) {
      return absl::InvalidArgumentError(absl::StrCat(
          TensorPrefix(path, info.name), "data_offsets [", info.data_begin,
          ", ", info.data_end, ") overlap tensor ", Quote(previous->name),
          " at [", previous->data_begin, ", ", previous->data_end, ")"));
    }
    if (info.data_begin > expected) {
      return absl::InvalidArgumentError(absl::StrCat(
          TensorPrefix(path, info.name), "data_offsets [", info.data_begin,
          ", ", info.data_end, ") leave a gap of unindexed bytes [", expected,
          ", ", info.data_begin, ")"));
    }
    expected = info.data_end;
    previous = &info;
  }
  if (expected != file->buffer_size_) {
    return absl::InvalidArgumentError(absl::StrCat(
        FilePrefix(path), "the tensors end at byte ", expected,
        " of the byte buffer but the file holds ", file->buffer_size_,
        " bytes there (trailing bytes not indexed)"));
  }

  for (SafetensorsTensorInfo& info : infos) {
    file->names_.push_back(info.name);
    std::string name = info.name;
    file->entries_.emplace(std::move(name), std::move(info));
  }
  return file;
}

bool SafetensorsFile::contains(absl::string_view name) const {
  return Find(name) != nullptr;
}

const SafetensorsTensorInfo* SafetensorsFile::Find(
    absl::string_view name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second;
}

absl::StatusOr<SafetensorsTensorInfo> SafetensorsFile::info(
    absl::string_view name) const {
  const SafetensorsTensorInfo* info = Find(name);
  if (info == nullptr) {
    return absl::NotFoundError(
        absl::StrCat(FilePrefix(path_), "no tensor ", Quote(name)));
  }
  return *info;
}

absl::StatusOr<const SafetensorsTensorInfo*> SafetensorsFile::FindReadable(
    absl::string_view name, absl::string_view caller) const {
  const SafetensorsTensorInfo* info = Find(name);
  if (info == nullptr) {
    return absl::NotFoundError(absl::StrCat(caller, ": ", FilePrefix(path_),
                                            "no tensor ", Quote(name)));
  }
  if (!info->dtype.has_value()) {
    return absl::UnimplementedError(absl::StrCat(
        caller, ": ", TensorPrefix(path_, name), "dtype ", info->dtype_name,
        " cannot be read (supported: F32, F64, F16, BF16, I32, I64)"));
  }
  return info;
}

absl::Status SafetensorsFile::ReadAt(char* out, uint64_t off,
                                     uint64_t n) const {
  if (fd_ < 0) {
    if (n > 0) std::memcpy(out, owned_.data() + buffer_offset_ + off, n);
    return absl::OkStatus();
  }
  const uint64_t file_off = buffer_offset_ + off;
  for (uint64_t done = 0; done < n;) {
    const ssize_t r =
        ::pread(fd_, out + done, std::min<uint64_t>(n - done, 1 << 30),
                static_cast<off_t>(file_off + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      return absl::ErrnoToStatus(
          err,
          absl::StrCat(FilePrefix(path_), "pread at byte ", file_off + done));
    }
    if (r == 0) {
      return absl::DataLossError(
          absl::StrCat(FilePrefix(path_), "file ends before byte ",
                       file_off + done, " (truncated while open?)"));
    }
    done += static_cast<uint64_t>(r);
  }
  return absl::OkStatus();
}

// Collects the runs of one read, in increasing source order, into batches
// read with one system call each (see kMaxGap, kWindow).
class SafetensorsFile::RunReader {
 public:
  explicit RunReader(const SafetensorsFile& file) : file_(file) {}

  // Copies buffer bytes [src, src + n) to `dst`, now or at the next Flush.
  absl::Status Add(char* dst, uint64_t src, uint64_t n) {
    if (n == 0) return absl::OkStatus();
    if (file_.fd_ < 0) return file_.ReadAt(dst, src, n);  // in memory
    if (!runs_.empty() && src >= end_ && src - end_ < kMaxGap &&
        src + n - begin_ <= kWindow && runs_.size() < kMaxRuns) {
      gaps_ = gaps_ || src != end_;
      end_ = src + n;
      runs_.push_back({dst, src, n});
      return absl::OkStatus();
    }
    RETURN_IF_ERROR(Flush());
    if (n >= kWindow) return file_.ReadAt(dst, src, n);
    runs_.push_back({dst, src, n});
    begin_ = src;
    end_ = src + n;
    gaps_ = false;
    return absl::OkStatus();
  }

  absl::Status Flush() {
    if (runs_.empty()) return absl::OkStatus();
    absl::Status s = FlushBatch();
    runs_.clear();
    return s;
  }

 private:
  struct Run {
    char* dst;
    uint64_t src;
    uint64_t n;
  };
  static constexpr size_t kMaxRuns = IOV_MAX;

  absl::Status FlushBatch() {
    if (runs_.size() == 1) {
      return file_.ReadAt(runs_[0].dst, runs_[0].src, runs_[0].n);
    }
    if (gaps_) {
      // Read the span once, then scatter; the gaps are under a page each.
      bounce_.resize(kWindow);
      RETURN_IF_ERROR(file_.ReadAt(bounce_.data(), begin_, end_ - begin_));
      for (const Run& r : runs_) {
        std::memcpy(r.dst, bounce_.data() + (r.src - begin_), r.n);
      }
      return absl::OkStatus();
    }
    // Touching runs: one preadv straight into the destinations.
    std::vector<struct iovec> iov(runs_.size());
    for (size_t i = 0; i < runs_.size(); ++i) {
      iov[i].iov_base = runs_[i].dst;
      iov[i].iov_len = runs_[i].n;
    }
    ssize_t r;
    do {
      r = ::preadv(file_.fd_, iov.data(), static_cast<int>(iov.size()),
                   static_cast<off_t>(file_.buffer_offset_ + begin_));
    } while (r < 0 && errno == EINTR);
    if (r < 0) r = 0;  // ReadAt below reports the error, if it persists.
    // Finish what a short read left, run by run.
    uint64_t got = static_cast<uint64_t>(r);
    for (const Run& run : runs_) {
      if (got >= run.n) {
        got -= run.n;
        continue;
      }
      RETURN_IF_ERROR(file_.ReadAt(run.dst + got, run.src + got, run.n - got));
      got = 0;
    }
    return absl::OkStatus();
  }

  const SafetensorsFile& file_;
  std::vector<Run> runs_;
  uint64_t begin_ = 0;
  uint64_t end_ = 0;
  bool gaps_ = false;
  std::vector<char> bounce_;
};

absl::StatusOr<Tensor> SafetensorsFile::Read(absl::string_view name) const {
  ASSIGN_OR_RETURN(const SafetensorsTensorInfo* info,
                   FindReadable(name, "SafetensorsFile::Read"));
  Tensor t = Tensor::Empty(info->shape, *info->dtype);
  RETURN_IF_ERROR(ReadAt(static_cast<char*>(t.raw_data()), info->data_begin,
                         info->data_end - info->data_begin));
  return t;
}

absl::StatusOr<Tensor> SafetensorsFile::ReadSlice(absl::string_view name,
                                                  int dim, int64_t start,
                                                  int64_t length) const {
  ASSIGN_OR_RETURN(const SafetensorsTensorInfo* info,
                   FindReadable(name, "SafetensorsFile::ReadSlice"));
  const int nd = static_cast<int>(info->shape.size());
  const int d = dim < 0 ? dim + nd : dim;
  if (d < 0 || d >= nd) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SafetensorsFile::ReadSlice: ", TensorPrefix(path_, name), "dim ", dim,
        " out of range for shape ", ShapeToString(info->shape)));
  }
  if (start < 0 || length < 0 || start > info->shape[d] ||
      length > info->shape[d] - start) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SafetensorsFile::ReadSlice: ", TensorPrefix(path_, name), "slice [",
        start, ", ", start, " + ", length, ") out of range for dim ", d,
        " of shape ", ShapeToString(info->shape)));
  }
  Shape shape = info->shape;
  shape[d] = length;
  Tensor t = Tensor::Empty(std::move(shape), *info->dtype);
  RETURN_IF_ERROR(ReadSliceInto(name, d, start, t));
  return t;
}

absl::Status SafetensorsFile::ReadSliceInto(absl::string_view name, int dim,
                                            int64_t start, Tensor& dst) const {
  ASSIGN_OR_RETURN(const SafetensorsTensorInfo* info,
                   FindReadable(name, "SafetensorsFile::ReadSliceInto"));
  const std::string where = absl::StrCat("SafetensorsFile::ReadSliceInto: ",
                                         TensorPrefix(path_, name));
  const Shape& full = info->shape;
  const int nd = static_cast<int>(full.size());
  const int d = dim < 0 ? dim + nd : dim;
  if (d < 0 || d >= nd) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, "dim ", dim, " out of range for shape ", ShapeToString(full)));
  }
  if (!dst.defined() || !dst.device().is_cpu()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "destination is not a defined CPU tensor"));
  }
  if (dst.dtype() != *info->dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "destination is ", DTypeName(dst.dtype()),
                     " but the tensor is ", info->dtype_name));
  }
  if (dst.ndim() != nd) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "destination shape ", ShapeToString(dst.shape()),
                     " does not match a slice of shape ", ShapeToString(full)));
  }
  const int64_t length = dst.dim(d);
  if (start < 0 || start > full[d] || length > full[d] - start) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, "slice [", start, ", ", start, " + ", length,
        ") out of range for dim ", d, " of shape ", ShapeToString(full)));
  }
  for (int k = 0; k < nd; ++k) {
    if (k != d && dst.dim(k) != full[k]) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "destination shape ", ShapeToString(dst.shape()),
                       " does not match a slice along dim ", d, " of shape ",
                       ShapeToString(full)));
    }
  }
  if (dst.numel() == 0) return absl::OkStatus();

  const std::vector<int64_t> src_strides = ContiguousStrides(full);
  const uint64_t es = info->element_size;
  const uint64_t base = info->data_begin;
  char* out = static_cast<char*>(dst.raw_data());
  RunReader reader(*this);
  if (dst.is_contiguous()) {
    // The slice is `outer` runs of length * inner elements, in file order.
    int64_t outer = 1;
    for (int k = 0; k < d; ++k) outer *= full[k];
    const uint64_t inner = static_cast<uint64_t>(src_strides[d]);
    const uint64_t run = static_cast<uint64_t>(length) * inner * es;
    for (int64_t o = 0; o < outer; ++o) {
      const uint64_t soff =
          base + (static_cast<uint64_t>(o * full[d] + start)) * inner * es;
      RETURN_IF_ERROR(reader.Add(out + o * run, soff, run));
    }
  } else {
    // A strided destination: one run per innermost row of dst (one per
    // element if that row is strided too), in file order.
    const Shape& shape = dst.shape();
    const std::vector<int64_t>& strides = dst.strides();
    const int64_t inner = shape[nd - 1];
    const int64_t inner_stride = strides[nd - 1];
    std::vector<int64_t> index(nd - 1, 0);
    while (true) {
      int64_t doff = 0;
      int64_t soff = start * src_strides[d];
      for (int k = 0; k < nd - 1; ++k) {
        doff += index[k] * strides[k];
        soff += index[k] * src_strides[k];
      }
      const uint64_t src = base + static_cast<uint64_t>(soff) * es;
      char* row = out + doff * static_cast<int64_t>(es);
      if (inner_stride == 1) {
        RETURN_IF_ERROR(
            reader.Add(row, src, static_cast<uint64_t>(inner) * es));
      } else {
        for (int64_t i = 0; i < inner; ++i) {
          RETURN_IF_ERROR(
              reader.Add(row + i * inner_stride * static_cast<int64_t>(es),
                         src + static_cast<uint64_t>(i) * es, es));
        }
      }
      int k = nd - 2;
      for (; k >= 0; --k) {
        if (++index[k] < shape[k]) break;
        index[k] = 0;
      }
      if (k < 0) break;
    }
  }
  return reader.Flush();
}

// ---- Writer ----

namespace {

absl::Status WriteAll(int fd, const char* data, size_t n,
                      const std::string& path) {
  while (n > 0) {
    const ssize_t w = ::write(fd, data, std::min<size_t>(n, 1 << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      return absl::ErrnoToStatus(
          err, absl::StrCat("WriteSafetensors: write to ", Quote(path)));
    }
    data += w;
    n -= static_cast<size_t>(w);
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteSafetensors(
    const std::string& path,
    const std::vector<std::pair<std::string, Tensor>>& tensors,
    const std::map<std::string, std::string>& metadata) {
  const std::string where = absl::StrCat("WriteSafetensors ", Quote(path));
  std::set<absl::string_view> seen;
  for (const auto& [name, t] : tensors) {
    if (name.empty() || name == "__metadata__") {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": invalid tensor name ", Quote(name)));
    }
    if (!seen.insert(name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": duplicate tensor name ", Quote(name)));
    }
    if (!t.defined() || !t.device().is_cpu()) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": tensor ", Quote(name), " is not a defined CPU tensor"));
    }
  }

  // Larger elements first, so that every tensor is aligned to its element
  // size (the header is padded to a multiple of 8).
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return tensors[a].second.element_size() > tensors[b].second.element_size();
  });

  json header = json::object();
  uint64_t offset = 0;
  for (size_t i : order) {
    const Tensor& t = tensors[i].second;
    const uint64_t nbytes = t.nbytes();
    header[tensors[i].first] = {
        {"dtype", std::string(SafetensorsDTypeName(t.dtype()))},
        {"shape", t.shape()},
        {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string text;
  try {
    text = header.dump();
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": a name or metadata string is not valid UTF-8: ", e.what()));
  }
  text.append((8 - text.size() % 8) % 8, ' ');

  static std::atomic<uint64_t> counter{0};
  const std::string tmp =
      absl::StrCat(path, ".tmp.", ::getpid(), ".", counter.fetch_add(1));
  const int fd =
      ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    const int err = errno;
    return absl::ErrnoToStatus(err,
                               absl::StrCat(where, ": cannot create ", tmp));
  }
  auto fail = [&](absl::Status s) {
    ::close(fd);
    ::unlink(tmp.c_str());
    return s;
  };
  char len[8];
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  absl::Status s = WriteAll(fd, len, 8, tmp);
  if (s.ok()) s = WriteAll(fd, text.data(), text.size(), tmp);
  for (size_t k = 0; s.ok() && k < order.size(); ++k) {
    const Tensor c = tensors[order[k]].second.Contiguous();
    s = WriteAll(fd, static_cast<const char*>(c.raw_data()), c.nbytes(), tmp);
  }
  if (!s.ok()) return fail(s);
  if (::fsync(fd) != 0) {
    const int err = errno;
    return fail(absl::ErrnoToStatus(err, absl::StrCat(where, ": fsync")));
  }
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return absl::ErrnoToStatus(err, absl::StrCat(where, ": close"));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return absl::ErrnoToStatus(err, absl::StrCat(where, ": rename from ", tmp));
  }
  return absl::OkStatus();
}

}  // namespace tp
