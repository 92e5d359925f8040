// CPU twin of the fused 1-bit (sign) compression, its averaging inverse, and the one place where
// both are validated and dispatched to a device.
//
// Compress works chunk by chunk while the chunk is in cache: sum |x + error| in the lane order
// the header fixes (32 float64 lanes, then a tree), then one more sweep over the same, now
// cached, elements writes the bits and the new error. Chunks are grouped into tasks whose element
// boundaries are multiples of 8, so no byte of bits is shared between threads; a chunk that does
// not end on a byte boundary leaves its last byte to the next chunk of the same task to finish.
// Decompress fills blocks of out row by row (each block stays in L1 across the W rows).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#define AGRT_ONEBIT_X86 1
#endif

#include "autoglm_rt/build_info.h"
#include "autoglm_rt/detail/work_plan.h"
#include "autoglm_rt/error.h"
#include "autoglm_rt/kernels/onebit.h"
#include "autoglm_rt/parallel.h"
#include "kernels/onebit_detail.h"

namespace agrt::kernels {
namespace {

using onebit_detail::chunk_scale;
using onebit_detail::decoded;

// Elements of out filled per block in decompress: 8 KiB of float32, in L1 across all rows.
constexpr std::int64_t kDecodeBlock = 2048;

// Whether the loops may use AVX2: the CPU has it and AUTOGLM_RT_ONEBIT_SIMD is not "scalar"
// (read on every call, so a test can compare both loops).
bool onebit_use_avx2() noexcept {
#ifdef AGRT_ONEBIT_X86
  const char* cap = std::getenv("AUTOGLM_RT_ONEBIT_SIMD");
  if (cap != nullptr && std::strcmp(cap, "scalar") == 0) return false;
  return cpu_has_avx2();
#else
  return false;
#endif
}

// The header's lane tree over 32 float64 lane sums.
double lane_tree(double* lane) noexcept {
  for (int off = kSignLanes / 2; off >= 1; off /= 2) {
    for (int l = 0; l < off; ++l) lane[l] += lane[l + off];
  }
  return lane[0];
}

// c_i = x_i + e_i in float32, or x_i without error feedback (x + 0.0f would turn -0.0 into +0.0).
inline float combined(const float* x, const float* e, std::int64_t i) noexcept { return e ? x[i] + e[i] : x[i]; }

// One segment's sum of |c| (len <= kSignSegment) in the header's order.
double segment_sum_scalar(const float* x, const float* e, std::int64_t len) noexcept {
  double lane[kSignLanes] = {};
  std::int64_t i = 0;
  for (; i + kSignLanes <= len; i += kSignLanes) {
    for (int l = 0; l < kSignLanes; ++l) lane[l] += static_cast<double>(std::fabs(combined(x, e, i + l)));
  }
  for (int l = 0; i + l < len; ++l) lane[l] += static_cast<double>(std::fabs(combined(x, e, i + l)));
  return lane_tree(lane);
}

// Bits and error for the elements [lo, hi) of one chunk whose scale is s. A byte that started in
// an earlier chunk (lo not a multiple of 8) is completed with OR; every other byte is written
// whole, bits at or past hi zero (the next chunk, or nothing: padding).
using PackBody = std::int64_t (*)(const float*, float*, std::int64_t, std::int64_t, float, std::uint8_t*) noexcept;

void pack_range(const float* x, float* e, std::int64_t lo, std::int64_t hi, float s, std::uint8_t* bits,
                PackBody body) noexcept {
  std::int64_t i = lo;
  auto one = [&](std::int64_t k) -> unsigned {
    const float c = combined(x, e, k);
    const bool pos = c >= 0.0f;
    if (e) e[k] = c - decoded(pos, s);
    return pos ? 1u : 0u;
  };
  if (i % 8 != 0) {
    unsigned b = bits[i / 8];
    const std::int64_t byte = i / 8;
    for (; i < hi && i % 8 != 0; ++i) b |= one(i) << (i % 8);
    bits[byte] = static_cast<std::uint8_t>(b);
  }
  i = body(x, e, i, hi, s, bits);  // whole bytes; returns where it stopped (a multiple of 8)
  for (; i + 8 <= hi; i += 8) {
    unsigned b = 0;
    for (int k = 0; k < 8; ++k) b |= one(i + k) << k;
    bits[i / 8] = static_cast<std::uint8_t>(b);
  }
  if (i < hi) {
    unsigned b = 0;
    const std::int64_t byte = i / 8;
    for (; i < hi; ++i) b |= one(i) << (i % 8);
    bits[byte] = static_cast<std::uint8_t>(b);
  }
}

std::int64_t no_body(const float*, float*, std::int64_t i, std::int64_t, float, std::uint8_t*) noexcept { return i; }

#ifdef AGRT_ONEBIT_X86
// Eight 128-bit groups of four lanes: lane l of the header's order is element (l mod 4) of
// accumulator l / 4, so these sums equal the scalar loop's bit for bit.
__attribute__((target("avx2"))) double segment_sum_avx2(const float* x, const float* e, std::int64_t len) noexcept {
  const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
  __m256d acc[8];
  for (auto& a : acc) a = _mm256_setzero_pd();
  std::int64_t i = 0;
  for (; i + kSignLanes <= len; i += kSignLanes) {
    for (int q = 0; q < 8; ++q) {
      __m128 c = _mm_loadu_ps(x + i + 4 * q);
      if (e) c = _mm_add_ps(c, _mm_loadu_ps(e + i + 4 * q));
      acc[q] = _mm256_add_pd(acc[q], _mm256_cvtps_pd(_mm_and_ps(c, abs_mask)));
    }
  }
  alignas(32) double lane[kSignLanes];
  for (int q = 0; q < 8; ++q) _mm256_store_pd(lane + 4 * q, acc[q]);
  for (int l = 0; i + l < len; ++l) lane[l] += static_cast<double>(std::fabs(combined(x, e, i + l)));
  return lane_tree(lane);
}

// Whole bytes from i (a multiple of 8) while 8 elements remain before hi: compare, movemask (lane
// k -> bit k), blend +-s, error = c - d.
__attribute__((target("avx2"))) std::int64_t pack_body_avx2(const float* x, float* e, std::int64_t i,
                                                            std::int64_t hi, float s, std::uint8_t* bits) noexcept {
  const __m256 pos_s = _mm256_set1_ps(s);
  const __m256 neg_s = _mm256_set1_ps(-s);
  const __m256 zero = _mm256_setzero_ps();
  for (; i + 8 <= hi; i += 8) {
    __m256 c = _mm256_loadu_ps(x + i);
    if (e) c = _mm256_add_ps(c, _mm256_loadu_ps(e + i));
    const __m256 pos = _mm256_cmp_ps(c, zero, _CMP_GE_OQ);  // false for NaN, true for -0.0
    bits[i / 8] = static_cast<std::uint8_t>(_mm256_movemask_ps(pos));
    if (e) _mm256_storeu_ps(e + i, _mm256_sub_ps(c, _mm256_blendv_ps(neg_s, pos_s, pos)));
  }
  return i;
}
#endif

struct CompressArgs {
  const float* x;
  float* e;
  std::int64_t n, chunk;
  std::uint8_t* bits;
  float* scales;
};

// The loops a call uses: AVX2 or portable (same bits).
using SegmentSum = double (*)(const float*, const float*, std::int64_t) noexcept;
struct CompressLoops {
  SegmentSum sum;
  PackBody pack;
};

void compress_chunks(const CompressArgs& a, std::int64_t jb, std::int64_t je, const CompressLoops& loops) {
  for (std::int64_t j = jb; j < je; ++j) {
    const std::int64_t lo = j * a.chunk;
    const std::int64_t hi = std::min(a.n, lo + a.chunk);
    double sum = 0.0;
    for (std::int64_t s0 = lo; s0 < hi; s0 += kSignSegment) {
      sum += loops.sum(a.x + s0, a.e ? a.e + s0 : nullptr, std::min(kSignSegment, hi - s0));
    }
    const float s = chunk_scale(sum, hi - lo);
    a.scales[j] = s;
    pack_range(a.x, a.e, lo, hi, s, a.bits, loops.pack);
  }
}

void compress_cpu(const TensorView& x, const TensorView* error, std::int64_t chunk, const TensorView& bits,
                  const TensorView& scales) {
  const CompressArgs a{x.as<const float>(), error ? error->as<float>() : nullptr, x.numel, chunk,
                       bits.as<std::uint8_t>(), scales.as<float>()};
  const std::int64_t nc = sign_chunks(a.n, chunk);
  // A task is a run of whole chunks starting on a byte boundary (a multiple of `align` chunks),
  // about detail::kTaskCost elements long: the same size below which the other CPU reductions
  // stay on the caller's thread. One task's worth of input runs inline.
  const std::int64_t align = 8 / std::gcd<std::int64_t>(chunk, 8);
  const std::int64_t want = std::max<std::int64_t>(1, detail::kTaskCost / chunk);
  const std::int64_t per_task = std::max(align, want / align * align);
  const std::int64_t tasks = (nc + per_task - 1) / per_task;
  CompressLoops loops{segment_sum_scalar, no_body};
#ifdef AGRT_ONEBIT_X86
  if (onebit_use_avx2()) loops = {segment_sum_avx2, pack_body_avx2};
#endif
  parallel_for(0, tasks, 1, [&](std::int64_t tb, std::int64_t te) {
    compress_chunks(a, tb * per_task, std::min(nc, te * per_task), loops);
  });
}

struct DecompressArgs {
  const std::uint8_t* bits;
  const float* scales;
  std::int64_t rows, bits_stride, scales_stride;
  float* out;
  std::int64_t n, chunk;
  float scale;
};

// Whole bytes of one row from i (a multiple of 8) while 8 elements remain before `end`:
// acc[k - lo] += d_k. Returns where it stopped.
using RowBody = std::int64_t (*)(const std::uint8_t*, float, std::int64_t, std::int64_t, std::int64_t, float*);

std::int64_t no_row_body(const std::uint8_t*, float, std::int64_t i, std::int64_t, std::int64_t, float*) noexcept {
  return i;
}

#ifdef AGRT_ONEBIT_X86
// Byte broadcast to eight lanes, lane k tests bit k, blend +-s, add.
__attribute__((target("avx2"))) std::int64_t row_body_avx2(const std::uint8_t* bits, float s, std::int64_t i,
                                                           std::int64_t end, std::int64_t lo, float* acc) noexcept {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 pos_s = _mm256_set1_ps(s);
  const __m256 neg_s = _mm256_set1_ps(-s);
  for (; i + 8 <= end; i += 8) {
    const __m256i b = _mm256_and_si256(_mm256_set1_epi32(bits[i / 8]), lane_bit);
    const __m256 set = _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, lane_bit));
    float* p = acc + (i - lo);
    _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), _mm256_blendv_ps(neg_s, pos_s, set)));
  }
  return i;
}
#endif

