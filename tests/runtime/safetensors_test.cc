#include "runtime/safetensors.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tp {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string TempDir() {
  const char* d = std::getenv("TEST_TMPDIR");
  return d != nullptr ? d : "/tmp";
}

std::string TempPath(const std::string& name) {
  return absl::StrCat(TempDir(), "/", name);
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// 8-byte little-endian length, written byte by byte.
std::string LE64(uint64_t v) {
  std::string s;
  for (int i = 0; i < 8; ++i) s += static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// A file built by hand: length, header (unpadded), buffer.
std::string HandFile(const std::string& header, const std::string& buffer) {
  return LE64(header.size()) + header + buffer;
}

// Raw bytes of a contiguous copy of `t`.
std::string Bytes(const Tensor& t) {
  Tensor c = t.Contiguous();
  return std::string(static_cast<const char*>(c.raw_data()), c.nbytes());
}

// A tensor of `shape` and `dtype` whose elements are distinct small values
// (exact in every dtype).
Tensor Iota(Shape shape, DType dtype, double first = 1) {
  std::vector<double> v(NumElements(shape));
  for (size_t i = 0; i < v.size(); ++i) {
    v[i] = first + static_cast<double>(i % 200) - (i % 2 == 0 ? 0.0 : 300.0);
  }
  return *Tensor::FromDoubles(v, std::move(shape), dtype);
}

// ---- Known bytes ----

// The example of the format's documentation: one I32 [2, 2] tensor of zeros,
// header length 60 (0x3c).
TEST(SafetensorsTest, ReadsTheDocumentedExampleFile) {
  std::string bytes = std::string("\x3c\0\0\0\0\0\0\0", 8) +
                      R"({"test":{"dtype":"I32","shape":[2,2],)"
                      R"("data_offsets":[0,16]}})" +
                      std::string(16, '\0');
  ASSERT_EQ(bytes.size(), 8u + 60 + 16);
  auto f = SafetensorsFile::OpenFromBuffer(bytes);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_THAT((*f)->names(), ElementsAre("test"));
  Tensor t = *(*f)->Read("test");
  EXPECT_EQ(t.dtype(), DType::kInt32);
  EXPECT_EQ(t.shape(), (Shape{2, 2}));
  EXPECT_THAT(*t.ToVector<int32_t>(), ElementsAre(0, 0, 0, 0));
}

// Little-endian values written byte by byte, not by the writer.
TEST(SafetensorsTest, ReadsAHandWrittenFileWithEveryDType) {
  const std::string header =
      R"({"__metadata__":{"format":"pt"},)"
      R"("f32":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("f64":{"dtype":"F64","shape":[],"data_offsets":[8,16]},)"
      R"("i64":{"dtype":"I64","shape":[1],"data_offsets":[16,24]},)"
      R"("i32":{"dtype":"I32","shape":[1,1],"data_offsets":[24,28]},)"
      R"("f16":{"dtype":"F16","shape":[1],"data_offsets":[28,30]},)"
      R"("bf16":{"dtype":"BF16","shape":[1],"data_offsets":[30,32]},)"
      R"("empty":{"dtype":"F32","shape":[0,3],"data_offsets":[32,32]}})";
  std::string buffer;
  buffer += std::string("\x00\x00\xc0\x3f", 4);                  // 1.5f
  buffer += std::string("\x00\x00\x00\xc0", 4);                  // -2.0f
  buffer += std::string("\x00\x00\x00\x00\x00\x00\x08\x40", 8);  // 3.0
  buffer += std::string("\xfe\xff\xff\xff\xff\xff\xff\xff", 8);  // -2
  buffer += std::string("\x07\x01\x00\x00", 4);                  // 263
  buffer += std::string("\x00\x3e", 2);                          // fp16 1.5
  buffer += std::string("\xc0\xbf", 2);                          // bf16 -1.5
  const std::string path = TempPath("hand.safetensors");
  WriteFile(path, HandFile(header, buffer));

  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_THAT((*f)->names(),
              ElementsAre("f32", "f64", "i64", "i32", "f16", "bf16", "empty"));
  EXPECT_EQ((*f)->metadata().at("format"), "pt");
  EXPECT_EQ((*f)->buffer_size(), 32u);
  EXPECT_THAT(*(*f)->Read("f32")->ToVector<float>(), ElementsAre(1.5f, -2.0f));
  Tensor f64 = *(*f)->Read("f64");
  EXPECT_EQ(f64.ndim(), 0);
  EXPECT_THAT(*f64.ToVector<double>(), ElementsAre(3.0));
  EXPECT_THAT(*(*f)->Read("i64")->ToVector<int64_t>(), ElementsAre(-2));
  Tensor i32 = *(*f)->Read("i32");
  EXPECT_EQ(i32.shape(), (Shape{1, 1}));
  EXPECT_THAT(*i32.ToVector<int32_t>(), ElementsAre(263));
  EXPECT_THAT((*f)->Read("f16")->ToDoubles(), ElementsAre(1.5));
  EXPECT_EQ((*f)->Read("f16")->dtype(), DType::kFloat16);
  EXPECT_THAT((*f)->Read("bf16")->ToDoubles(), ElementsAre(-1.5));
  EXPECT_EQ((*f)->Read("bf16")->dtype(), DType::kBFloat16);
  Tensor empty = *(*f)->Read("empty");
  EXPECT_EQ(empty.shape(), (Shape{0, 3}));
  SafetensorsTensorInfo info = *(*f)->info("i32");
  EXPECT_EQ(info.dtype_name, "I32");
  EXPECT_EQ(info.data_begin, 24u);
  EXPECT_EQ(info.data_end, 28u);
  EXPECT_EQ(info.element_size, 4u);
}

// The writer's bytes, compared with a file assembled by hand.
TEST(SafetensorsTest, WriterProducesTheExpectedBytes) {
  const std::string path = TempPath("writer_bytes.safetensors");
  Tensor a = *Tensor::FromVector<int32_t>({1, -1}, {2});
  Tensor b = *Tensor::FromVector<double>({0.5}, {});
  ASSERT_TRUE(WriteSafetensors(path, {{"a", a}, {"b", b}}, {{"k", "v"}}).ok());
  // Wider elements first: b (F64) at 0, a (I32) at 8. Keys sorted; padded to
  // a multiple of 8 with spaces.
  std::string header =
      R"({"__metadata__":{"k":"v"},)"
      R"("a":{"data_offsets":[8,16],"dtype":"I32","shape":[2]},)"
      R"("b":{"data_offsets":[0,8],"dtype":"F64","shape":[]}})";
  while (header.size() % 8 != 0) header += ' ';
  const std::string buffer =
      std::string("\x00\x00\x00\x00\x00\x00\xe0\x3f", 8) +  // 0.5
      std::string("\x01\x00\x00\x00\xff\xff\xff\xff", 8);   // 1, -1
  EXPECT_EQ(ReadFile(path), HandFile(header, buffer));
}

// ---- Round trips ----

TEST(SafetensorsTest, RoundTripsEveryDTypeAndShape) {
  const std::vector<Shape> shapes = {{},        {0},    {5},
                                     {3, 0, 2}, {4, 3}, {2, 3, 5}};
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (DType dt : kAllDTypes) {
    for (size_t s = 0; s < shapes.size(); ++s) {
      tensors.emplace_back(absl::StrCat(DTypeName(dt), "/", s),
                           Iota(shapes[s], dt, static_cast<double>(s)));
    }
  }
  // A strided view is written as its contiguous elements.
  Tensor parent = Iota({4, 6}, DType::kFloat32);
  tensors.emplace_back("view", *parent.Narrow(1, 2, 3));
  const std::string path = TempPath("roundtrip.safetensors");
  ASSERT_TRUE(
      WriteSafetensors(path, tensors, {{"format", "pt"}, {"x", "ü"}}).ok());
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);

  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->names().size(), tensors.size());
  EXPECT_EQ((*f)->metadata().at("x"), "ü");
  for (const auto& [name, t] : tensors) {
    SCOPED_TRACE(name);
    Tensor r = *(*f)->Read(name);
    EXPECT_EQ(r.dtype(), t.dtype());
    EXPECT_EQ(r.shape(), t.shape());
    EXPECT_EQ(Bytes(r), Bytes(t));
    // Every tensor is aligned to its element size within the file.
    SafetensorsTensorInfo info = *(*f)->info(name);
    EXPECT_EQ(
        (8 + (static_cast<uint64_t>(st.st_size) - 8 - (*f)->buffer_size()) +
         info.data_begin) %
            info.element_size,
        0u);
  }
  EXPECT_EQ(Bytes(*(*f)->Read("view")), Bytes(*parent.Narrow(1, 2, 3)));
}

