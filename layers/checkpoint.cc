#include "layers/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "runtime/safetensors.h"
#include "runtime/status_macros.h"
#include "runtime/tensor.h"

namespace tp {

const char kCheckpointIndexFileName[] = "model.safetensors.index.json";

namespace {

using json = nlohmann::json;

constexpr uint64_t kMaxIndexSize = 100000000;
constexpr char kSingleFileName[] = "model.safetensors";

std::string JoinPath(const std::string& dir, const std::string& file) {
  if (dir.empty()) return file;
  if (dir.back() == '/') return dir + file;
  return absl::StrCat(dir, "/", file);
}

std::string Quoted(absl::string_view s) { return absl::StrCat("'", s, "'"); }

// One rank's piece of one tensor, as saved.
struct Piece {
  std::string name;
  int rank = 0;
  DType dtype = DType::kFloat32;
  Shape full_shape;
  int split_dim = -1;
  int64_t offset = 0;
  int64_t length = 0;
};

// Where the bytes of one full tensor are.
struct SliceRecord {
  std::string file;  // path (already joined with the checkpoint directory)
  int64_t offset = 0;
  int64_t length = 0;
};

struct TensorRecord {
  // False for a Hugging Face index or single file: the tensor is stored
  // whole in slices[0].file, and its dtype and shape come from that file.
  bool described = false;
  DType dtype = DType::kFloat32;
  Shape full_shape;
  int split_dim = -1;
  std::vector<SliceRecord> slices;
};

// ---- Validation of ParameterShards ----

absl::Status ValidateShard(const ParameterShard& p, absl::string_view caller) {
  const std::string where =
      absl::StrCat(caller, ": parameter ", Quoted(p.name));
  if (!p.tensor.defined()) {
    return absl::FailedPreconditionError(
        absl::StrCat(where, ": tensor is not materialised"));
  }
  if (!p.tensor.device().is_cpu()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": tensor is on ", p.tensor.device().ToString(),
                     "; checkpoints read and write CPU tensors"));
  }
  for (int64_t d : p.full_shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": negative full_shape ", ShapeToString(p.full_shape)));
    }
  }
  const int nd = static_cast<int>(p.full_shape.size());
  if (p.replicated()) {
    if (p.tensor.shape() != p.full_shape) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": replicated tensor of shape ",
                       ShapeToString(p.tensor.shape()), " but full_shape ",
                       ShapeToString(p.full_shape)));
    }
    return absl::OkStatus();
  }
  if (p.split_dim >= nd) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": split_dim ", p.split_dim, " out of range for full_shape ",
        ShapeToString(p.full_shape)));
  }
  bool fits = p.tensor.ndim() == nd;
  for (int k = 0; fits && k < nd; ++k) {
    if (k != p.split_dim && p.tensor.dim(k) != p.full_shape[k]) fits = false;
  }
  if (fits) {
    const int64_t len = p.tensor.dim(p.split_dim);
    const int64_t full = p.full_shape[p.split_dim];
    fits = p.offset >= 0 && p.offset <= full && len <= full - p.offset;
  }
  if (!fits) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": tensor of shape ", ShapeToString(p.tensor.shape()),
        " at offset ", p.offset, " along dim ", p.split_dim,
        " is not a piece of full_shape ", ShapeToString(p.full_shape)));
  }
  return absl::OkStatus();
}

absl::Status ValidateParams(absl::Span<const ParameterShard> params,
                            absl::string_view caller) {
  std::set<absl::string_view> names;
  for (const ParameterShard& p : params) {
    if (p.name.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(caller, ": a parameter has an empty name"));
    }
    if (!names.insert(p.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(caller, ": duplicate parameter name ", Quoted(p.name)));
    }
    RETURN_IF_ERROR(ValidateShard(p, caller));
  }
  return absl::OkStatus();
}

absl::Status ValidateRank(int tp_rank, int tp_size, absl::string_view caller) {
  if (tp_size < 1 || tp_rank < 0 || tp_rank >= tp_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        caller, ": tp_rank ", tp_rank, " out of range for tp_size ", tp_size));
  }
  return absl::OkStatus();
}

// ---- Files ----

