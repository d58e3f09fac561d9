#include "runtime/tensor.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include <algorithm>

#include "absl/strings/str_join.h"
#include "runtime/status_macros.h"
#include "glog/logging.h"

namespace tp {
namespace {

std::vector<int64_t> ContiguousStrides(const Shape& shape) {
  std::vector<int64_t> strides(shape.size());
  int64_t s = 1;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
}

// Copies a strided source region into a strided destination region of the
// same shape, element size `esize`. The innermost dimension is copied with
// memcpy when both have unit stride there.
void StridedCopy(char* dst, const std::vector<int64_t>& dst_strides,
                 const char* src, const std::vector<int64_t>& src_strides,
                 const Shape& shape, size_t esize) {
  const int nd = static_cast<int>(shape.size());
  if (NumElements(shape) == 0) return;
  if (nd == 0) {
    std::memcpy(dst, src, esize);
    return;
  }
  const int64_t inner = shape[nd - 1];
  const bool inner_unit = dst_strides[nd - 1] == 1 && src_strides[nd - 1] == 1;
  std::vector<int64_t> index(nd - 1, 0);
  while (true) {
    int64_t doff = 0, soff = 0;
    for (int d = 0; d < nd - 1; ++d) {
      doff += index[d] * dst_strides[d];
      soff += index[d] * src_strides[d];
    }
    if (inner_unit) {
      std::memcpy(dst + doff * esize, src + soff * esize, inner * esize);
    } else {
      for (int64_t i = 0; i < inner; ++i) {
        std::memcpy(dst + (doff + i * dst_strides[nd - 1]) * esize,
                    src + (soff + i * src_strides[nd - 1]) * esize, esize);
      }
    }
    int d = nd - 2;
    for (; d >= 0; --d) {
      if (++index[d] < shape[d]) break;
      index[d] = 0;
    }
    if (d < 0) break;
  }
}

}  // namespace

std::string ShapeToString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

int64_t NumElements(absl::Span<const int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<std::shared_ptr<Storage>> Storage::Allocate(size_t nbytes,
                                                           Device device) {
  if (!device.is_cpu()) {
    return absl::UnimplementedError(
        absl::StrCat("Storage::Allocate: ", device.ToString(),
                     " needs a build with --config=cuda"));
  }
  // malloc + manual alignment rather than aligned_alloc: glibc serves large
  // aligned_alloc requests with a fresh mmap every time (its dynamic mmap
  // threshold does not apply to them), so each new op output paid ~300 us of
  // page faults per MB; malloc reuses freed heap blocks (up to 32 MB).
  constexpr size_t kAlign = 64;
  void* base = std::malloc(nbytes + kAlign);
  if (base == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("Storage::Allocate: cannot allocate ", nbytes, " bytes"));
  }
  const uintptr_t addr = reinterpret_cast<uintptr_t>(base);
  void* data = reinterpret_cast<void*>((addr + kAlign - 1) / kAlign * kAlign);
  // Blocks of 32 MB and more are always fresh mmaps in glibc; ask for
  // transparent huge pages (a no-op where THP is off) so the first write
  // takes one fault per 2 MB instead of per 4 KB: 12 ms -> 2.3 ms for 32 MB.
  constexpr size_t kHugeThreshold = size_t{32} << 20;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (nbytes >= kHugeThreshold) {
    const uintptr_t begin = (addr + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t end = (addr + nbytes) & ~(kHuge - 1);
    if (end > begin) {
      // Advisory only: failure (e.g. an old kernel) changes nothing.
      madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
    }
  }
  return std::shared_ptr<Storage>(new Storage(base, data, nbytes, device));
}

Storage::~Storage() { std::free(base_); }

Tensor Tensor::EmptyStrided(Shape shape, DType dtype, Device device) {
  for (int64_t d : shape) {
    CHECK_GE(d, 0) << "negative dimension in " << ShapeToString(shape);
  }
  Tensor t;
  auto storage = Storage::Allocate(
      static_cast<size_t>(NumElements(shape)) * DTypeSize(dtype), device);
  CHECK(storage.ok()) << storage.status();
  t.storage_ = *std::move(storage);
  t.strides_ = ContiguousStrides(shape);
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  return t;
}

Tensor Tensor::Empty(Shape shape, DType dtype, Device device) {
  return EmptyStrided(std::move(shape), dtype, device);
}

Tensor Tensor::Zeros(Shape shape, DType dtype, Device device) {
  Tensor t = Empty(std::move(shape), dtype, device);
  std::memset(t.raw_data(), 0, t.nbytes());  // 0 bits are 0 in every dtype.
  return t;
}

Tensor Tensor::Full(Shape shape, double value, DType dtype, Device device) {
  Tensor t = Empty(std::move(shape), dtype, device);
  DispatchDType(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T v = ElementFromDouble<T>(value);
    T* p = static_cast<T*>(t.raw_data());
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = v;
  });
  return t;
}

absl::StatusOr<Tensor> Tensor::FromDoubles(absl::Span<const double> values,
                                           Shape shape, DType dtype) {
  absl::StatusOr<Tensor> as_double = FromVector<double>(values, shape);
  if (!as_double.ok()) return as_double.status();
  Tensor t = Empty(std::move(shape), dtype);
  DispatchDType(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* p = static_cast<T*>(t.raw_data());
    for (size_t i = 0; i < values.size(); ++i) {
      p[i] = ElementFromDouble<T>(values[i]);
    }
  });
  return t;
}

int64_t Tensor::dim(int d) const {
  const int nd = ndim();
  if (d < 0) d += nd;
  CHECK(d >= 0 && d < nd) << "dimension " << d << " out of range for shape "
                          << ShapeToString(shape_);
  return shape_[d];
}