TEST(SafetensorsTest, WriterReplacesAnExistingFileAndLeavesNoTempFiles) {
  const std::string dir = TempPath("replace_dir");
  ::mkdir(dir.c_str(), 0755);
  const std::string path = dir + "/m.safetensors";
  Tensor a = Iota({3}, DType::kFloat32);
  Tensor b = Iota({2, 2}, DType::kInt64);
  ASSERT_TRUE(WriteSafetensors(path, {{"a", a}}).ok());
  ASSERT_TRUE(WriteSafetensors(path, {{"b", b}}).ok());
  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_THAT((*f)->names(), ElementsAre("b"));
  EXPECT_FALSE(WriteSafetensors(path, {{"", a}}).ok());
  // Only the final file is in the directory.
  int entries = 0;
  std::unique_ptr<FILE, int (*)(FILE*)> ls(
      ::popen(absl::StrCat("ls -A ", dir).c_str(), "r"), ::pclose);
  char line[512];
  while (std::fgets(line, sizeof(line), ls.get()) != nullptr) {
    ++entries;
    EXPECT_EQ(std::string(line), "m.safetensors\n");
  }
  EXPECT_EQ(entries, 1);
}

TEST(SafetensorsTest, WriterRejectsBadInput) {
  Tensor a = Iota({2}, DType::kFloat32);
  const std::string path = TempPath("bad_writer.safetensors");
  auto expect_invalid = [](const absl::Status& s, const std::string& part) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(part));
  };
  expect_invalid(WriteSafetensors(path, {{"x", a}, {"x", a}}),
                 "duplicate tensor name 'x'");
  expect_invalid(WriteSafetensors(path, {{"__metadata__", a}}),
                 "invalid tensor name '__metadata__'");
  expect_invalid(WriteSafetensors(path, {{"", a}}), "invalid tensor name");
  expect_invalid(WriteSafetensors(path, {{"u", Tensor()}}),
                 "'u' is not a defined CPU tensor");
  expect_invalid(WriteSafetensors(path, {{"bad\xff", a}}), "UTF-8");
  expect_invalid(WriteSafetensors(path, {{"a", a}}, {{"k", "\xc3"}}), "UTF-8");
  absl::Status s =
      WriteSafetensors("/nonexistent_dir_xyz/m.safetensors", {{"a", a}});
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("/nonexistent_dir_xyz"));
  EXPECT_NE(::access(path.c_str(), F_OK), 0);  // nothing written
}