absl::Status WriteFileAtomically(const std::string& path,
                                 const std::string& contents) {
  static std::atomic<uint64_t> counter{0};
  const std::string tmp =
      absl::StrCat(path, ".tmp.", ::getpid(), ".", counter.fetch_add(1));
  const int fd =
      ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    const int err = errno;
    return absl::ErrnoToStatus(err, absl::StrCat("cannot create ", tmp));
  }
  const char* p = contents.data();
  size_t n = contents.size();
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      return absl::ErrnoToStatus(err, absl::StrCat("write to ", tmp));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0 ||
      ::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return absl::ErrnoToStatus(err, absl::StrCat("cannot write ", path));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    return absl::ErrnoToStatus(err, absl::StrCat("cannot open ", path));
  }
  std::string out;
  char buf[1 << 16];
  while (true) {
    const ssize_t r = ::read(fd, buf, sizeof(buf));
    if (r < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      return absl::ErrnoToStatus(err, absl::StrCat("cannot read ", path));
    }
    if (r == 0) break;
    out.append(buf, static_cast<size_t>(r));
    if (out.size() > kMaxIndexSize) {
      ::close(fd);
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": larger than ", kMaxIndexSize, " bytes; not an index"));
    }
  }
  ::close(fd);
  return out;
}

absl::Status CreateDirectory(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::ErrnoToStatus(ec.value(),
                               absl::StrCat("cannot create directory ", dir));
  }
  return absl::OkStatus();
}

// ---- JSON helpers (no exceptions: every access is type-checked) ----

bool ParseShape(const json& j, Shape* shape) {
  if (!j.is_array()) return false;
  shape->clear();
  for (const json& d : j) {
    if (!d.is_number_unsigned() ||
        d.get<uint64_t>() >
            static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return false;
    }
    shape->push_back(static_cast<int64_t>(d.get<uint64_t>()));
  }
  return true;
}

bool ParseInt(const json& j, int64_t* v) {
  if (j.is_number_unsigned()) {
    if (j.get<uint64_t>() >
        static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return false;
    }
    *v = static_cast<int64_t>(j.get<uint64_t>());
    return true;
  }
  if (j.is_number_integer()) {
    *v = j.get<int64_t>();
    return true;
  }
  return false;
}

absl::StatusOr<json> ParseJson(const std::string& text,
                               absl::string_view what) {
  json j;
  try {
    j = json::parse(text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": cannot parse JSON: ", e.what()));
  }
  if (j.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": invalid JSON"));
  }
  return j;
}

absl::StatusOr<std::string> Dump(const json& j, absl::string_view what) {
  try {
    return j.dump(2);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": a name is not valid UTF-8: ", e.what()));
  }
}

// ---- The index ----

// Checks that the pieces of one split tensor tile [0, full) (sorted by
// offset on return).
absl::Status CheckTiling(absl::string_view where, const std::string& name,
                         int64_t full, std::vector<SliceRecord>& slices) {
  std::sort(slices.begin(), slices.end(),
            [](const SliceRecord& a, const SliceRecord& b) {
              return a.offset != b.offset ? a.offset < b.offset
                                          : a.length < b.length;
            });
  int64_t expected = 0;
  for (const SliceRecord& s : slices) {
    if (s.offset != expected) {
      return absl::DataLossError(absl::StrCat(
          where, ": tensor ", Quoted(name), ": pieces ",
          s.offset < expected ? "overlap" : "leave a gap", " at [",
          std::min(s.offset, expected), ", ", std::max(s.offset, expected),
          ") along the split dim (piece in ", s.file, ")"));
    }
    if (s.length < 0 || s.length > full - expected) {
      return absl::DataLossError(absl::StrCat(
          where, ": tensor ", Quoted(name), ": piece [", s.offset, ", +",
          s.length, ") in ", s.file, " exceeds the full size ", full));
    }
    expected += s.length;
  }
  if (expected != full) {
    return absl::DataLossError(
        absl::StrCat(where, ": tensor ", Quoted(name), ": pieces cover [0, ",
                     expected, ") of ", full, " along the split dim"));
  }
  return absl::OkStatus();
}

