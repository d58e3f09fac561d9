// Where a tensor's storage lives: the host CPU or one CUDA device.
//
// Example:
//   tp::Device d = tp::Device::Cuda(local_rank);
//   if (d.is_cpu()) { ... }
#ifndef TENSOR_PARALLEL_RUNTIME_DEVICE_H_
#define TENSOR_PARALLEL_RUNTIME_DEVICE_H_

#include <string>

#include "absl/strings/str_cat.h"

namespace tp {

struct Device {
  enum class Type { kCpu, kCuda };

  Type type = Type::kCpu;
  int index = 0;  // CUDA ordinal; always 0 for the CPU.

  static Device Cpu() { return Device{Type::kCpu, 0}; }
  static Device Cuda(int index) { return Device{Type::kCuda, index}; }

  bool is_cpu() const { return type == Type::kCpu; }
  bool is_cuda() const { return type == Type::kCuda; }

  // "cpu" or "cuda:N".
  std::string ToString() const {
    return is_cpu() ? std::string("cpu") : absl::StrCat("cuda:", index);
  }

  friend bool operator==(const Device& a, const Device& b) {
    return a.type == b.type && a.index == b.index;
  }
  friend bool operator!=(const Device& a, const Device& b) { return !(a == b); }
};

}  // namespace tp

#endif  // TENSOR_PARALLEL_RUNTIME_DEVICE_H_