// ---- Slices ----

TEST(SafetensorsTest, ReadSliceEqualsNarrowOfRead) {
  const std::string path = TempPath("slices.safetensors");
  std::vector<std::pair<std::string, Tensor>> tensors = {
      {"a", Iota({6, 4, 5}, DType::kFloat32)},
      {"b", Iota({7}, DType::kBFloat16)},
      {"c", Iota({3, 8}, DType::kInt64)},
      {"d", Iota({2, 0, 3}, DType::kFloat64)}};
  ASSERT_TRUE(WriteSafetensors(path, tensors).ok());
  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  int checked = 0;
  for (const auto& [name, t] : tensors) {
    Tensor full = *(*f)->Read(name);
    for (int dim = 0; dim < t.ndim(); ++dim) {
      const int64_t n = t.dim(dim);
      for (int64_t start = 0; start <= n; ++start) {
        for (int64_t len = 0; start + len <= n; ++len) {
          SCOPED_TRACE(
              absl::StrCat(name, " dim ", dim, " [", start, ", +", len, ")"));
          auto slice = (*f)->ReadSlice(name, dim, start, len);
          ASSERT_TRUE(slice.ok()) << slice.status();
          Tensor expected = *full.Narrow(dim, start, len);
          EXPECT_EQ(slice->shape(), expected.shape());
          EXPECT_TRUE(slice->is_contiguous());
          EXPECT_EQ(Bytes(*slice), Bytes(expected));
          // Negative dims count from the end.
          EXPECT_EQ(Bytes(*(*f)->ReadSlice(name, dim - t.ndim(), start, len)),
                    Bytes(expected));
          ++checked;
        }
      }
    }
  }
  EXPECT_GT(checked, 100);
}