// The index JSON for `pieces` (file names relative to the directory).
absl::StatusOr<std::string> BuildIndex(const std::string& dir, int tp_size,
                                       std::vector<Piece> pieces) {
  const std::string where = absl::StrCat("checkpoint ", dir);
  std::map<std::string, std::vector<const Piece*>> by_name;
  for (const Piece& p : pieces) by_name[p.name].push_back(&p);
  json tensors = json::object();
  json weight_map = json::object();
  uint64_t total_size = 0;
  for (auto& [name, list] : by_name) {
    const Piece& first = *list.front();
    for (const Piece* p : list) {
      if (p->dtype != first.dtype || p->full_shape != first.full_shape ||
          p->split_dim != first.split_dim) {
        return absl::DataLossError(absl::StrCat(
            where, ": tensor ", Quoted(name), " is ", DTypeName(p->dtype), " ",
            ShapeToString(p->full_shape), " split along ", p->split_dim,
            " in rank ", p->rank, "'s file but ", DTypeName(first.dtype), " ",
            ShapeToString(first.full_shape), " split along ", first.split_dim,
            " in rank ", first.rank, "'s"));
      }
    }
    std::vector<SliceRecord> slices;
    for (const Piece* p : list) {
      slices.push_back(
          {CheckpointShardFileName(p->rank, tp_size), p->offset, p->length});
    }
    if (first.split_dim < 0) {
      if (slices.size() != 1) {
        return absl::DataLossError(absl::StrCat(where, ": replicated tensor ",
                                                Quoted(name), " is stored in ",
                                                slices.size(), " files"));
      }
    } else {
      RETURN_IF_ERROR(
          CheckTiling(where, name, first.full_shape[first.split_dim], slices));
    }
    json entry = {{"dtype", std::string(SafetensorsDTypeName(first.dtype))},
                  {"full_shape", first.full_shape},
                  {"split_dim", first.split_dim}};
    json js = json::array();
    for (const SliceRecord& s : slices) {
      json one = {{"file", s.file}};
      if (first.split_dim >= 0) {
        one["offset"] = s.offset;
        one["length"] = s.length;
      }
      js.push_back(std::move(one));
    }
    entry["slices"] = std::move(js);
    tensors[name] = std::move(entry);
    weight_map[name] = slices.front().file;
    total_size += static_cast<uint64_t>(NumElements(first.full_shape)) *
                  DTypeSize(first.dtype);
  }
  json index = {
      {"metadata",
       {{"total_size", total_size},
        {"tp_size", tp_size},
        {"format", "tensor_parallel"}}},
      {"weight_map", std::move(weight_map)},
      {"__tp__", {{"tp_size", tp_size}, {"tensors", std::move(tensors)}}}};
  return Dump(index, where);
}

// The "tp_shards" metadata of a rank file.
json ShardsMetadata(const std::vector<const ParameterShard*>& saved) {
  json shards = json::object();
  for (const ParameterShard* p : saved) {
    shards[p->name] = {{"full_shape", p->full_shape},
                       {"split_dim", p->replicated() ? -1 : p->split_dim},
                       {"offset", p->replicated() ? 0 : p->offset}};
  }
  return shards;
}

// The pieces recorded in rank `rank`'s file.
absl::Status PiecesFromFile(const std::string& dir, int rank, int tp_size,
                            std::vector<Piece>* pieces) {
  const std::string path =
      JoinPath(dir, CheckpointShardFileName(rank, tp_size));
  ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file,
                   SafetensorsFile::Open(path));
  auto it = file->metadata().find("tp_shards");
  if (it == file->metadata().end()) {
    return absl::DataLossError(
        absl::StrCat(path, ": no \"tp_shards\" in __metadata__"));
  }
  ASSIGN_OR_RETURN(json shards,
                   ParseJson(it->second, absl::StrCat(path, ": tp_shards")));
  if (!shards.is_object()) {
    return absl::DataLossError(
        absl::StrCat(path, ": tp_shards is not a JSON object"));
  }
  for (const std::string& name : file->names()) {
    const std::string where = absl::StrCat(path, ": tensor ", Quoted(name));
    auto s = shards.find(name);
    if (s == shards.end() || !s->is_object()) {
      return absl::DataLossError(absl::StrCat(where, ": no tp_shards entry"));
    }
    ASSIGN_OR_RETURN(SafetensorsTensorInfo info, file->info(name));
    Piece piece;
    piece.name = name;
    piece.rank = rank;
    if (!info.dtype.has_value()) {
      return absl::DataLossError(
          absl::StrCat(where, ": unsupported dtype ", info.dtype_name));
    }
    piece.dtype = *info.dtype;
    int64_t split_dim = 0;
    if (!s->contains("full_shape") ||
        !ParseShape((*s)["full_shape"], &piece.full_shape) ||
        !s->contains("split_dim") || !ParseInt((*s)["split_dim"], &split_dim) ||
        !s->contains("offset") || !ParseInt((*s)["offset"], &piece.offset)) {
      return absl::DataLossError(
          absl::StrCat(where, ": malformed tp_shards entry"));
    }
    const int nd = static_cast<int>(piece.full_shape.size());
    Shape expected = piece.full_shape;
    bool ok = split_dim >= -1 && split_dim < nd;
    if (ok && split_dim >= 0) {
      ok = info.shape.size() == expected.size();
      if (ok) {
        piece.length = info.shape[split_dim];
        expected[split_dim] = piece.length;
        ok = piece.offset >= 0;
      }
    }
    if (!ok || info.shape != expected) {
      return absl::DataLossError(absl::StrCat(
          where, ": shape ", ShapeToString(info.shape),
          " is not a piece of full_shape ", ShapeToString(piece.full_shape),
          " along dim ", split_dim));
    }
    piece.split_dim = static_cast<int>(split_dim);
    pieces->push_back(std::move(piece));
  }
  return absl::OkStatus();
}