bool Tensor::is_contiguous() const {
  return strides_ == ContiguousStrides(shape_);
}

void* Tensor::raw_data() const {
  if (storage_ == nullptr) return nullptr;
  return static_cast<char*>(storage_->data()) + offset_ * element_size();
}

void Tensor::CheckDType(DType expected) const {
  CHECK(dtype_ == expected) << "tensor is " << DTypeName(dtype_)
                            << ", accessed as " << DTypeName(expected);
}

Tensor Tensor::Clone() const {
  if (!defined()) return Tensor();
  Tensor out = Empty(shape_, dtype_, device_);
  StridedCopy(static_cast<char*>(out.raw_data()), out.strides_,
              static_cast<const char*>(raw_data()), strides_, shape_,
              element_size());
  return out;
}

Tensor Tensor::Contiguous() const {
  if (!defined() || is_contiguous()) return *this;
  return Clone();
}

absl::StatusOr<Tensor> Tensor::Narrow(int dim, int64_t start,
                                      int64_t length) const {
  const int nd = ndim();
  const int d = dim < 0 ? dim + nd : dim;
  if (d < 0 || d >= nd) {
    return absl::InvalidArgumentError(
        absl::StrCat("Tensor::Narrow: dim ", dim, " out of range for shape ",
                     ShapeToString(shape_)));
  }
  if (start < 0 || length < 0 || start > shape_[d] - length) {
    // The end is printed as a sum where `start + length` would overflow.
    int64_t end_value = 0;
    const std::string end = __builtin_add_overflow(start, length, &end_value)
                                ? absl::StrCat(start, " + ", length)
                                : absl::StrCat(end_value);
    return absl::InvalidArgumentError(absl::StrCat(
        "Tensor::Narrow: [", start, ", ", end, ") out of range for dim ", d,
        " of shape ", ShapeToString(shape_)));
  }
  Tensor view = *this;
  view.shape_[d] = length;
  view.offset_ += start * strides_[d];
  return view;
}

absl::StatusOr<Tensor> Tensor::Reshape(Shape shape) const {
  int infer = -1;
  int64_t known = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1 && infer < 0) {
      infer = static_cast<int>(i);
    } else if (shape[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("Tensor::Reshape: invalid shape ", ShapeToString(shape)));
    } else {
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    if (known == 0 || numel() % known != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("Tensor::Reshape: cannot reshape ", ShapeToString(shape_),
                       " into ", ShapeToString(shape)));
    }
    shape[infer] = numel() / known;
  }
  if (NumElements(shape) != numel()) {
    return absl::InvalidArgumentError(
        absl::StrCat("Tensor::Reshape: cannot reshape ", ShapeToString(shape_),
                     " (", numel(), " elements) into ", ShapeToString(shape)));
  }
  Tensor out = Contiguous();
  out.strides_ = ContiguousStrides(shape);
  out.shape_ = std::move(shape);
  return out;
}

absl::Status Tensor::CopyFrom(const Tensor& src) {
  if (src.shape_ != shape_ || src.dtype_ != dtype_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Tensor::CopyFrom: destination ", DTypeName(dtype_),
        ShapeToString(shape_), ", source ", DTypeName(src.dtype_),
        ShapeToString(src.shape_)));
  }
  if (!device_.is_cpu() || !src.device_.is_cpu()) {
    return absl::UnimplementedError(
        "Tensor::CopyFrom: only CPU tensors in this build");
  }
  StridedCopy(static_cast<char*>(raw_data()), strides_,
              static_cast<const char*>(src.raw_data()), src.strides_, shape_,
              element_size());
  return absl::OkStatus();
}

absl::StatusOr<Tensor> Tensor::To(Device device) const {
  if (device == device_) return *this;
  return absl::UnimplementedError(
      absl::StrCat("Tensor::To: copy from ", device_.ToString(), " to ",
                   device.ToString(), " needs a build with --config=cuda"));
}

std::vector<double> Tensor::ToDoubles() const {
  std::vector<double> out;
  if (!defined()) return out;
  Tensor c = Contiguous();
  out.resize(numel());
  DispatchDType(dtype_, [&](auto tag) {
    using T = decltype(tag);
    const T* p = static_cast<const T*>(c.raw_data());
    for (int64_t i = 0; i < numel(); ++i) out[i] = ElementToDouble<T>(p[i]);
  });
  return out;
}

std::string Tensor::DebugString(int max_elements) const {
  if (!defined()) return "Tensor(undefined)";
  std::string s = absl::StrCat("Tensor(", DTypeName(dtype_), ", ",
                               ShapeToString(shape_), ", ", device_.ToString(),
                               ")");
  if (!device_.is_cpu()) return s;
  const std::vector<double> v = ToDoubles();
  const size_t shown = std::min<size_t>(v.size(), std::max(0, max_elements));
  absl::StrAppend(&s, " [",
                  absl::StrJoin(v.begin(), v.begin() + shown, ", "),
                  shown < v.size() ? ", ...]" : "]");
  return s;
}

absl::Status CheckShape(const Tensor& t, absl::Span<const int64_t> expected,
                        absl::string_view what) {
  if (absl::Span<const int64_t>(t.shape()) == expected) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(what, ": expected shape ", ShapeToString(expected),
                   " but got ", ShapeToString(t.shape())));
}

absl::Status CheckDType(const Tensor& t, DType expected, absl::string_view what) {
  if (t.dtype() == expected) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(what, ": expected dtype ", DTypeName(expected), " but got ",
                   DTypeName(t.dtype())));
}

}  // namespace tp