// Files are read by runs (pread), gathered runs (preadv) and windows with
// gaps (bounce buffer); a buffer opened from memory copies each run. All must
// agree with Narrow of a whole read from memory.
TEST(SafetensorsTest, FileReadsOfLongAndShortRunsMatchTheInMemoryReader) {
  const std::string path = TempPath("runs.safetensors");
  std::vector<std::pair<std::string, Tensor>> tensors = {
      {"rows8k", Iota({24, 2048}, DType::kFloat32)},    // 8 KB rows
      {"rows1k", Iota({16, 3, 128}, DType::kFloat16)},  // short rows
      {"long", Iota({5000}, DType::kFloat64)}};         // one 40 KB run
  ASSERT_TRUE(WriteSafetensors(path, tensors).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  auto memory = SafetensorsFile::OpenFromBuffer(ReadFile(path));
  ASSERT_TRUE(memory.ok()) << memory.status();
  for (const auto& [name, t] : tensors) {
    SCOPED_TRACE(name);
    Tensor whole = *(*memory)->Read(name);
    EXPECT_EQ(Bytes(whole), Bytes(t));
    EXPECT_EQ(Bytes(*(*file)->Read(name)), Bytes(t));
    for (int dim = 0; dim < t.ndim(); ++dim) {
      const int64_t n = t.dim(dim);
      for (int64_t start : {int64_t{0}, n / 3, n - 1}) {
        for (int64_t len : {int64_t{1}, (n - start) / 2, n - start}) {
          SCOPED_TRACE(absl::StrCat("dim ", dim, " [", start, ", +", len, ")"));
          const std::string expected = Bytes(*whole.Narrow(dim, start, len));
          EXPECT_EQ(Bytes(*(*file)->ReadSlice(name, dim, start, len)),
                    expected);
          // Into a strided view: the slice inside a zero tensor one larger
          // along the last dim.
          Shape padded = t.shape();
          padded[dim] = len;
          padded.back() += 1;
          Tensor host = Tensor::Zeros(padded, t.dtype());
          Tensor view = *host.Narrow(t.ndim() - 1, 1, padded.back() - 1);
          ASSERT_TRUE((*file)->ReadSliceInto(name, dim, start, view).ok());
          EXPECT_EQ(Bytes(view), expected);
        }
      }
    }
  }
}

// A file cut short after Open: reads past the new end report kDataLoss
// instead of faulting.
TEST(SafetensorsTest, FileTruncatedWhileOpenIsDataLoss) {
  const std::string path = TempPath("truncated_later.safetensors");
  ASSERT_TRUE(
      WriteSafetensors(path, {{"w", Iota({64, 1024}, DType::kFloat32)}}).ok());
  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_EQ(::truncate(path.c_str(), 128 * 1024), 0);
  absl::Status s = (*f)->Read("w").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("truncated while open"));
  s = (*f)->ReadSlice("w", 0, 48, 16).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  // Short rows with gaps (read in windows) and touching rows (preadv).
  s = (*f)->ReadSlice("w", 1, 5, 3).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  Tensor host = Tensor::Zeros({64, 1025}, DType::kFloat32);
  Tensor view = *host.Narrow(1, 1, 1024);
  s = (*f)->ReadSliceInto("w", 0, 0, view);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  // Rows inside what is left still read.
  EXPECT_TRUE((*f)->ReadSlice("w", 0, 0, 16).ok());
}

TEST(SafetensorsTest, ReadSliceIntoFillsAStridedView) {
  const std::string path = TempPath("slice_into.safetensors");
  Tensor w = Iota({4, 6}, DType::kFloat16);
  ASSERT_TRUE(WriteSafetensors(path, {{"w", w}}).ok());
  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  // dst: columns 1..3 of a [4, 8] zero tensor, filled with w[:, 2:5].
  Tensor big = Tensor::Zeros({4, 8}, DType::kFloat16);
  Tensor view = *big.Narrow(1, 1, 3);
  ASSERT_TRUE((*f)->ReadSliceInto("w", 1, 2, view).ok());
  std::vector<double> got = big.ToDoubles();
  std::vector<double> ref = w.ToDoubles();
  for (int r = 0; r < 4; ++r) {
    for (int c = 0; c < 8; ++c) {
      const double expected = (c >= 1 && c < 4) ? ref[r * 6 + (c - 1 + 2)] : 0;
      EXPECT_EQ(got[r * 8 + c], expected) << r << "," << c;
    }
  }
  // A column view of a transposed-like layout: rows 1..2 of a [4, 6] into a
  // Narrow along dim 0 (contiguous rows, offset storage).
  Tensor rows = Tensor::Zeros({5, 6}, DType::kFloat16);
  Tensor rows_view = *rows.Narrow(0, 3, 2);
  ASSERT_TRUE((*f)->ReadSliceInto("w", 0, 1, rows_view).ok());
  EXPECT_EQ(Bytes(rows_view), Bytes(*w.Narrow(0, 1, 2)));
  EXPECT_EQ(Bytes(*rows.Narrow(0, 0, 3)),
            Bytes(Tensor::Zeros({3, 6}, DType::kFloat16)));
}