// Parses an index file into records (file paths joined with `dir`).
absl::StatusOr<std::map<std::string, TensorRecord>> ParseIndex(
    const std::string& dir, const std::string& index_path) {
  ASSIGN_OR_RETURN(std::string text, ReadSmallFile(index_path));
  ASSIGN_OR_RETURN(json index, ParseJson(text, index_path));
  auto bad = [&](absl::string_view what) {
    return absl::InvalidArgumentError(
        absl::StrCat("checkpoint index ", index_path, ": ", what));
  };
  if (!index.is_object()) return bad("not a JSON object");
  auto valid_file = [](const json& f) {
    if (!f.is_string()) return false;
    const std::string& s = f.get_ref<const std::string&>();
    return !s.empty() && s != "." && s != ".." &&
           s.find('/') == std::string::npos;
  };
  std::map<std::string, TensorRecord> records;
  auto tp_it = index.find("__tp__");
  if (tp_it != index.end()) {
    if (!tp_it->is_object() || !tp_it->contains("tensors") ||
        !(*tp_it)["tensors"].is_object()) {
      return bad("\"__tp__\" has no \"tensors\" object");
    }
    const json& tensors = (*tp_it)["tensors"];
    for (auto t = tensors.begin(); t != tensors.end(); ++t) {
      const std::string& name = t.key();
      const std::string what = absl::StrCat("tensor ", Quoted(name), ": ");
      const json& e = t.value();
      if (!e.is_object()) return bad(what + "entry is not an object");
      TensorRecord r;
      r.described = true;
      if (!e.contains("dtype") || !e["dtype"].is_string()) {
        return bad(what + "no \"dtype\" string");
      }
      auto dtype =
          ParseSafetensorsDType(e["dtype"].get_ref<const std::string&>());
      if (!dtype.ok()) return bad(what + std::string(dtype.status().message()));
      r.dtype = *dtype;
      int64_t split_dim = 0;
      if (!e.contains("full_shape") ||
          !ParseShape(e["full_shape"], &r.full_shape)) {
        return bad(what +
                   "\"full_shape\" is not an array of non-negative integers");
      }
      if (!e.contains("split_dim") || !ParseInt(e["split_dim"], &split_dim) ||
          split_dim < -1 ||
          split_dim >= static_cast<int64_t>(r.full_shape.size())) {
        return bad(what + "\"split_dim\" is not -1 or a dim of full_shape");
      }
      r.split_dim = static_cast<int>(split_dim);
      if (!e.contains("slices") || !e["slices"].is_array() ||
          e["slices"].empty()) {
        return bad(what + "no \"slices\" array");
      }
      for (const json& s : e["slices"]) {
        if (!s.is_object() || !s.contains("file") || !valid_file(s["file"])) {
          return bad(what +
                     "a slice has no valid \"file\" (a name in the "
                     "checkpoint directory)");
        }
        SliceRecord sr;
        sr.file = JoinPath(dir, s["file"].get_ref<const std::string&>());
        if (r.split_dim >= 0) {
          if (!s.contains("offset") || !ParseInt(s["offset"], &sr.offset) ||
              !s.contains("length") || !ParseInt(s["length"], &sr.length) ||
              sr.offset < 0 || sr.length < 0) {
            return bad(what + "a slice has no valid \"offset\"/\"length\"");
          }
        }
        r.slices.push_back(std::move(sr));
      }
      if (r.split_dim < 0) {
        if (r.slices.size() != 1) {
          return absl::DataLossError(
              absl::StrCat("checkpoint index ", index_path, ": ", what,
                           "replicated but ", r.slices.size(), " slices"));
        }
      } else {
        RETURN_IF_ERROR(
            CheckTiling(absl::StrCat("checkpoint index ", index_path), name,
                        r.full_shape[r.split_dim], r.slices));
      }
      records.emplace(name, std::move(r));
    }
    return records;
  }
  auto wm = index.find("weight_map");
  if (wm == index.end() || !wm->is_object()) {
    return bad("neither \"__tp__\" nor a \"weight_map\" object");
  }
  for (auto t = wm->begin(); t != wm->end(); ++t) {
    if (!valid_file(t.value())) {
      return bad(absl::StrCat("weight_map entry for ", Quoted(t.key()),
                              " is not a file name"));
    }
    TensorRecord r;
    r.slices.push_back(
        {JoinPath(dir, t.value().get_ref<const std::string&>()), 0, 0});
    records.emplace(t.key(), std::move(r));
  }
  return records;
}

