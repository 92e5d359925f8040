// CPU grad_stats: tensors are cut into items and consecutive items into tasks of similar cost for
// the thread pool (detail/work_plan.h). Each item's moments land in its own slot and are merged
// per tensor in item order, so the result depends only on the sizes.
#include "autoglm_rt/kernels/grad_stats.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "autoglm_rt/build_info.h"
#include "autoglm_rt/detail/half.h"
#include "autoglm_rt/detail/work_plan.h"
#include "autoglm_rt/error.h"
#include "autoglm_rt/parallel.h"
#include "kernels/grad_stats_cuda.h"
#include "kernels/grad_stats_moments.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define AGRT_GRAD_STATS_X86 1
#endif

namespace agrt::kernels {
namespace {

using detail::Moments;

template <DType D>
inline float load1(const void* base, std::int64_t i) noexcept {
  if constexpr (D == DType::kFloat32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (D == DType::kFloat16) {
    return agrt::detail::fp16_to_float(static_cast<const std::uint16_t*>(base)[i]);
  } else {
    return agrt::detail::bf16_to_float(static_cast<const std::uint16_t*>(base)[i]);
  }
}

// The shift for M2: the first finite element of the item (0 if none), a value inside the data.
template <DType D>
double first_finite(const void* base, std::int64_t b, std::int64_t e) noexcept {
  for (std::int64_t i = b; i < e; ++i) {
    const float x = load1<D>(base, i);
    if (std::isfinite(x)) return x;
  }
  return 0.0;
}

// Scalar accumulators; also used for the vector path's tails and its rare blocks with non-finite
// values, so every element goes through the same float64 formulas.
struct ScalarAcc {
  double sum = 0, sumsq = 0, s1 = 0, s2 = 0, maxabs = 0;
  std::int64_t count = 0, nonfinite = 0;

  void add(float xf, double shift) noexcept {
    if (!std::isfinite(xf)) {
      ++nonfinite;
      return;
    }
    const double x = xf;
    const double d = x - shift;
    ++count;
    sum += x;
    sumsq += x * x;
    s1 += d;
    s2 += d * d;
    maxabs = std::max(maxabs, std::fabs(x));
  }
};

Moments finish(const ScalarAcc& a, double shift) noexcept {
  return detail::moments_from_shifted(static_cast<double>(a.count), static_cast<double>(a.nonfinite), a.sum, a.sumsq,
                                      a.maxabs, shift, a.s1, a.s2);
}

template <DType D>
Moments scan_scalar(const void* base, std::int64_t b, std::int64_t e) noexcept {
  const double shift = first_finite<D>(base, b, e);
  ScalarAcc a;
  for (std::int64_t i = b; i < e; ++i) a.add(load1<D>(base, i), shift);
  return finish(a, shift);
}

#ifdef AGRT_GRAD_STATS_X86
#define AGRT_AVX2 __attribute__((target("avx2,fma,f16c")))

template <DType D>
AGRT_AVX2 inline __m256 load8(const void* base, std::int64_t i) noexcept {
  if constexpr (D == DType::kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const std::uint16_t*>(base) + i));
    if constexpr (D == DType::kFloat16) {
      return _mm256_cvtph_ps(h);
    } else {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
}

AGRT_AVX2 inline double hsum(__m256d v) noexcept {
  alignas(32) double t[4];
  _mm256_store_pd(t, v);
  return (t[0] + t[1]) + (t[2] + t[3]);
}

// Blocks of kBlock elements: inside a block, sum, sum of squares and the shifted sum and sum of
// squares (x - shift is exact in float32 when x is within a factor 2 of shift) accumulate in
// float32 lanes, 8 terms per lane (error at most 8 * 2^-24 of the lane's absolute sum, below the
// 1e-6 budget even in the worst case), then widen into float64 lanes. float32 squares are exact
// enough only inside a range, so a block where a lane's largest |x| lies outside
// [kLaneMin, kLaneMax] (and is not 0), or that holds a NaN or Inf (its float32 sum of squares is
// then not finite), is redone by the scalar float64 accumulator. That is rare, and keeps the fast
// path free of masking: the checks run once per block.
constexpr std::int64_t kBlock = 64;
constexpr float kLaneMax = 5e17f;   // |x - shift| <= 1e18: 8 squares stay far below FLT_MAX
constexpr float kLaneMin = 1e-15f;  // squares >= 1e-30: float32 underflow error negligible

template <DType D>
AGRT_AVX2 Moments scan_avx2_shifted(const void* base, std::int64_t b, std::int64_t e, double shift) noexcept {
  // (x - shift)^2 must stay in range too; an item with a huge element goes the scalar way.
  if (!(std::fabs(shift) <= static_cast<double>(kLaneMax))) return scan_scalar<D>(base, b, e);
  const __m256 kf = _mm256_set1_ps(static_cast<float>(shift));  // exact: shift is an element
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256d sum_lo = _mm256_setzero_pd(), sum_hi = _mm256_setzero_pd();
  __m256d sq_lo = _mm256_setzero_pd(), sq_hi = _mm256_setzero_pd();
  __m256d s1_lo = _mm256_setzero_pd(), s1_hi = _mm256_setzero_pd();
  __m256d s2_lo = _mm256_setzero_pd(), s2_hi = _mm256_setzero_pd();
  __m256 maxv = _mm256_setzero_ps();
  std::int64_t fast = 0;  // elements taken by the vector path
  ScalarAcc slow;
  std::int64_t i = b;
  for (; i + kBlock <= e; i += kBlock) {
    __m256 s = _mm256_setzero_ps(), q = _mm256_setzero_ps();
    __m256 c = _mm256_setzero_ps(), d2 = _mm256_setzero_ps();
    __m256 m = _mm256_setzero_ps();
    for (std::int64_t j = i; j < i + kBlock; j += 8) {
      const __m256 x = load8<D>(base, j);
      m = _mm256_max_ps(m, _mm256_and_ps(x, absmask));
      s = _mm256_add_ps(s, x);
      q = _mm256_fmadd_ps(x, x, q);
      const __m256 dx = _mm256_sub_ps(x, kf);
      c = _mm256_add_ps(c, dx);
      d2 = _mm256_fmadd_ps(dx, dx, d2);
    }
    // q >= Inf or NaN: a non-finite element (ranges below rule out overflow).
    __m256 bad = _mm256_cmp_ps(q, _mm256_set1_ps(INFINITY), _CMP_NLT_UQ);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(m, _mm256_set1_ps(kLaneMax), _CMP_NLE_UQ));
    bad = _mm256_or_ps(bad, _mm256_and_ps(_mm256_cmp_ps(m, _mm256_set1_ps(kLaneMin), _CMP_LT_OQ),
                                          _mm256_cmp_ps(m, _mm256_setzero_ps(), _CMP_GT_OQ)));
    if (__builtin_expect(_mm256_movemask_ps(bad) != 0, 0)) {
      for (std::int64_t j = i; j < i + kBlock; ++j) slow.add(load1<D>(base, j), shift);
      continue;
    }
    fast += kBlock;
    maxv = _mm256_max_ps(maxv, m);
    sum_lo = _mm256_add_pd(sum_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(s)));
    sum_hi = _mm256_add_pd(sum_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(s, 1)));
    sq_lo = _mm256_add_pd(sq_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(q)));
    sq_hi = _mm256_add_pd(sq_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(q, 1)));
    s1_lo = _mm256_add_pd(s1_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(c)));
    s1_hi = _mm256_add_pd(s1_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(c, 1)));
    s2_lo = _mm256_add_pd(s2_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(d2)));
    s2_hi = _mm256_add_pd(s2_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(d2, 1)));
  }
  for (; i < e; ++i) slow.add(load1<D>(base, i), shift);

  alignas(32) float m[8];
  _mm256_store_ps(m, maxv);
  ScalarAcc a;
  a.count = fast + slow.count;
  a.nonfinite = slow.nonfinite;
  a.sum = hsum(_mm256_add_pd(sum_lo, sum_hi)) + slow.sum;
  a.sumsq = hsum(_mm256_add_pd(sq_lo, sq_hi)) + slow.sumsq;
  a.s1 = hsum(_mm256_add_pd(s1_lo, s1_hi)) + slow.s1;
  a.s2 = hsum(_mm256_add_pd(s2_lo, s2_hi)) + slow.s2;
  a.maxabs = slow.maxabs;
  for (float v : m) a.maxabs = std::max(a.maxabs, static_cast<double>(v));
  return finish(a, shift);
}

