// libFuzzer target for the safetensors reader: any bytes either fail to open
// with a status, or open and every tensor reads (whole and sliced) without
// crashing, consistently. Built and run by safetensors_fuzz_test.sh with
// clang++ -fsanitize=fuzzer,address,undefined.
//
//   clang++ -std=c++17 -fsanitize=fuzzer,address -I. \
//     tests/runtime/safetensors_fuzz.cc runtime/{safetensors,tensor,dtype}.cc \
//     -labsl_status -labsl_strings -lglog -o /tmp/fuzz && /tmp/fuzz corpus/
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "runtime/safetensors.h"
#include "runtime/tensor.h"

namespace {

// A broken invariant is a crash, so that libFuzzer reports the input.
void Require(bool condition) {
  if (!condition) __builtin_trap();
}

bool SameBytes(const tp::Tensor& a, const tp::Tensor& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return false;
  tp::Tensor ca = a.Contiguous();
  tp::Tensor cb = b.Contiguous();
  return ca.nbytes() == cb.nbytes() &&
         (ca.nbytes() == 0 ||
          std::memcmp(ca.raw_data(), cb.raw_data(), ca.nbytes()) == 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = tp::SafetensorsFile::OpenFromBuffer(
      std::string(reinterpret_cast<const char*>(data), size), "fuzz");
  if (!file.ok()) {
    Require(!file.status().message().empty());
    return 0;
  }
  const tp::SafetensorsFile& f = **file;
  uint64_t total = 0;
  for (const std::string& name : f.names()) {
    auto info = f.info(name);
    Require(info.ok());
    Require(info->data_end <= f.buffer_size());
    total += info->data_end - info->data_begin;
    auto whole = f.Read(name);
    if (!info->dtype.has_value()) {
      Require(!whole.ok());
      continue;
    }
    Require(whole.ok());
    Require(whole->nbytes() == info->data_end - info->data_begin);
    for (int d = 0; d < whole->ndim(); ++d) {
      const int64_t n = whole->dim(d);
      // The second half, and the whole dim, sliced from the file.
      auto half = f.ReadSlice(name, d, n / 2, n - n / 2);
      Require(half.ok());
      Require(SameBytes(*half, *whole->Narrow(d, n / 2, n - n / 2)));
      // Out of range is an error, never a read.
      Require(!f.ReadSlice(name, d, n, 1).ok());
      Require(!f.ReadSlice(name, d, 1, n).ok());
    }
    Require(!f.ReadSlice(name, whole->ndim(), 0, 0).ok());
  }
  Require(total == f.buffer_size());
  Require(!f.Read("\x01 no such tensor").ok());
  return 0;
}