TEST(SafetensorsTest, SliceArgumentErrorsNameTheTensor) {
  const std::string path = TempPath("slice_err.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"w", Iota({4, 6}, DType::kFloat32)},
                                      {"s", Iota({}, DType::kFloat32)}})
                  .ok());
  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  auto invalid = [](const absl::Status& s, const std::string& part) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(part)) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("slice_err.safetensors"));
  };
  invalid((*f)->ReadSlice("w", 2, 0, 1).status(), "tensor 'w': dim 2");
  invalid((*f)->ReadSlice("w", -3, 0, 1).status(), "dim -3");
  invalid((*f)->ReadSlice("w", 0, 3, 2).status(), "out of range for dim 0");
  invalid((*f)->ReadSlice("w", 1, -1, 2).status(), "out of range");
  invalid((*f)->ReadSlice("w", 1, 0, -1).status(), "out of range");
  invalid((*f)->ReadSlice("s", 0, 0, 1).status(), "tensor 's': dim 0");
  Tensor wrong_shape = Tensor::Empty({2, 5}, DType::kFloat32);
  invalid((*f)->ReadSliceInto("w", 0, 0, wrong_shape), "destination shape");
  Tensor wrong_dtype = Tensor::Empty({2, 6}, DType::kFloat64);
  invalid((*f)->ReadSliceInto("w", 0, 0, wrong_dtype),
          "destination is float64");
  Tensor undefined;
  invalid((*f)->ReadSliceInto("w", 0, 0, undefined), "not a defined");
  absl::Status nf = (*f)->Read("nope").status();
  EXPECT_EQ(nf.code(), absl::StatusCode::kNotFound) << nf;
  EXPECT_THAT(std::string(nf.message()), HasSubstr("no tensor 'nope'"));
  EXPECT_EQ((*f)->info("nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE((*f)->contains("w"));
  EXPECT_FALSE((*f)->contains("nope"));
}

// A valid file with a dtype of the format that has no tp::DType opens, is
// listed, and gives kUnimplemented when read.
TEST(SafetensorsTest, UnsupportedFormatDTypeOpensButCannotBeRead) {
  const std::string header =
      R"({"m":{"dtype":"U8","shape":[3],"data_offsets":[0,3]},)"
      R"("x":{"dtype":"F32","shape":[],"data_offsets":[3,7]}})";
  auto f = SafetensorsFile::OpenFromBuffer(
      HandFile(header, std::string("\x01\x02\x03\x00\x00\x80\x3f", 7)),
      "u8.safetensors");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->info("m")->dtype_name, "U8");
  EXPECT_FALSE((*f)->info("m")->dtype.has_value());
  absl::Status s = (*f)->Read("m").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("tensor 'm': dtype U8"));
  EXPECT_THAT(*(*f)->Read("x")->ToVector<float>(), ElementsAre(1.0f));
}