// The common case first: gradients are centred (mean^2 << variance), so shift 0 is as good as
// any, and sum and sum of squares alone give M2 = sumsq - sum^2/n within budget. This pass keeps
// three accumulators per element instead of five; scan_vector() falls back to the shifted pass
// (on the same item, now in cache) when the item turns out not to be centred.
template <DType D>
AGRT_AVX2 Moments scan_avx2_centred(const void* base, std::int64_t b, std::int64_t e) noexcept {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256d sum_lo = _mm256_setzero_pd(), sum_hi = _mm256_setzero_pd();
  __m256d sq_lo = _mm256_setzero_pd(), sq_hi = _mm256_setzero_pd();
  __m256 maxv = _mm256_setzero_ps();
  std::int64_t fast = 0;
  ScalarAcc slow;
  std::int64_t i = b;
  for (; i + kBlock <= e; i += kBlock) {
    __m256 s = _mm256_setzero_ps(), q = _mm256_setzero_ps(), m = _mm256_setzero_ps();
    for (std::int64_t j = i; j < i + kBlock; j += 8) {
      const __m256 x = load8<D>(base, j);
      m = _mm256_max_ps(m, _mm256_and_ps(x, absmask));
      s = _mm256_add_ps(s, x);
      q = _mm256_fmadd_ps(x, x, q);
    }
    __m256 bad = _mm256_cmp_ps(q, _mm256_set1_ps(INFINITY), _CMP_NLT_UQ);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(m, _mm256_set1_ps(kLaneMax), _CMP_NLE_UQ));
    bad = _mm256_or_ps(bad, _mm256_and_ps(_mm256_cmp_ps(m, _mm256_set1_ps(kLaneMin), _CMP_LT_OQ),
                                          _mm256_cmp_ps(m, _mm256_setzero_ps(), _CMP_GT_OQ)));
    if (__builtin_expect(_mm256_movemask_ps(bad) != 0, 0)) {
      for (std::int64_t j = i; j < i + kBlock; ++j) slow.add(load1<D>(base, j), 0.0);
      continue;
    }
    fast += kBlock;
    maxv = _mm256_max_ps(maxv, m);
    sum_lo = _mm256_add_pd(sum_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(s)));
    sum_hi = _mm256_add_pd(sum_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(s, 1)));
    sq_lo = _mm256_add_pd(sq_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(q)));
    sq_hi = _mm256_add_pd(sq_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(q, 1)));
  }
  for (; i < e; ++i) slow.add(load1<D>(base, i), 0.0);

  alignas(32) float mx[8];
  _mm256_store_ps(mx, maxv);
  ScalarAcc a;
  a.count = fast + slow.count;
  a.nonfinite = slow.nonfinite;
  a.sum = hsum(_mm256_add_pd(sum_lo, sum_hi)) + slow.sum;
  a.sumsq = hsum(_mm256_add_pd(sq_lo, sq_hi)) + slow.sumsq;
  a.s1 = a.sum;  // shift 0
  a.s2 = a.sumsq;
  a.maxabs = slow.maxabs;
  for (float v : mx) a.maxabs = std::max(a.maxabs, static_cast<double>(v));
  return finish(a, 0.0);
}
#undef AGRT_AVX2