// acc[i - lo] += d_i for i in [lo, hi), one row; the elements of a chunk share one scale.
void add_row(const std::uint8_t* bits, const float* scales, std::int64_t chunk, std::int64_t lo, std::int64_t hi,
             float* acc, RowBody body) {
  std::int64_t i = lo;
  while (i < hi) {
    const std::int64_t j = i / chunk;
    const std::int64_t end = std::min(hi, (j + 1) * chunk);
    const float s = scales[j];
    auto one = [&](std::int64_t k) { acc[k - lo] += decoded(((bits[k / 8] >> (k % 8)) & 1u) != 0, s); };
    for (; i < end && i % 8 != 0; ++i) one(i);
    i = body(bits, s, i, end, lo, acc);
    for (; i < end; ++i) one(i);
  }
}

void decompress_block(const DecompressArgs& a, std::int64_t lo, std::int64_t hi, RowBody body) {
  float* acc = a.out + lo;
  std::fill(acc, acc + (hi - lo), 0.0f);
  for (std::int64_t r = 0; r < a.rows; ++r) {
    add_row(a.bits + r * a.bits_stride, a.scales + r * a.scales_stride, a.chunk, lo, hi, acc, body);
  }
  for (std::int64_t k = 0; k < hi - lo; ++k) acc[k] = a.scale * acc[k];
}