TEST(SafetensorsTest, DTypeNames) {
  for (DType dt : kAllDTypes) {
    EXPECT_EQ(*ParseSafetensorsDType(SafetensorsDTypeName(dt)), dt);
  }
  EXPECT_EQ(SafetensorsDTypeName(DType::kBFloat16), "BF16");
  EXPECT_EQ(ParseSafetensorsDType("U8").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseSafetensorsDType("f32").status().code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- Malformed files ----

struct Malformed {
  const char* label;
  std::string bytes;
  absl::StatusCode code;
  const char* message;  // a substring of the error
};

std::string Entry(const std::string& name, const std::string& body) {
  return absl::StrCat("\"", name, "\":", body);
}

std::vector<Malformed> MalformedFiles() {
  const std::string ok_a =
      R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const std::string buf8(8, '\0');
  auto file = [&](const std::string& header, const std::string& buffer) {
    return HandFile(header, buffer);
  };
  std::vector<Malformed> cases = {
      {"empty file", "", absl::StatusCode::kDataLoss, "0 bytes"},
      {"short file", "abc", absl::StatusCode::kDataLoss, "too short"},
      {"header length past the end", LE64(100) + "{}",
       absl::StatusCode::kDataLoss, "header length 100 but only 2 bytes"},
      {"huge header length", LE64(~uint64_t{0}) + "{}",
       absl::StatusCode::kInvalidArgument, "exceeds the limit"},
      {"header length just over the cap", LE64(100000001) + "{}",
       absl::StatusCode::kInvalidArgument, "exceeds the limit"},
      {"zero header length", LE64(0), absl::StatusCode::kInvalidArgument,
       "does not start with '{'"},
      {"not starting with a brace", file(" {}", ""),
       absl::StatusCode::kInvalidArgument, "does not start with '{'"},
      {"truncated JSON", file(R"({"a":{"dtype":"F32","sha)", ""),
       absl::StatusCode::kInvalidArgument, "not valid JSON"},
      {"trailing garbage after JSON", file("{}x", ""),
       absl::StatusCode::kInvalidArgument, "not valid JSON"},
      {"invalid UTF-8", file("{\"\xff\":1}", ""),
       absl::StatusCode::kInvalidArgument, "not valid JSON"},
      {"JSON array", LE64(5) + "[1,2]", absl::StatusCode::kInvalidArgument,
       "does not start with '{'"},
      {"entry not an object", file(R"({"a":[1,2]})", ""),
       absl::StatusCode::kInvalidArgument, "tensor 'a': entry is not"},
      {"missing dtype", file(R"({"a":{"shape":[],"data_offsets":[0,0]}})", ""),
       absl::StatusCode::kInvalidArgument, "tensor 'a': missing \"dtype\""},
      {"dtype not a string",
       file(R"({"a":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", buf8),
       absl::StatusCode::kInvalidArgument, "tensor 'a': missing \"dtype\""},
      {"unknown dtype",
       file(R"({"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", buf8),
       absl::StatusCode::kInvalidArgument, "tensor 'a': unknown dtype 'F33'"},
      {"missing shape",
       file(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", buf8),
       absl::StatusCode::kInvalidArgument, "tensor 'a': missing \"shape\""},
      {"shape not an array",
       file(R"({"a":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", buf8),
       absl::StatusCode::kInvalidArgument, "missing \"shape\" array"},
      {"negative shape",
       file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", buf8),
       absl::StatusCode::kInvalidArgument,
       "tensor 'a': shape entry -2 is not a non-negative integer"},
      {"float shape",
       file(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})",
            buf8),
       absl::StatusCode::kInvalidArgument, "is not a non-negative integer"},
      {"string shape",
       file(R"({"a":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})",
            buf8),
       absl::StatusCode::kInvalidArgument, "is not a non-negative integer"},
      {"shape dimension over int64",
       file(R"({"a":{"dtype":"F32","shape":[0,9223372036854775808],)"
            R"("data_offsets":[0,0]}})",
            ""),
       absl::StatusCode::kInvalidArgument, "too large"},
      {"shape product overflows",
       file(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],)"
            R"("data_offsets":[0,0]}})",
            ""),
       absl::StatusCode::kInvalidArgument, "2^63 or more elements"},
      {"bytes overflow",
       file(R"({"a":{"dtype":"F64","shape":[4611686018427387904],)"
            R"("data_offsets":[0,0]}})",
            ""),
       absl::StatusCode::kInvalidArgument, "needs 4611686018427387904 x 8"},
      {"offsets missing", file(R"({"a":{"dtype":"F32","shape":[2]}})", buf8),
       absl::StatusCode::kInvalidArgument, "\"data_offsets\" is not"},
      {"offsets of three",
       file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4,8]}})",
            buf8),
       absl::StatusCode::kInvalidArgument, "\"data_offsets\" is not"},
      {"negative offset",
       file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", buf8),
       absl::StatusCode::kInvalidArgument, "\"data_offsets\" is not"},
      {"reversed offsets",
       file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", buf8),
       absl::StatusCode::kInvalidArgument, "tensor 'a': data_offsets [8, 0]"},
      {"offsets mismatched with shape",
       file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", buf8),
       absl::StatusCode::kInvalidArgument, "hold 8 bytes but shape [3]"},
      {"offsets out of range",
       file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", buf8),
       absl::StatusCode::kDataLoss,
       "tensor 'a': data_offsets [0, 16) end past"},
      {"huge offsets",
       file(R"({"a":{"dtype":"F32","shape":[2],)"
            R"("data_offsets":[18446744073709551608,18446744073709551615]}})",
            buf8),
       absl::StatusCode::kInvalidArgument, "hold 7 bytes"},
      {"huge offsets past the end",
       file(R"({"a":{"dtype":"F32","shape":[2],)"
            R"("data_offsets":[18446744073709551607,18446744073709551615]}})",
            buf8),
       absl::StatusCode::kDataLoss, "end past the byte buffer of 8 bytes"},
      {"overlapping tensors",
       file("{" + Entry("a", ok_a) + "," +
                Entry("b",
                      R"({"dtype":"F32","shape":[1],"data_offsets":[4,8]})") +
                "}",
            buf8),
       absl::StatusCode::kInvalidArgument,
       "tensor 'b': data_offsets [4, 8) overlap tensor 'a'"},
      {"gap between tensors",
       file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", buf8),
       absl::StatusCode::kInvalidArgument, "gap of unindexed bytes [0, 4)"},
      {"trailing bytes", file("{" + Entry("a", ok_a) + "}", buf8 + "xx"),
       absl::StatusCode::kInvalidArgument, "trailing bytes"},
      {"duplicate tensor names",
       file("{" + Entry("a", ok_a) + "," + Entry("a", ok_a) + "}", buf8),
       absl::StatusCode::kInvalidArgument, "duplicate key 'a'"},
      {"duplicate inner keys",
       file(R"({"a":{"dtype":"F32","dtype":"F32","shape":[2],)"
            R"("data_offsets":[0,8]}})",
            buf8),
       absl::StatusCode::kInvalidArgument, "duplicate key 'dtype'"},
      {"metadata not an object", file(R"({"__metadata__":[1]})", ""),
       absl::StatusCode::kInvalidArgument, "\"__metadata__\" is not"},
      {"metadata value not a string", file(R"({"__metadata__":{"k":1}})", ""),
       absl::StatusCode::kInvalidArgument, "value for 'k' is not a string"},
      {"empty name",
       file(R"({"":{"dtype":"F32","shape":[],"data_offsets":[0,4]}})",
            std::string(4, '\0')),
       absl::StatusCode::kInvalidArgument, "empty tensor name"},
  };
  cases.push_back({"control character in name", file("{\"a\x01\":{}}", ""),
                   absl::StatusCode::kInvalidArgument, "not valid JSON"});
  return cases;
}