// The same algorithm with 16 float32 lanes (AVX-512F): half the instructions per element, which
// matters because the AVX2 kernel is compute-bound on a core shared with other work. Blocks are
// 128 elements, so each lane still adds 8 terms.
#define AGRT_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined_* helpers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

template <DType D>
AGRT_AVX512 inline __m512 load16(const void* base, std::int64_t i) noexcept {
  if constexpr (D == DType::kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const std::uint16_t*>(base) + i));
    if constexpr (D == DType::kFloat16) {
      return _mm512_cvtph_ps(h);
    } else {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
}

AGRT_AVX512 inline __m512d widen_lo(__m512 v) noexcept { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
AGRT_AVX512 inline __m512d widen_hi(__m512 v) noexcept {
  return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
AGRT_AVX512 inline double hsum512(__m512d v) noexcept {
  alignas(64) double t[8];
  _mm512_store_pd(t, v);
  return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

constexpr std::int64_t kBlock512 = 128;

template <DType D>
AGRT_AVX512 Moments scan_avx512_shifted(const void* base, std::int64_t b, std::int64_t e, double shift) noexcept {
  if (!(std::fabs(shift) <= static_cast<double>(kLaneMax))) return scan_scalar<D>(base, b, e);
  const __m512 kf = _mm512_set1_ps(static_cast<float>(shift));
  __m512d sum_lo = _mm512_setzero_pd(), sum_hi = _mm512_setzero_pd();
  __m512d sq_lo = _mm512_setzero_pd(), sq_hi = _mm512_setzero_pd();
  __m512d s1_lo = _mm512_setzero_pd(), s1_hi = _mm512_setzero_pd();
  __m512d s2_lo = _mm512_setzero_pd(), s2_hi = _mm512_setzero_pd();
  __m512 maxv = _mm512_setzero_ps();
  std::int64_t fast = 0;
  ScalarAcc slow;
  std::int64_t i = b;
  for (; i + kBlock512 <= e; i += kBlock512) {
    __m512 s = _mm512_setzero_ps(), q = _mm512_setzero_ps();
    __m512 c = _mm512_setzero_ps(), d2 = _mm512_setzero_ps();
    __m512 m = _mm512_setzero_ps();
    for (std::int64_t j = i; j < i + kBlock512; j += 16) {
      const __m512 x = load16<D>(base, j);
      m = _mm512_max_ps(m, _mm512_abs_ps(x));
      s = _mm512_add_ps(s, x);
      q = _mm512_fmadd_ps(x, x, q);
      const __m512 dx = _mm512_sub_ps(x, kf);
      c = _mm512_add_ps(c, dx);
      d2 = _mm512_fmadd_ps(dx, dx, d2);
    }
    const __mmask16 bad = _mm512_cmp_ps_mask(q, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ) |
                          _mm512_cmp_ps_mask(m, _mm512_set1_ps(kLaneMax), _CMP_NLE_UQ) |
                          (_mm512_cmp_ps_mask(m, _mm512_set1_ps(kLaneMin), _CMP_LT_OQ) &
                           _mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_GT_OQ));
    if (__builtin_expect(bad != 0, 0)) {
      for (std::int64_t j = i; j < i + kBlock512; ++j) slow.add(load1<D>(base, j), shift);
      continue;
    }
    fast += kBlock512;
    maxv = _mm512_max_ps(maxv, m);
    sum_lo = _mm512_add_pd(sum_lo, widen_lo(s));
    sum_hi = _mm512_add_pd(sum_hi, widen_hi(s));
    sq_lo = _mm512_add_pd(sq_lo, widen_lo(q));
    sq_hi = _mm512_add_pd(sq_hi, widen_hi(q));
    s1_lo = _mm512_add_pd(s1_lo, widen_lo(c));
    s1_hi = _mm512_add_pd(s1_hi, widen_hi(c));
    s2_lo = _mm512_add_pd(s2_lo, widen_lo(d2));
    s2_hi = _mm512_add_pd(s2_hi, widen_hi(d2));
  }
  for (; i < e; ++i) slow.add(load1<D>(base, i), shift);

  alignas(64) float mx[16];
  _mm512_store_ps(mx, maxv);
  ScalarAcc a;
  a.count = fast + slow.count;
  a.nonfinite = slow.nonfinite;
  a.sum = hsum512(_mm512_add_pd(sum_lo, sum_hi)) + slow.sum;
  a.sumsq = hsum512(_mm512_add_pd(sq_lo, sq_hi)) + slow.sumsq;
  a.s1 = hsum512(_mm512_add_pd(s1_lo, s1_hi)) + slow.s1;
  a.s2 = hsum512(_mm512_add_pd(s2_lo, s2_hi)) + slow.s2;
  a.maxabs = slow.maxabs;
  for (float v : mx) a.maxabs = std::max(a.maxabs, static_cast<double>(v));
  return finish(a, shift);
}

// See scan_avx2_centred.
template <DType D>
AGRT_AVX512 Moments scan_avx512_centred(const void* base, std::int64_t b, std::int64_t e) noexcept {
  __m512d sum_lo = _mm512_setzero_pd(), sum_hi = _mm512_setzero_pd();
  __m512d sq_lo = _mm512_setzero_pd(), sq_hi = _mm512_setzero_pd();
  __m512 maxv = _mm512_setzero_ps();
  std::int64_t fast = 0;
  ScalarAcc slow;
  std::int64_t i = b;
  for (; i + kBlock512 <= e; i += kBlock512) {
    __m512 s = _mm512_setzero_ps(), q = _mm512_setzero_ps(), m = _mm512_setzero_ps();
    for (std::int64_t j = i; j < i + kBlock512; j += 16) {
      const __m512 x = load16<D>(base, j);
      m = _mm512_max_ps(m, _mm512_abs_ps(x));
      s = _mm512_add_ps(s, x);
      q = _mm512_fmadd_ps(x, x, q);
    }
    const __mmask16 bad = _mm512_cmp_ps_mask(q, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ) |
                          _mm512_cmp_ps_mask(m, _mm512_set1_ps(kLaneMax), _CMP_NLE_UQ) |
                          (_mm512_cmp_ps_mask(m, _mm512_set1_ps(kLaneMin), _CMP_LT_OQ) &
                           _mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_GT_OQ));
    if (__builtin_expect(bad != 0, 0)) {
      for (std::int64_t j = i; j < i + kBlock512; ++j) slow.add(load1<D>(base, j), 0.0);
      continue;
    }
    fast += kBlock512;
    maxv = _mm512_max_ps(maxv, m);
    sum_lo = _mm512_add_pd(sum_lo, widen_lo(s));
    sum_hi = _mm512_add_pd(sum_hi, widen_hi(s));
    sq_lo = _mm512_add_pd(sq_lo, widen_lo(q));
    sq_hi = _mm512_add_pd(sq_hi, widen_hi(q));
  }
  for (; i < e; ++i) slow.add(load1<D>(base, i), 0.0);

  alignas(64) float mx[16];
  _mm512_store_ps(mx, maxv);
  ScalarAcc a;
  a.count = fast + slow.count;
  a.nonfinite = slow.nonfinite;
  a.sum = hsum512(_mm512_add_pd(sum_lo, sum_hi)) + slow.sum;
  a.sumsq = hsum512(_mm512_add_pd(sq_lo, sq_hi)) + slow.sumsq;
  a.s1 = a.sum;
  a.s2 = a.sumsq;
  a.maxabs = slow.maxabs;
  for (float v : mx) a.maxabs = std::max(a.maxabs, static_cast<double>(v));
  return finish(a, 0.0);
}
#pragma GCC diagnostic pop
#undef AGRT_AVX512
#endif  // AGRT_GRAD_STATS_X86

enum class Simd { kScalar, kAvx2, kAvx512 };

// The widest vector ISA this CPU supports; AUTOGLM_RT_GRAD_STATS_SIMD=scalar|avx2 caps it (tests
// and comparisons). Chosen once.
Simd simd_level() noexcept {
  static const Simd level = [] {
#ifdef AGRT_GRAD_STATS_X86
    Simd best = Simd::kScalar;
    if (cpu_has_avx2() && __builtin_cpu_supports("f16c")) best = Simd::kAvx2;
    if (best == Simd::kAvx2 && __builtin_cpu_supports("avx512f")) best = Simd::kAvx512;
    if (const char* cap = std::getenv("AUTOGLM_RT_GRAD_STATS_SIMD")) {
      if (std::strcmp(cap, "scalar") == 0) best = Simd::kScalar;
      if (std::strcmp(cap, "avx2") == 0 && best == Simd::kAvx512) best = Simd::kAvx2;
    }
    return best;
#else
    return Simd::kScalar;
#endif
  }();
  return level;
}

// Shift 0 keeps M2 = sumsq - sum^2/n within the 1e-6 budget when mean^2 <= var/16: the float32
// lane error (at most 8 * 2^-24 of sumsq and of sum |x|) then costs M2 under 8e-7 even in the
// worst case. Otherwise the item is rescanned with its mean as the shift.
bool centred_enough(const Moments& m) noexcept {
  if (m.count == 0) return true;
  const double mean = m.sum / m.count;
  const double var = m.sumsq / m.count - mean * mean;
  return 16 * mean * mean <= var;
}

template <DType D>
Moments scan_typed(const void* base, std::int64_t b, std::int64_t e) {
#ifdef AGRT_GRAD_STATS_X86
  const Simd level = simd_level();
  if (level != Simd::kScalar) {
    const Moments m = level == Simd::kAvx512 ? scan_avx512_centred<D>(base, b, e) : scan_avx2_centred<D>(base, b, e);
    if (centred_enough(m)) return m;
    // A shift the vector code can use exactly: the mean rounded to float32.
    const double shift = static_cast<float>(m.sum / m.count);
    return level == Simd::kAvx512 ? scan_avx512_shifted<D>(base, b, e, shift) : scan_avx2_shifted<D>(base, b, e, shift);
  }
#endif
  return scan_scalar<D>(base, b, e);
}

Moments scan(const TensorView& t, std::int64_t b, std::int64_t e) {
  switch (t.dtype) {
    case DType::kFloat32: return scan_typed<DType::kFloat32>(t.data, b, e);
    case DType::kFloat16: return scan_typed<DType::kFloat16>(t.data, b, e);
    case DType::kBFloat16: return scan_typed<DType::kBFloat16>(t.data, b, e);
    default: break;
  }
  AGRT_FAIL(RuntimeError, "grad_stats: unexpected dtype ", dtype_name(t.dtype));
}

void check_inputs(const std::vector<TensorView>& tensors, const TensorView& out) {
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const TensorView& t = tensors[i];
    AGRT_EXPECTS(is_floating(t.dtype), TypeError, "grad_stats: tensors[", i,
                 "]: expected dtype float32, float16 or bfloat16, got ", dtype_name(t.dtype));
    AGRT_EXPECTS(t.numel >= 0, ValueError, "grad_stats: tensors[", i, "]: negative element count ", t.numel);
    AGRT_EXPECTS(t.numel == 0 || t.data != nullptr, ValueError, "grad_stats: tensors[", i,
                 "]: null data with ", t.numel, " elements");
    AGRT_EXPECTS(t.device == tensors[0].device, ValueError, "grad_stats: tensors[", i, "]: expected a tensor on ",
                 tensors[0].device.str(), " like tensors[0], got one on ", t.device.str());
  }
  const std::int64_t rows = static_cast<std::int64_t>(tensors.size()) + 1;
  AGRT_EXPECTS(out.dtype == DType::kInt64, TypeError,
               "grad_stats: out: expected an int64 buffer (raw float64 words), got ", dtype_name(out.dtype));
  AGRT_EXPECTS(out.numel == rows * kGradStatsFields, ValueError, "grad_stats: out: expected ",
               rows * kGradStatsFields, " elements ((len(tensors) + 1) * ", kGradStatsFields, "), got ", out.numel);
  AGRT_EXPECTS(!out.read_only, ValueError, "grad_stats: out: is read-only");
  AGRT_EXPECTS(tensors.empty() || out.device == tensors[0].device, ValueError, "grad_stats: out: expected a buffer on ",
               tensors.empty() ? out.device.str() : tensors[0].device.str(), ", got one on ", out.device.str());
}

