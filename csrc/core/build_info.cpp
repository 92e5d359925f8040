#include "autoglm_rt/build_info.h"

#include "autoglm_rt/parallel.h"
#include "core/cuda_info.h"

namespace agrt {

bool cpu_has_avx2() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  }();
  return has;
#else
  return false;
#endif
}

BuildInfo build_info() {
  BuildInfo info;
  info.version = AGRT_VERSION;
  info.cpu_threads = num_threads();
#if defined(__clang__)
  info.compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  info.compiler = "gcc " __VERSION__;
#endif
  info.cpu_simd = cpu_has_avx512() ? "avx512" : cpu_has_avx2() ? "avx2" : "baseline";
#ifdef AGRT_WITH_CUDA
  detail::fill_cuda_info(info);
#else
  info.cuda_unavailable_reason =
      "autoglm_rt was built without CUDA (AUTOGLM_RT_CUDA=OFF or no nvcc at build time)";
#endif
  return info;
}

}  // namespace agrt