// Opens each file once, on first use.
class FileCache {
 public:
  absl::StatusOr<const SafetensorsFile*> Get(const std::string& path) {
    auto it = files_.find(path);
    if (it != files_.end()) return it->second.get();
    ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f,
                     SafetensorsFile::Open(path));
    const SafetensorsFile* raw = f.get();
    files_.emplace(path, std::move(f));
    return raw;
  }
  void Put(std::unique_ptr<SafetensorsFile> f) {
    std::string path = f->path();
    files_.emplace(std::move(path), std::move(f));
  }

 private:
  std::map<std::string, std::unique_ptr<SafetensorsFile>> files_;
};

// Fills `p` from the slices of `r` that overlap it.
absl::Status LoadOne(const std::string& where, const ParameterShard& p,
                     TensorRecord& r, FileCache& files) {
  const std::string what = absl::StrCat(where, ": tensor ", Quoted(p.name));
  if (!r.described) {
    // A whole tensor in a Hugging Face file: the file describes it.
    ASSIGN_OR_RETURN(const SafetensorsFile* f, files.Get(r.slices[0].file));
    if (!f->contains(p.name)) {
      return absl::DataLossError(absl::StrCat(what, ": the index places it in ",
                                              r.slices[0].file,
                                              " which has no such tensor"));
    }
    ASSIGN_OR_RETURN(SafetensorsTensorInfo info, f->info(p.name));
    if (!info.dtype.has_value()) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": checkpoint dtype ", info.dtype_name,
          " cannot be loaded (supported: F32, F64, F16, BF16, I32, I64)"));
    }
    r.dtype = *info.dtype;
    r.full_shape = info.shape;
    r.split_dim = -1;
    r.described = true;
  }
  if (r.dtype != p.tensor.dtype()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": checkpoint has ", SafetensorsDTypeName(r.dtype),
                     " (", DTypeName(r.dtype), ") but the parameter is ",
                     DTypeName(p.tensor.dtype())));
  }
  if (r.full_shape != p.full_shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": checkpoint has full shape ", ShapeToString(r.full_shape),
        " but the parameter's full shape is ", ShapeToString(p.full_shape)));
  }
  const int ds = r.split_dim;
  const int dl = p.replicated() ? -1 : p.split_dim;
  const int64_t o = dl >= 0 ? p.offset : 0;
  const int64_t len = dl >= 0 ? p.tensor.dim(dl) : 0;
  for (const SliceRecord& s : r.slices) {
    const int64_t so = ds >= 0 ? s.offset : 0;
    const int64_t sl = ds >= 0 ? s.length : 0;
    // dst: the part of p.tensor this piece provides; (dim, start): the slice
    // of the piece to read into it.
    Tensor dst = p.tensor;
    int read_dim = 0;
    int64_t read_start = 0;
    if (ds < 0 && dl < 0) {
      read_dim = 0;
    } else if (ds < 0) {
      read_dim = dl;
      read_start = o;
    } else if (dl < 0) {
      ASSIGN_OR_RETURN(dst, p.tensor.Narrow(ds, so, sl));
      read_dim = ds;
    } else if (ds == dl) {
      const int64_t lo = std::max(o, so);
      const int64_t hi = std::min(o + len, so + sl);
      if (lo >= hi) continue;  // no overlap: the file is not even opened
      ASSIGN_OR_RETURN(dst, p.tensor.Narrow(dl, lo - o, hi - lo));
      read_dim = ds;
      read_start = lo - so;
    } else {
      ASSIGN_OR_RETURN(dst, p.tensor.Narrow(ds, so, sl));
      read_dim = dl;
      read_start = o;
    }
    if (dst.numel() == 0) continue;
    ASSIGN_OR_RETURN(const SafetensorsFile* f, files.Get(s.file));
    Shape piece_shape = r.full_shape;
    if (ds >= 0) piece_shape[ds] = sl;
    auto info = f->info(p.name);
    if (!info.ok() || info->dtype != r.dtype || info->shape != piece_shape) {
      return absl::DataLossError(absl::StrCat(
          what, ": the index expects a ", SafetensorsDTypeName(r.dtype), " ",
          ShapeToString(piece_shape), " piece in ", s.file,
          " but the file has ",
          info.ok()
              ? absl::StrCat(info->dtype_name, " ", ShapeToString(info->shape))
              : std::string("none")));
    }
    if (dst.ndim() == 0) {
      ASSIGN_OR_RETURN(Tensor whole, f->Read(p.name));
      RETURN_IF_ERROR(dst.CopyFrom(whole));
    } else {
      RETURN_IF_ERROR(f->ReadSliceInto(p.name, read_dim, read_start, dst));
    }
  }
  return absl::OkStatus();
}