void grad_stats_cpu(const std::vector<TensorView>& tensors, double* rows) {
  const agrt::detail::WorkPlan plan = agrt::detail::plan_work(tensors);
  const auto& items = plan.items;
  const auto& first_item = plan.first_item;
  const auto& task_begin = plan.task_begin;
  const auto ntasks = plan.tasks();

  std::vector<Moments> partial(items.size());
  parallel_for(0, ntasks, 1, [&](std::int64_t tb, std::int64_t te) {
    for (std::int64_t task = tb; task < te; ++task) {
      for (std::size_t i = task_begin[static_cast<std::size_t>(task)]; i < task_begin[static_cast<std::size_t>(task) + 1];
           ++i) {
        partial[i] = scan(tensors[items[i].tensor], items[i].begin, items[i].end);
      }
    }
  });

  Moments total;
  double total_numel = 0;
  for (std::size_t t = 0; t < tensors.size(); ++t) {
    Moments m;
    for (std::size_t i = first_item[t]; i < first_item[t + 1]; ++i) detail::merge_into(m, partial[i]);
    const auto numel = static_cast<double>(tensors[t].numel);
    detail::write_row(rows + t * kGradStatsFields, numel, m);
    detail::merge_into(total, m);
    total_numel += numel;
  }
  detail::write_row(rows + tensors.size() * kGradStatsFields, total_numel, total);
}

}  // namespace

std::size_t grad_stats_workspace_bytes(const std::vector<TensorView>& tensors) {
  if (tensors.empty() || tensors[0].device.type == DeviceType::kCPU) return 0;
#ifdef AGRT_WITH_CUDA
  return detail::grad_stats_cuda_workspace_bytes(tensors);
#else
  AGRT_EXPECTS(false, ValueError, "grad_stats: tensors are on ", tensors[0].device.str(),
            " but this build of autoglm_rt has no CUDA support");
#endif
}

void grad_stats(const std::vector<TensorView>& tensors, const TensorView& out, const TensorView& workspace) {
  check_inputs(tensors, out);
  if (out.device.type == DeviceType::kCPU) {
    grad_stats_cpu(tensors, static_cast<double*>(out.data));
    return;
  }
#ifdef AGRT_WITH_CUDA
  detail::grad_stats_cuda(tensors, out, workspace);
#else
  AGRT_EXPECTS(false, ValueError, "grad_stats: tensors are on ", out.device.str(),
            " but this build of autoglm_rt has no CUDA support");
#endif
}

}  // namespace agrt::kernels