void decompress_cpu(const SignRows& bits, const SignRows& scales, const TensorView& out, std::int64_t chunk,
                    float scale) {
  const DecompressArgs a{bits.span.as<const std::uint8_t>(), scales.span.as<const float>(), bits.rows,
                         bits.row_stride, scales.row_stride, out.as<float>(), out.numel, chunk, scale};
  // Tasks of detail::kTaskCost elements (a multiple of kDecodeBlock); one runs inline.
  const std::int64_t task = detail::kTaskCost;
  const std::int64_t tasks = (a.n + task - 1) / task;
  RowBody body = no_row_body;
#ifdef AGRT_ONEBIT_X86
  if (onebit_use_avx2()) body = row_body_avx2;
#endif
  parallel_for(0, tasks, 1, [&](std::int64_t tb, std::int64_t te) {
    const std::int64_t end = std::min(a.n, te * task);
    for (std::int64_t lo = tb * task; lo < end; lo += kDecodeBlock) {
      decompress_block(a, lo, std::min(end, lo + kDecodeBlock), body);
    }
  });
}

// Whether two byte ranges on one device intersect.
bool overlaps(const TensorView& a, const TensorView& b) noexcept {
  if (a.numel == 0 || b.numel == 0 || a.data == nullptr || b.data == nullptr || a.device != b.device) return false;
  const auto a0 = reinterpret_cast<std::uintptr_t>(a.data);
  const auto b0 = reinterpret_cast<std::uintptr_t>(b.data);
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

bool float_aligned(const TensorView& t) noexcept {
  return t.numel == 0 || reinterpret_cast<std::uintptr_t>(t.data) % alignof(float) == 0;
}

void check_compress_args(const TensorView& x, const TensorView* error, std::int64_t chunk, const TensorView& bits,
                         const TensorView& scales) {
  AGRT_EXPECTS(x.dtype == DType::kFloat32, TypeError, "sign_compress: x: expected float32, got ", dtype_name(x.dtype));
  AGRT_EXPECTS(chunk >= 1, ValueError, "sign_compress: chunk: expected an int >= 1, got ", chunk);
  const std::int64_t n = x.numel;
  if (error != nullptr) {
    AGRT_EXPECTS(error->dtype == DType::kFloat32, TypeError, "sign_compress: error: expected float32, got ",
                 dtype_name(error->dtype));
    AGRT_EXPECTS(error->numel == n, ValueError, "sign_compress: error has ", error->numel, " elements, x has ", n);
    AGRT_EXPECTS(error->device == x.device, ValueError, "sign_compress: error is on ", error->device.str(),
                 ", x on ", x.device.str());
    AGRT_EXPECTS(!error->read_only, ValueError, "sign_compress: error is read-only; it is updated in place");
  }
  AGRT_EXPECTS(bits.dtype == DType::kUInt8, TypeError, "sign_compress: bits_out: expected uint8, got ",
               dtype_name(bits.dtype));
  AGRT_EXPECTS(scales.dtype == DType::kFloat32, TypeError, "sign_compress: scales_out: expected float32, got ",
               dtype_name(scales.dtype));
  AGRT_EXPECTS(bits.numel == sign_bits_bytes(n), ValueError, "sign_compress: bits_out has ", bits.numel,
               " bytes, expected ceil(", n, " / 8) = ", sign_bits_bytes(n));
  AGRT_EXPECTS(scales.numel == sign_chunks(n, chunk), ValueError, "sign_compress: scales_out has ", scales.numel,
               " elements, expected ceil(", n, " / ", chunk, ") = ", sign_chunks(n, chunk));
  AGRT_EXPECTS(bits.device == x.device && scales.device == x.device, ValueError,
               "sign_compress: bits_out and scales_out must be on x's device ", x.device.str(), ", got ",
               bits.device.str(), " and ", scales.device.str());
  AGRT_EXPECTS(!bits.read_only && !scales.read_only, ValueError, "sign_compress: bits_out/scales_out are read-only");
  AGRT_EXPECTS(float_aligned(x) && float_aligned(scales) && (error == nullptr || float_aligned(*error)), ValueError,
               "sign_compress: x, error and scales_out must be 4-byte aligned");
  const TensorView none{};
  const std::pair<const TensorView*, const char*> views[] = {
      {&x, "x"}, {error ? error : &none, "error"}, {&bits, "bits_out"}, {&scales, "scales_out"}};
  for (std::size_t i = 0; i < 4; ++i) {
    for (std::size_t j = i + 1; j < 4; ++j) {
      AGRT_EXPECTS(!overlaps(*views[i].first, *views[j].first), ValueError, "sign_compress: ", views[j].second,
                   " overlaps ", views[i].second, " in memory; expected separate buffers");
    }
  }
}

void check_decompress_args(const SignRows& bits, const SignRows& scales, const TensorView& out, std::int64_t chunk) {
  AGRT_EXPECTS(bits.span.dtype == DType::kUInt8, TypeError, "sign_decompress: bits: expected uint8, got ",
               dtype_name(bits.span.dtype));
  AGRT_EXPECTS(scales.span.dtype == DType::kFloat32, TypeError, "sign_decompress: scales: expected float32, got ",
               dtype_name(scales.span.dtype));
  AGRT_EXPECTS(out.dtype == DType::kFloat32, TypeError, "sign_decompress: out: expected float32, got ",
               dtype_name(out.dtype));
  AGRT_EXPECTS(chunk >= 1, ValueError, "sign_decompress: chunk: expected an int >= 1, got ", chunk);
  AGRT_EXPECTS(bits.rows == scales.rows, ValueError, "sign_decompress: bits has ", bits.rows, " rows, scales has ",
               scales.rows, "; expected one row of each per rank");
  const std::int64_t n = out.numel;
  AGRT_EXPECTS(bits.row_len == sign_bits_bytes(n), ValueError, "sign_decompress: bits rows have ", bits.row_len,
               " bytes, expected ceil(", n, " / 8) = ", sign_bits_bytes(n), " for out's ", n, " elements");
  AGRT_EXPECTS(scales.row_len == sign_chunks(n, chunk), ValueError, "sign_decompress: scales rows have ",
               scales.row_len, " elements, expected ceil(", n, " / ", chunk, ") = ", sign_chunks(n, chunk),
               " for out's ", n, " elements");
  AGRT_EXPECTS(bits.rows <= 1 || (bits.row_stride >= bits.row_len && scales.row_stride >= scales.row_len), ValueError,
               "sign_decompress: rows must not overlap");
  AGRT_EXPECTS(bits.span.device == out.device && scales.span.device == out.device, ValueError,
               "sign_decompress: bits, scales and out must be on one device, got ", bits.span.device.str(), ", ",
               scales.span.device.str(), " and ", out.device.str());
  AGRT_EXPECTS(!out.read_only, ValueError, "sign_decompress: out is read-only; it is written");
  AGRT_EXPECTS(float_aligned(out) && float_aligned(scales.span), ValueError,
               "sign_decompress: out and scales must be 4-byte aligned");
  AGRT_EXPECTS(!overlaps(out, bits.span), ValueError,
               "sign_decompress: out overlaps bits in memory; expected separate buffers");
  AGRT_EXPECTS(!overlaps(out, scales.span), ValueError,
               "sign_decompress: out overlaps scales in memory; expected separate buffers");
}

}  // namespace