absl::Status WriteRankFile(const std::string& dir, int tp_rank, int tp_size,
                           absl::Span<const ParameterShard> params) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  std::vector<const ParameterShard*> saved;
  for (const ParameterShard& p : params) {
    // Replicated parameters are the same on every rank: rank 0 saves them.
    if (p.replicated() && tp_rank != 0) continue;
    tensors.emplace_back(p.name, p.tensor);
    saved.push_back(&p);
  }
  ASSIGN_OR_RETURN(std::string shards,
                   Dump(ShardsMetadata(saved), "SaveShardedCheckpoint"));
  RETURN_IF_ERROR(CreateDirectory(dir));
  return WriteSafetensors(
      JoinPath(dir, CheckpointShardFileName(tp_rank, tp_size)), tensors,
      {{"format", "pt"},
       {"tp_rank", absl::StrCat(tp_rank)},
       {"tp_size", absl::StrCat(tp_size)},
       {"tp_shards", shards}});
}

}  // namespace

std::string CheckpointShardFileName(int tp_rank, int tp_size) {
  return absl::StrCat("model-rank-", tp_rank, "-of-", tp_size, ".safetensors");
}

absl::Status SaveShardedCheckpoint(const std::string& dir, int tp_rank,
                                   int tp_size,
                                   absl::Span<const ParameterShard> params) {
  constexpr absl::string_view kCaller = "SaveShardedCheckpoint";
  RETURN_IF_ERROR(ValidateRank(tp_rank, tp_size, kCaller));
  RETURN_IF_ERROR(ValidateParams(params, kCaller));
  RETURN_IF_ERROR(WriteRankFile(dir, tp_rank, tp_size, params));
  if (tp_rank != 0) return absl::OkStatus();
  // Predict every rank's pieces from rank 0's (equal pieces in rank order).
  // On failure rank 0's file stays: WriteCheckpointIndex can index the files.
  std::vector<Piece> pieces;
  for (const ParameterShard& p : params) {
    Piece piece{p.name, 0, p.tensor.dtype(), p.full_shape, -1, 0, 0};
    if (p.replicated()) {
      pieces.push_back(piece);
      continue;
    }
    const int64_t len = p.tensor.dim(p.split_dim);
    if (p.offset != 0 || len * tp_size != p.full_shape[p.split_dim]) {
      return absl::InvalidArgumentError(absl::StrCat(
          kCaller, ": parameter ", Quoted(p.name), " is not cut in ", tp_size,
          " equal pieces (full size ", p.full_shape[p.split_dim], " along dim ",
          p.split_dim, ", rank 0 holds [", p.offset, ", +", len,
          ")); use the Communicator overload or WriteCheckpointIndex"));
    }
    piece.split_dim = p.split_dim;
    piece.length = len;
    for (int r = 0; r < tp_size; ++r) {
      piece.rank = r;
      piece.offset = r * len;
      pieces.push_back(piece);
    }
  }
  ASSIGN_OR_RETURN(std::string index,
                   BuildIndex(dir, tp_size, std::move(pieces)));
  return WriteFileAtomically(JoinPath(dir, kCheckpointIndexFileName), index);
}

