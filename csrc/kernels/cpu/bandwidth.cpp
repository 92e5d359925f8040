#include "autoglm_rt/kernels/bandwidth.h"

#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "autoglm_rt/build_info.h"
#include "autoglm_rt/error.h"
#include "autoglm_rt/parallel.h"

namespace agrt::kernels {
namespace {
constexpr std::int64_t kGrainBytes = 1 << 20;

// Sums 8-byte words [b, e) in four independent lanes so the loop is bound by loads.
std::uint64_t sum_words_scalar(const unsigned char* bytes, std::int64_t b, std::int64_t e) {
  std::uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  std::int64_t i = b;
  for (; i + 4 <= e; i += 4) {
    std::uint64_t w[4];
    std::memcpy(w, bytes + i * 8, sizeof w);
    a0 += w[0]; a1 += w[1]; a2 += w[2]; a3 += w[3];
  }
  for (; i < e; ++i) {
    std::uint64_t w;
    std::memcpy(&w, bytes + i * 8, sizeof w);
    a0 += w;
  }
  return a0 + a1 + a2 + a3;
}

#if defined(__x86_64__)
// The same sum with 32-byte loads, four vector accumulators (128 bytes per iteration).
__attribute__((target("avx2"))) std::uint64_t sum_words_avx2(const unsigned char* bytes, std::int64_t b,
                                                             std::int64_t e) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  std::int64_t i = b;
  for (; i + 16 <= e; i += 16) {
    const auto* p = reinterpret_cast<const __m256i*>(bytes + i * 8);
    a0 = _mm256_add_epi64(a0, _mm256_loadu_si256(p));
    a1 = _mm256_add_epi64(a1, _mm256_loadu_si256(p + 1));
    a2 = _mm256_add_epi64(a2, _mm256_loadu_si256(p + 2));
    a3 = _mm256_add_epi64(a3, _mm256_loadu_si256(p + 3));
  }
  alignas(32) std::uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                     _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + sum_words_scalar(bytes, i, e);
}
#endif

std::uint64_t sum_words(const unsigned char* bytes, std::int64_t b, std::int64_t e) {
#if defined(__x86_64__)
  if (cpu_has_avx2()) return sum_words_avx2(bytes, b, e);
#endif
  return sum_words_scalar(bytes, b, e);
}
}  // namespace

std::uint64_t read_checksum(const TensorView& src) {
  AGRT_EXPECTS(src.device.type == DeviceType::kCPU, ValueError, "read_checksum: expected a CPU buffer");
  const auto* bytes = static_cast<const unsigned char*>(src.data);
  const std::int64_t n = static_cast<std::int64_t>(src.nbytes());
  const std::int64_t words = n / 8;
  const std::int64_t chunk = parallel_chunk_size(0, words, kGrainBytes / 8);
  std::vector<std::uint64_t> partial(static_cast<std::size_t>(words / chunk + 1), 0);
  parallel_for(0, words, kGrainBytes / 8, [&](std::int64_t b, std::int64_t e) {
    partial[static_cast<std::size_t>(b / chunk)] = sum_words(bytes, b, e);
  });
  std::uint64_t sum = 0;
  for (auto p : partial) sum += p;
  for (std::int64_t i = words * 8; i < n; ++i) sum += bytes[i];
  return sum;
}

void parallel_copy(const TensorView& dst, const TensorView& src) {
  AGRT_EXPECTS(dst.device.type == DeviceType::kCPU && src.device.type == DeviceType::kCPU, ValueError,
               "parallel_copy: expected CPU buffers");
  AGRT_EXPECTS(dst.nbytes() == src.nbytes(), ValueError, "parallel_copy: dst has ", dst.nbytes(),
               " bytes, src has ", src.nbytes());
  auto* d = static_cast<unsigned char*>(dst.data);
  const auto* s = static_cast<const unsigned char*>(src.data);
  parallel_for(0, static_cast<std::int64_t>(src.nbytes()), kGrainBytes,
               [&](std::int64_t b, std::int64_t e) { std::memcpy(d + b, s + b, static_cast<std::size_t>(e - b)); });
}

}  // namespace agrt::kernels