TEST(SafetensorsTest, MalformedFilesGiveClearErrors) {
  for (const Malformed& m : MalformedFiles()) {
    SCOPED_TRACE(m.label);
    auto from_buffer = SafetensorsFile::OpenFromBuffer(m.bytes, "bad.st");
    ASSERT_FALSE(from_buffer.ok());
    EXPECT_EQ(from_buffer.status().code(), m.code) << from_buffer.status();
    EXPECT_THAT(std::string(from_buffer.status().message()),
                HasSubstr(m.message));
    EXPECT_THAT(std::string(from_buffer.status().message()),
                HasSubstr("safetensors file 'bad.st'"));
    // The same through a real file and mmap.
    const std::string path = TempPath("malformed.safetensors");
    WriteFile(path, m.bytes);
    auto from_file = SafetensorsFile::Open(path);
    ASSERT_FALSE(from_file.ok());
    EXPECT_EQ(from_file.status().code(), m.code);
    EXPECT_THAT(std::string(from_file.status().message()),
                HasSubstr(m.message));
    EXPECT_THAT(std::string(from_file.status().message()), HasSubstr(path));
  }
}

TEST(SafetensorsTest, OpenErrorsFromTheFileSystem) {
  absl::Status s = SafetensorsFile::Open(TempPath("does_not_exist")).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("does_not_exist"));
  s = SafetensorsFile::Open(TempDir()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("not a regular file"));
}

TEST(SafetensorsTest, EmptyObjectIsAValidFileWithNoTensors) {
  auto f = SafetensorsFile::OpenFromBuffer(LE64(8) + "{}      ");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE((*f)->names().empty());
  EXPECT_TRUE((*f)->metadata().empty());
}

// ---- Memory: reads release the pages they touched ----