void sign_compress(const TensorView& x, const TensorView* error, std::int64_t chunk, const TensorView& bits,
                   const TensorView& scales) {
  check_compress_args(x, error, chunk, bits, scales);
  if (x.numel == 0) return;
  if (x.device.type == DeviceType::kCUDA) {
#ifdef AGRT_WITH_CUDA
    return cuda::sign_compress(x, error, chunk, bits, scales);
#else
    AGRT_EXPECTS(false, ValueError, "sign_compress: x is on ", x.device.str(),
                 " but this build of autoglm_rt has no CUDA kernels");
#endif
  }
  compress_cpu(x, error, chunk, bits, scales);
}

void sign_decompress(const SignRows& bits, const SignRows& scales, const TensorView& out, std::int64_t chunk,
                     double scale) {
  check_decompress_args(bits, scales, out, chunk);
  if (out.numel == 0) return;
  if (out.device.type == DeviceType::kCUDA) {
#ifdef AGRT_WITH_CUDA
    return cuda::sign_decompress(bits, scales, out, chunk, static_cast<float>(scale));
#else
    AGRT_EXPECTS(false, ValueError, "sign_decompress: out is on ", out.device.str(),
                 " but this build of autoglm_rt has no CUDA kernels");
#endif
  }
  decompress_cpu(bits, scales, out, chunk, static_cast<float>(scale));
}

}  // namespace agrt::kernels
