// The framework-free tensor of the C++ core: a non-owning view of contiguous memory.
// Kernels take TensorView; only the bindings know where the memory came from (DLPack).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace agrt {

// kUInt8 (raw bytes: packed sign bits, message buffers) is last so the other values keep theirs.
enum class DType : std::uint8_t { kFloat32, kFloat16, kBFloat16, kInt32, kInt64, kUInt8 };
enum class DeviceType : std::uint8_t { kCPU, kCUDA };

/// Size of one element in bytes.
constexpr std::size_t dtype_size(DType t) noexcept {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kInt32: return 4;
    case DType::kInt64: return 8;
    case DType::kUInt8: return 1;
  }
  return 0;
}

constexpr bool is_floating(DType t) noexcept {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16;
}

/// "float32", "float16", "bfloat16", "int32", "int64", "uint8": the names numpy and torch use.
const char* dtype_name(DType t) noexcept;

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = 0;  // 0 for the CPU
  bool operator==(const Device& o) const noexcept { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const noexcept { return !(*this == o); }
  /// "cpu" or "cuda:N".
  std::string str() const;
};

/// A contiguous run of `numel` elements of `dtype` at `data` on `device`. Never owns memory.
/// `stream` is the CUDA stream (cudaStream_t as an integer; 0 = legacy default) on which the
/// producer made the data ready and on which kernels must run; always 0 on the CPU.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  std::int64_t numel = 0;
  Device device{};
  std::uintptr_t stream = 0;
  bool read_only = false;

  std::size_t nbytes() const noexcept { return static_cast<std::size_t>(numel) * dtype_size(dtype); }
  template <typename T>
  T* as() const noexcept { return static_cast<T*>(data); }
};

}  // namespace agrt
