// Tensor: an n-dimensional array with a shape, a dtype and a device.
//
// Storage is shared: copying a Tensor makes another handle to the same bytes
// (like torch.Tensor); Clone() deep-copies. Tensors are row-major; a view made
// by Narrow() keeps the parent's strides and may be non-contiguous, every other
// factory and op returns contiguous tensors. Kernels that need contiguous data
// call Contiguous(), which is free for a contiguous tensor.
//
// Fallible calls (shape/dtype checks on user input) return absl::Status; typed
// raw access (data<T>()) is for code that has already checked the dtype and
// CHECK-fails on a mismatch, which is a programmer error.
//
// Thread safety: const methods may be called concurrently; writes to the same
// storage from several threads need external synchronization.
//
// Example:
//   ASSIGN_OR_RETURN(tp::Tensor x,
//                    tp::Tensor::FromVector<float>({1, 2, 3, 4, 5, 6}, {2, 3}));
//   ASSIGN_OR_RETURN(tp::Tensor col, x.Narrow(1, 1, 2));   // [[2,3],[5,6]]
//   ASSIGN_OR_RETURN(std::vector<float> v, col.ToVector<float>());
#ifndef TENSOR_PARALLEL_RUNTIME_TENSOR_H_
#define TENSOR_PARALLEL_RUNTIME_TENSOR_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "runtime/device.h"
#include "runtime/dtype.h"

namespace tp {

using Shape = std::vector<int64_t>;

// "[2, 3]".
std::string ShapeToString(absl::Span<const int64_t> shape);
// Product of the dimensions (1 for a scalar shape []).
int64_t NumElements(absl::Span<const int64_t> shape);

// A block of bytes on one device, shared by tensors (and views) over it.
class Storage {
 public:
  // Allocates `nbytes` (64-byte aligned on the CPU). Contents are undefined.
  static absl::StatusOr<std::shared_ptr<Storage>> Allocate(size_t nbytes,
                                                           Device device);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }
  Device device() const { return device_; }

 private:
  Storage(void* base, void* data, size_t nbytes, Device device)
      : base_(base), data_(data), nbytes_(nbytes), device_(device) {}
  void* base_;  // what malloc returned; data_ is base_ rounded up to 64 bytes
  void* data_;
  size_t nbytes_;
  Device device_;
};

class Tensor {
 public:
  // An undefined tensor: no storage, defined() is false.
  Tensor() = default;