// Resident bytes of file-backed mappings ("RssFile" in /proc/self/status).
int64_t RssFileBytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("RssFile:", 0) == 0) {
      return std::atoll(line.c_str() + 8) * 1024;
    }
  }
  return -1;
}

// "VmRSS" / "VmHWM" of /proc/self/status in bytes.
int64_t StatusBytes(const std::string& key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) {
      return std::atoll(line.c_str() + key.size() + 1) * 1024;
    }
  }
  return -1;
}

// Resets VmHWM to the current RSS (Linux >= 4.0); false if not permitted.
bool ResetPeakRss() {
  std::ofstream out("/proc/self/clear_refs");
  out << "5";
  out.flush();
  return out.good();
}

// The peak, not only the end state: a slice read adds what it copies out
// (into preallocated tensors here: nothing) plus at most its 256 KB bounce
// buffer -- no page of the file, whether the slice is one run (rows), runs of
// 4 KB (columns) or 1 KB runs with gaps (gathered into windows) -- far below
// the 32 MB tensor.
TEST(SafetensorsTest, SliceReadsPeakAtTheirOwnPages) {
  const int64_t rows = 2048, cols = 4096;  // 32 MB
  const std::string path = TempPath("peak.safetensors");
  ASSERT_TRUE(WriteSafetensors(
                  path, {{"w", Tensor::Zeros({rows, cols}, DType::kFloat32)}})
                  .ok());
  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  Tensor eighth_rows = Tensor::Zeros({rows / 8, cols}, DType::kFloat32);
  Tensor quarter_cols = Tensor::Zeros({rows, cols / 4}, DType::kFloat32);
  Tensor sixteenth_cols = Tensor::Zeros({rows, cols / 16}, DType::kFloat32);
#if defined(__SANITIZE_THREAD__)
  // ThreadSanitizer maps shadow memory for every page the reader touches,
  // which inflates VmHWM several-fold: the figure measures TSan, not us.
  GTEST_SKIP() << "resident-memory peaks are not meaningful under TSan";
#endif
  if (!ResetPeakRss()) GTEST_SKIP() << "cannot write /proc/self/clear_refs";
  struct Case {
    const char* label;
    int dim;
    int64_t start;
    Tensor* dst;
    int64_t limit;
  };
  const Case cases[] = {
      {"row slice", 0, rows / 2, &eighth_rows, 1 << 20},
      {"4 KB column rows", 1, cols / 2, &quarter_cols, 1 << 20},
      {"1 KB column rows", 1, cols / 4, &sixteenth_cols, 1 << 20},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.label);
    ASSERT_TRUE(ResetPeakRss());
    const int64_t base = StatusBytes("VmRSS");
    ASSERT_TRUE((*f)->ReadSliceInto("w", c.dim, c.start, *c.dst).ok());
    const int64_t peak = StatusBytes("VmHWM") - base;
    RecordProperty(c.label, std::to_string(peak));
    EXPECT_LT(peak, c.limit) << peak;
  }
}

TEST(SafetensorsTest, ReadsDoNotKeepTheFileResident) {
  // 32 MB of float32, read as a row slice, column slices (long and short
  // rows) and whole.
  const int64_t rows = 2048, cols = 4096;
  Tensor w = Tensor::Zeros({rows, cols}, DType::kFloat32);
  const std::string path = TempPath("big.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"w", w}}).ok());
  w = Tensor();
  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  Tensor quarter_rows = Tensor::Zeros({rows / 4, cols}, DType::kFloat32);
  Tensor quarter_cols = Tensor::Zeros({rows, cols / 4}, DType::kFloat32);
  Tensor short_cols = Tensor::Zeros({rows, 16}, DType::kFloat32);
  const int64_t before = RssFileBytes();
  ASSERT_GE(before, 0);
  ASSERT_TRUE((*f)->ReadSliceInto("w", 0, rows / 4, quarter_rows).ok());
  ASSERT_TRUE((*f)->ReadSliceInto("w", 1, cols / 4, quarter_cols).ok());
  ASSERT_TRUE((*f)->ReadSliceInto("w", 1, 3, short_cols).ok());
  ASSERT_TRUE((*f)->Read("w").ok());
  const int64_t after = RssFileBytes();
  // Copied from a mapping, up to 32 MB could stay resident; allow 1 MB of
  // noise (other file mappings of the process).
  EXPECT_LT(after - before, 1 << 20) << before << " -> " << after;
}

}  // namespace
}  // namespace tp