absl::Status WriteCheckpointIndex(const std::string& dir, int tp_size) {
  RETURN_IF_ERROR(ValidateRank(0, tp_size, "WriteCheckpointIndex"));
  std::vector<Piece> pieces;
  for (int r = 0; r < tp_size; ++r) {
    RETURN_IF_ERROR(PiecesFromFile(dir, r, tp_size, &pieces));
  }
  ASSIGN_OR_RETURN(std::string index,
                   BuildIndex(dir, tp_size, std::move(pieces)));
  return WriteFileAtomically(JoinPath(dir, kCheckpointIndexFileName), index);
}

absl::Status SaveShardedCheckpoint(const std::string& dir,
                                   Communicator& tp_group,
                                   absl::Span<const ParameterShard> params) {
  const int rank = tp_group.rank();
  const int size = tp_group.size();
  absl::Status own = ValidateParams(params, "SaveShardedCheckpoint");
  if (own.ok()) own = WriteRankFile(dir, rank, size, params);
  // Every rank learns how many failed, so that none waits for an index that
  // will not come.
  Tensor failed = Tensor::Full({1}, own.ok() ? 0 : 1, DType::kFloat32);
  RETURN_IF_ERROR(tp_group.AllReduce(failed, ReduceOp::kSum));
  const int failures = static_cast<int>(failed.ToDoubles()[0]);
  if (!own.ok()) return own;
  if (failures > 0) {
    return absl::AbortedError(
        absl::StrCat("SaveShardedCheckpoint ", dir, ": ", failures, " of ",
                     size, " ranks failed to write their file"));
  }
  absl::Status index = absl::OkStatus();
  if (rank == 0) index = WriteCheckpointIndex(dir, size);
  Tensor index_failed = Tensor::Full({1}, index.ok() ? 0 : 1, DType::kFloat32);
  RETURN_IF_ERROR(tp_group.Broadcast(index_failed, /*root=*/0));
  if (!index.ok()) return index;
  if (index_failed.ToDoubles()[0] != 0) {
    return absl::AbortedError(absl::StrCat(
        "SaveShardedCheckpoint ", dir, ": rank 0 failed to write the index"));
  }
  return absl::OkStatus();
}

absl::Status LoadShardedCheckpoint(const std::string& path, int tp_rank,
                                   int tp_size,
                                   absl::Span<const ParameterShard> params) {
  constexpr absl::string_view kCaller = "LoadShardedCheckpoint";
  RETURN_IF_ERROR(ValidateRank(tp_rank, tp_size, kCaller));
  RETURN_IF_ERROR(ValidateParams(params, kCaller));
  const std::string where = absl::StrCat(kCaller, " ", path);

  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    return absl::ErrnoToStatus(err, absl::StrCat(where, ": no checkpoint"));
  }
  FileCache files;
  std::map<std::string, TensorRecord> records;
  // A single file: every tensor whole, described by its header.
  auto single_file = [&](const std::string& file) -> absl::Status {
    ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f,
                     SafetensorsFile::Open(file));
    for (const std::string& name : f->names()) {
      TensorRecord r;
      r.slices.push_back({file, 0, 0});
      records.emplace(name, std::move(r));
    }
    files.Put(std::move(f));
    return absl::OkStatus();
  };
  if (S_ISDIR(st.st_mode)) {
    const std::string index_path = JoinPath(path, kCheckpointIndexFileName);
    const std::string single = JoinPath(path, kSingleFileName);
    if (::access(index_path.c_str(), F_OK) == 0) {
      ASSIGN_OR_RETURN(records, ParseIndex(path, index_path));
    } else if (::access(single.c_str(), F_OK) == 0) {
      RETURN_IF_ERROR(single_file(single));
    } else {
      return absl::NotFoundError(
          absl::StrCat(where, ": neither ", kCheckpointIndexFileName, " nor ",
                       kSingleFileName, " in the directory"));
    }
  } else {
    RETURN_IF_ERROR(single_file(path));
  }

  for (const ParameterShard& p : params) {
    auto it = records.find(p.name);
    if (it == records.end()) {
      return absl::NotFoundError(absl::StrCat(
          where, ": no tensor ", Quoted(p.name), " in the checkpoint"));
    }
    RETURN_IF_ERROR(LoadOne(where, p, it->second, files));
  }
  return absl::OkStatus();
}

}  // namespace tp