  // Uninitialized contents. Dimensions must be >= 0 (CHECKed); the only
  // device without a CUDA build is the CPU (CHECKed: see To()).
  static Tensor Empty(Shape shape, DType dtype, Device device = Device::Cpu());
  static Tensor Zeros(Shape shape, DType dtype, Device device = Device::Cpu());
  // Every element set to `value` converted to `dtype`.
  static Tensor Full(Shape shape, double value, DType dtype,
                     Device device = Device::Cpu());
  // Copies `values` into a new CPU tensor of `shape`; kInvalidArgument when
  // the element count differs or a dimension is negative. T is explicit:
  // FromVector<float>({1, 2}, {2}) or FromVector<float>(std_vector, shape).
  template <typename T>
  static absl::StatusOr<Tensor> FromVector(absl::Span<const T> values,
                                           Shape shape);
  // Converts each double to `dtype` (rounding for fp16/bf16, truncating for
  // integers).
  static absl::StatusOr<Tensor> FromDoubles(absl::Span<const double> values,
                                            Shape shape, DType dtype);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  const std::vector<int64_t>& strides() const { return strides_; }  // elements
  int ndim() const { return static_cast<int>(shape_.size()); }
  // Size of dimension `d`; negative `d` counts from the end. CHECKs range.
  int64_t dim(int d) const;
  int64_t numel() const { return NumElements(shape_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  size_t element_size() const { return DTypeSize(dtype_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * element_size(); }
  bool is_contiguous() const;
  // True when both share storage (views of one another or copies).
  bool SharesStorageWith(const Tensor& other) const {
    return storage_ != nullptr && storage_ == other.storage_;
  }

  // Address of the first element. The typed form CHECKs the dtype.
  void* raw_data() const;
  template <typename T>
  T* data() const;

  // A deep copy, contiguous.
  Tensor Clone() const;
  // This tensor if contiguous, else a contiguous copy.
  Tensor Contiguous() const;
  // A view of `length` entries of dimension `dim` starting at `start`.
  // kInvalidArgument when out of range.
  absl::StatusOr<Tensor> Narrow(int dim, int64_t start, int64_t length) const;
  // Same elements in a new shape; one dimension may be -1 (inferred). A view
  // when contiguous, else a copy. kInvalidArgument when counts differ.
  absl::StatusOr<Tensor> Reshape(Shape shape) const;
  // Copies `src` element-wise into this tensor (either may be a view).
  // kInvalidArgument when shape or dtype differ.
  absl::Status CopyFrom(const Tensor& src);
  // A copy on `device`; the same tensor when already there.
  // kUnimplemented for CUDA in a build without CUDA.
  absl::StatusOr<Tensor> To(Device device) const;

  // The elements in row-major order; kInvalidArgument if T is not the dtype.
  template <typename T>
  absl::StatusOr<std::vector<T>> ToVector() const;
  // The elements converted to double, for any dtype (for tests and debugging).
  std::vector<double> ToDoubles() const;

  // "Tensor(float32, [2, 3], cpu) [1, 2, 3, 4, 5, 6]" with at most
  // `max_elements` values shown.
  std::string DebugString(int max_elements = 16) const;

 private:
  static Tensor EmptyStrided(Shape shape, DType dtype, Device device);
  void CheckDType(DType expected) const;

  std::shared_ptr<Storage> storage_;
  Shape shape_;
  std::vector<int64_t> strides_;
  int64_t offset_ = 0;  // in elements
  DType dtype_ = DType::kFloat32;
  Device device_ = Device::Cpu();
};

// kInvalidArgument "<what>: expected shape [..] but got [..]" unless equal.
absl::Status CheckShape(const Tensor& t, absl::Span<const int64_t> expected,
                        absl::string_view what);
// kInvalidArgument "<what>: expected dtype X but got Y" unless equal.
absl::Status CheckDType(const Tensor& t, DType expected, absl::string_view what);

// ---- template implementations ----

template <typename T>
T* Tensor::data() const {
  CheckDType(DTypeOf<T>::value);
  return static_cast<T*>(raw_data());
}

template <typename T>
absl::StatusOr<Tensor> Tensor::FromVector(absl::Span<const T> values,
                                          Shape shape) {
  for (int64_t d : shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Tensor::FromVector: negative dimension in ", ShapeToString(shape)));
    }
  }
  if (static_cast<int64_t>(values.size()) != NumElements(shape)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Tensor::FromVector: ", values.size(), " values for shape ",
        ShapeToString(shape), " (", NumElements(shape), " elements)"));
  }
  Tensor t = Empty(std::move(shape), DTypeOf<T>::value);
  T* out = t.data<T>();
  for (size_t i = 0; i < values.size(); ++i) out[i] = values[i];
  return t;
}

template <typename T>
absl::StatusOr<std::vector<T>> Tensor::ToVector() const {
  if (DTypeOf<T>::value != dtype_) {
    return absl::InvalidArgumentError(
        absl::StrCat("Tensor::ToVector: tensor is ", DTypeName(dtype_),
                     ", asked for ", DTypeName(DTypeOf<T>::value)));
  }
  if (!device_.is_cpu()) {
    return absl::InvalidArgumentError(
        absl::StrCat("Tensor::ToVector: tensor is on ", device_.ToString(),
                     "; copy it with To(Device::Cpu()) first"));
  }
  Tensor c = Contiguous();
  const T* p = c.data<T>();
  return std::vector<T>(p, p + numel());
}

}  // namespace tp

#endif  // TENSOR_PARALLEL_RUNTIME_TENSOR_H_
