// What this build of the native core contains and what the machine offers it at run time.
#pragma once

#include <string>

namespace agrt {

struct BuildInfo {
  std::string version;
  bool cuda_compiled = false;
  std::string cuda_runtime_version;   // "13.0" or "" when not compiled
  std::string cuda_archs;             // "80-real,90-real,90-virtual" or ""
  int cuda_device_count = 0;
  std::string cuda_unavailable_reason;  // "" when at least one device is usable
  int cpu_threads = 1;
  std::string compiler;
  std::string cpu_simd;               // best vector ISA of this CPU: avx512, avx2 or baseline
};

/// Safe on machines without a driver or a GPU: the CUDA fields then say why.
BuildInfo build_info();

/// True when the CPU supports AVX2 and FMA (checked once at run time).
bool cpu_has_avx2() noexcept;

/// True when the CPU supports AVX-512 F and BW (checked once at run time).
bool cpu_has_avx512() noexcept;

}  // namespace agrt
