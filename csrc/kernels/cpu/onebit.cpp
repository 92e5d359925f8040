// CPU twin of the fused 1-bit (sign) compression, its averaging inverse, the fused 1-bit Adam
// steps built on them, and the one place where all are validated and dispatched to a device.
//
// Compress works chunk by chunk while the chunk is in cache: sum |c| in the lane order the header
// fixes (32 float64 lanes, then a tree), then one more sweep over the same, now cached, elements
// writes the bits and the new error. Chunks are grouped into tasks whose element boundaries are
// multiples of 8, so no byte of bits is shared between threads; a chunk that does not end on a
// byte boundary leaves its last byte to the next chunk of the same task to finish. sign_compress
// reads c as x + error; onebit_adam_compress first computes c into the error buffer, 2048
// elements ahead of the sums, and both then run the same sum and pack loops.
// Decompress fills blocks of out row by row (each block stays in L1 across the W rows); the Adam
// variant's last step writes u and out instead of scaling out.
//
// This file is compiled with -ffp-contract=off (CMakeLists.txt): the float32 formulas of
// kernels/onebit_detail.h must round each operation once, as the CUDA twin and numpy do.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <utility>
#include <vector>

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

using onebit_detail::AdamCoefficients;
using onebit_detail::add_rn;
using onebit_detail::adam_momentum;
using onebit_detail::averaged;
using onebit_detail::chunk_scale;
using onebit_detail::decoded;
using onebit_detail::error_after;
using onebit_detail::kept_momentum;
using onebit_detail::mul_rn;
using onebit_detail::sign_bit;

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

// Where compress reads c and writes the new error: c_i = x_i + add_i (x_i itself when add is null:
// x + 0.0f would turn -0.0 into +0.0), and err_i <- c_i - d_i when err is not null.
// sign_compress: (x, error, error). onebit_adam_compress, which has already stored c in the error
// buffer: (error, null, error); x and err alias there, and every loop reads an element before it
// writes it.
struct SignSource {
  const float* x;
  const float* add;
  float* err;
};

inline float combined(const float* x, const float* add, std::int64_t i) noexcept {
  return add ? add_rn(x[i], add[i]) : x[i];
}

// One segment's sum of |c| (len <= kSignSegment) in the header's order.
double segment_sum_scalar(const float* x, const float* add, std::int64_t len) noexcept {
  double lane[kSignLanes] = {};
  std::int64_t i = 0;
  for (; i + kSignLanes <= len; i += kSignLanes) {
    for (int l = 0; l < kSignLanes; ++l) lane[l] += static_cast<double>(std::fabs(combined(x, add, i + l)));
  }
  for (int l = 0; i + l < len; ++l) lane[l] += static_cast<double>(std::fabs(combined(x, add, i + l)));
  return lane_tree(lane);
}

// Bits and error for the elements [lo, hi) of one chunk whose scale is s. A byte that started in
// an earlier chunk (lo not a multiple of 8) is completed with OR; every other byte is written
// whole, bits at or past hi zero (the next chunk, or nothing: padding).
using PackBody = std::int64_t (*)(const SignSource&, std::int64_t, std::int64_t, float, std::uint8_t*) noexcept;

void pack_range(const SignSource& src, std::int64_t lo, std::int64_t hi, float s, std::uint8_t* bits,
                PackBody body) noexcept {
  std::int64_t i = lo;
  auto one = [&](std::int64_t k) -> unsigned {
    const float c = combined(src.x, src.add, k);
    const bool pos = sign_bit(c);
    if (src.err) src.err[k] = error_after(c, pos, s);
    return pos ? 1u : 0u;
  };
  if (i % 8 != 0) {
    unsigned b = bits[i / 8];
    const std::int64_t byte = i / 8;
    for (; i < hi && i % 8 != 0; ++i) b |= one(i) << (i % 8);
    bits[byte] = static_cast<std::uint8_t>(b);
  }
  i = body(src, i, hi, s, bits);  // whole bytes; returns where it stopped (a multiple of 8)
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

std::int64_t no_body(const SignSource&, std::int64_t i, std::int64_t, float, std::uint8_t*) noexcept { return i; }

// 1-bit Adam's inputs: c = adam_momentum(g, denom, u, e) is stored into e.
struct AdamInputs {
  const float* g;
  const float* denom;
  const float* u;
  float* e;
  AdamCoefficients k;
};

// The float64 sum of g^2 over a block of the Adam combine: eight lanes, lane k adding elements
// k, k + 8, k + 16, ... of the block in turn (the squares are exact in float64), then the tree
// "for off = 4, 2, 1: lane[k] += lane[k + off] for k < off". Both combine loops follow it.
double square_tree(double* lane) noexcept {
  for (int off = 4; off >= 1; off /= 2) {
    for (int k = 0; k < off; ++k) lane[k] += lane[k + off];
  }
  return lane[0];
}

// Computes c into e over [lo, hi) and returns the block's sum of g^2 (see square_tree).
using AdamCombine = double (*)(const AdamInputs&, std::int64_t, std::int64_t) noexcept;

inline void adam_one(const AdamInputs& a, std::int64_t i, double& lane) noexcept {
  const float g = a.g[i];
  a.e[i] = adam_momentum(g, a.denom[i], a.u[i], a.e[i], a.k);
  lane += static_cast<double>(g) * static_cast<double>(g);
}

double adam_combine_scalar(const AdamInputs& a, std::int64_t lo, std::int64_t hi) noexcept {
  double lane[8] = {};
  std::int64_t i = lo;
  for (; i + 8 <= hi; i += 8) {
    for (int k = 0; k < 8; ++k) adam_one(a, i + k, lane[k]);
  }
  for (int k = 0; i < hi; ++i, ++k) adam_one(a, i, lane[k]);
  return square_tree(lane);
}

#ifdef AGRT_ONEBIT_X86
// Eight 128-bit groups of four lanes: lane l of the header's order is element (l mod 4) of
// accumulator l / 4, so these sums equal the scalar loop's bit for bit.
__attribute__((target("avx2"))) double segment_sum_avx2(const float* x, const float* add, std::int64_t len) noexcept {
  const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
  __m256d acc[8];
  for (auto& a : acc) a = _mm256_setzero_pd();
  std::int64_t i = 0;
  for (; i + kSignLanes <= len; i += kSignLanes) {
    for (int q = 0; q < 8; ++q) {
      __m128 c = _mm_loadu_ps(x + i + 4 * q);
      if (add) c = _mm_add_ps(c, _mm_loadu_ps(add + i + 4 * q));
      acc[q] = _mm256_add_pd(acc[q], _mm256_cvtps_pd(_mm_and_ps(c, abs_mask)));
    }
  }
  alignas(32) double lane[kSignLanes];
  for (int q = 0; q < 8; ++q) _mm256_store_pd(lane + 4 * q, acc[q]);
  for (int l = 0; i + l < len; ++l) lane[l] += static_cast<double>(std::fabs(combined(x, add, i + l)));
  return lane_tree(lane);
}

// Whole bytes from i (a multiple of 8) while 8 elements remain before hi: compare, movemask (lane
// k -> bit k), blend +-s, error = c - d.
__attribute__((target("avx2"))) std::int64_t pack_body_avx2(const SignSource& src, std::int64_t i, std::int64_t hi,
                                                            float s, std::uint8_t* bits) noexcept {
  const __m256 pos_s = _mm256_set1_ps(s);
  const __m256 neg_s = _mm256_set1_ps(-s);
  const __m256 zero = _mm256_setzero_ps();
  for (; i + 8 <= hi; i += 8) {
    __m256 c = _mm256_loadu_ps(src.x + i);
    if (src.add) c = _mm256_add_ps(c, _mm256_loadu_ps(src.add + i));
    const __m256 pos = _mm256_cmp_ps(c, zero, _CMP_GE_OQ);  // false for NaN, true for -0.0
    bits[i / 8] = static_cast<std::uint8_t>(_mm256_movemask_ps(pos));
    if (src.err) _mm256_storeu_ps(src.err + i, _mm256_sub_ps(c, _mm256_blendv_ps(neg_s, pos_s, pos)));
  }
  return i;
}

// adam_momentum on eight lanes (the same four roundings: div, two muls, two adds), and g^2 into
// two float64 accumulators holding lanes 0-3 and 4-7 of square_tree's order.
__attribute__((target("avx2"))) double adam_combine_avx2(const AdamInputs& a, std::int64_t lo,
                                                         std::int64_t hi) noexcept {
  const __m256 beta1 = _mm256_set1_ps(a.k.beta1);
  const __m256 rest = _mm256_set1_ps(a.k.one_minus_beta1);
  __m256d sq_lo = _mm256_setzero_pd();
  __m256d sq_hi = _mm256_setzero_pd();
  std::int64_t i = lo;
  for (; i + 8 <= hi; i += 8) {
    const __m256 g = _mm256_loadu_ps(a.g + i);
    const __m256 p = _mm256_div_ps(g, _mm256_loadu_ps(a.denom + i));
    const __m256 m = _mm256_add_ps(_mm256_mul_ps(beta1, _mm256_loadu_ps(a.u + i)), _mm256_mul_ps(rest, p));
    _mm256_storeu_ps(a.e + i, _mm256_add_ps(m, _mm256_loadu_ps(a.e + i)));
    const __m256d g0 = _mm256_cvtps_pd(_mm256_castps256_ps128(g));
    const __m256d g1 = _mm256_cvtps_pd(_mm256_extractf128_ps(g, 1));
    sq_lo = _mm256_add_pd(sq_lo, _mm256_mul_pd(g0, g0));
    sq_hi = _mm256_add_pd(sq_hi, _mm256_mul_pd(g1, g1));
  }
  alignas(32) double lane[8];
  _mm256_store_pd(lane, sq_lo);
  _mm256_store_pd(lane + 4, sq_hi);
  for (int k = 0; i < hi; ++i, ++k) adam_one(a, i, lane[k]);
  return square_tree(lane);
}
#endif

// The loops a call uses: AVX2 or portable (same bits).
using SegmentSum = double (*)(const float*, const float*, std::int64_t) noexcept;
struct CompressLoops {
  SegmentSum sum = segment_sum_scalar;
  PackBody pack = no_body;
  AdamCombine adam = adam_combine_scalar;
};

CompressLoops compress_loops() noexcept {
  CompressLoops loops;
#ifdef AGRT_ONEBIT_X86
  if (onebit_use_avx2()) loops = {segment_sum_avx2, pack_body_avx2, adam_combine_avx2};
#endif
  return loops;
}

// How compress cuts n elements into tasks: a task is a run of whole chunks starting on a byte
// boundary (a multiple of `align` chunks), about detail::kTaskCost elements long: the same size
// below which the other CPU reductions stay on the caller's thread. One task's worth of input runs
// inline. The cut depends on n and chunk only.
struct CompressPlan {
  std::int64_t n, chunk, chunks, per_task, tasks;
  std::int64_t first_chunk(std::int64_t t) const noexcept { return t * per_task; }
  std::int64_t end_chunk(std::int64_t t) const noexcept { return std::min(chunks, (t + 1) * per_task); }
};

CompressPlan plan_compress(std::int64_t n, std::int64_t chunk) noexcept {
  const std::int64_t nc = sign_chunks(n, chunk);
  const std::int64_t align = 8 / std::gcd<std::int64_t>(chunk, 8);
  const std::int64_t want = std::max<std::int64_t>(1, detail::kTaskCost / chunk);
  const std::int64_t per_task = std::max(align, want / align * align);
  return {n, chunk, nc, per_task, (nc + per_task - 1) / per_task};
}

// Scales, bits and error of chunks [jb, je). Before segment [s0, s1) is summed, ready(s1) makes
// sure c is in place up to s1 (sign_compress: nothing to do).
template <class Ready>
void compress_chunks(const SignSource& src, const CompressPlan& plan, std::uint8_t* bits, float* scales,
                     std::int64_t jb, std::int64_t je, const CompressLoops& loops, Ready&& ready) {
  for (std::int64_t j = jb; j < je; ++j) {
    const std::int64_t lo = j * plan.chunk;
    const std::int64_t hi = std::min(plan.n, lo + plan.chunk);
    double sum = 0.0;
    for (std::int64_t s0 = lo; s0 < hi; s0 += kSignSegment) {
      const std::int64_t s1 = std::min(hi, s0 + kSignSegment);
      ready(s1);
      sum += loops.sum(src.x + s0, src.add ? src.add + s0 : nullptr, s1 - s0);
    }
    const float s = chunk_scale(sum, hi - lo);
    scales[j] = s;
    pack_range(src, lo, hi, s, bits, loops.pack);
  }
}

void compress_cpu(const TensorView& x, const TensorView* error, std::int64_t chunk, const TensorView& bits,
                  const TensorView& scales) {
  float* e = error ? error->as<float>() : nullptr;
  const SignSource src{x.as<const float>(), e, e};
  const CompressPlan plan = plan_compress(x.numel, chunk);
  const CompressLoops loops = compress_loops();
  auto* bp = bits.as<std::uint8_t>();
  auto* sp = scales.as<float>();
  parallel_for(0, plan.tasks, 1, [&](std::int64_t tb, std::int64_t te) {
    compress_chunks(src, plan, bp, sp, plan.first_chunk(tb), plan.end_chunk(te - 1), loops, [](std::int64_t) {});
  });
}

// 1-bit Adam's compress: per task, c is computed into e in blocks of kSignSegment elements from
// the task's start, each one just before the first segment sum that needs it (so the sums and
// the packing read it from L1/L2); the task's g^2 is 0.0 + block_0 + block_1 + ..., and the
// call's is 0.0 + task_0 + task_1 + ...: fixed by n and chunk.
void adam_compress_cpu(const AdamInputs& in, std::int64_t n, std::int64_t chunk, const TensorView& bits,
                       const TensorView& scales, const TensorView* sq_norm) {
  const SignSource src{in.e, nullptr, in.e};
  const CompressPlan plan = plan_compress(n, chunk);
  const CompressLoops loops = compress_loops();
  auto* bp = bits.as<std::uint8_t>();
  auto* sp = scales.as<float>();
  std::vector<double> task_sq(static_cast<std::size_t>(plan.tasks), 0.0);
  parallel_for(0, plan.tasks, 1, [&](std::int64_t tb, std::int64_t te) {
    for (std::int64_t t = tb; t < te; ++t) {
      const std::int64_t jb = plan.first_chunk(t);
      const std::int64_t je = plan.end_chunk(t);
      const std::int64_t hi = std::min(n, je * chunk);
      std::int64_t done = jb * chunk;
      double sq = 0.0;
      compress_chunks(src, plan, bp, sp, jb, je, loops, [&](std::int64_t upto) {
        while (done < upto) {
          const std::int64_t end = std::min(hi, done + kSignSegment);
          sq += loops.adam(in, done, end);
          done = end;
        }
      });
      task_sq[static_cast<std::size_t>(t)] = sq;
    }
  });
  if (sq_norm != nullptr) {
    double total = 0.0;
    for (const double v : task_sq) total += v;
    std::memcpy(sq_norm->data, &total, sizeof total);
  }
}

struct DecompressArgs {
  const std::uint8_t* bits;
  const float* scales;
  std::int64_t rows, bits_stride, scales_stride;
  float* out;
  std::int64_t n, chunk;
  float scale;
  float* u;  // null: sign_decompress; else the 1-bit Adam step (onebit_detail::kept_momentum)
  float bias;
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

// The last step of a block: out = scale * acc, or 1-bit Adam's u and out from the same average.
// Both loops vectorize (the select is stored unconditionally).
void finish_block(float* acc, std::int64_t len, float scale) noexcept {
  for (std::int64_t k = 0; k < len; ++k) acc[k] = averaged(acc[k], scale);
}

void finish_block_adam(float* acc, float* u, std::int64_t len, float scale, float bias) noexcept {
  for (std::int64_t k = 0; k < len; ++k) {
    const float avg = averaged(acc[k], scale);
    u[k] = kept_momentum(avg, u[k]);
    acc[k] = mul_rn(avg, bias);
  }
}

void decompress_block(const DecompressArgs& a, std::int64_t lo, std::int64_t hi, RowBody body) {
  float* acc = a.out + lo;
  std::fill(acc, acc + (hi - lo), 0.0f);
  for (std::int64_t r = 0; r < a.rows; ++r) {
    add_row(a.bits + r * a.bits_stride, a.scales + r * a.scales_stride, a.chunk, lo, hi, acc, body);
  }
  if (a.u == nullptr) {
    finish_block(acc, hi - lo, a.scale);
  } else {
    finish_block_adam(acc, a.u + lo, hi - lo, a.scale, a.bias);
  }
}

void decompress_cpu(const SignRows& bits, const SignRows& scales, const TensorView& out, std::int64_t chunk,
                    float scale, float* u, float bias) {
  const DecompressArgs a{bits.span.as<const std::uint8_t>(),
                         scales.span.as<const float>(),
                         bits.rows,
                         bits.row_stride,
                         scales.row_stride,
                         out.as<float>(),
                         out.numel,
                         chunk,
                         scale,
                         u,
                         bias};
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

// An argument for the overlap check: written ones may share no byte with any other argument;
// two read-only ones may.
struct Named {
  const TensorView* view;
  const char* name;
  bool written;
};

template <std::size_t N>
void check_no_overlap(const char* op, const Named (&args)[N]) {
  for (std::size_t i = 0; i < N; ++i) {
    for (std::size_t j = i + 1; j < N; ++j) {
      if (!args[i].written && !args[j].written) continue;
      AGRT_EXPECTS(!overlaps(*args[i].view, *args[j].view), ValueError, op, ": ", args[j].name, " overlaps ",
                   args[i].name, " in memory; expected separate buffers");
    }
  }
}

// A float32 array of n elements updated or read beside the first argument `ref_name`.
void check_float_like(const char* op, const TensorView& t, const char* name, std::int64_t n, const TensorView& ref,
                      const char* ref_name, bool written) {
  AGRT_EXPECTS(t.dtype == DType::kFloat32, TypeError, op, ": ", name, ": expected float32, got ", dtype_name(t.dtype));
  AGRT_EXPECTS(t.numel == n, ValueError, op, ": ", name, " has ", t.numel, " elements, ", ref_name, " has ", n);
  AGRT_EXPECTS(t.device == ref.device, ValueError, op, ": ", name, " is on ", t.device.str(), ", ", ref_name, " on ",
               ref.device.str());
  AGRT_EXPECTS(!written || !t.read_only, ValueError, op, ": ", name, " is read-only; it is updated in place");
  AGRT_EXPECTS(float_aligned(t), ValueError, op, ": ", name, " must be 4-byte aligned");
}

// The message buffers a compress writes for n elements on `device`.
void check_message_outputs(const char* op, std::int64_t n, std::int64_t chunk, const Device& device,
                           const char* ref_name, const TensorView& bits, const TensorView& scales) {
  AGRT_EXPECTS(bits.dtype == DType::kUInt8, TypeError, op, ": bits_out: expected uint8, got ", dtype_name(bits.dtype));
  AGRT_EXPECTS(scales.dtype == DType::kFloat32, TypeError, op, ": scales_out: expected float32, got ",
               dtype_name(scales.dtype));
  AGRT_EXPECTS(bits.numel == sign_bits_bytes(n), ValueError, op, ": bits_out has ", bits.numel,
               " bytes, expected ceil(", n, " / 8) = ", sign_bits_bytes(n));
  AGRT_EXPECTS(scales.numel == sign_chunks(n, chunk), ValueError, op, ": scales_out has ", scales.numel,
               " elements, expected ceil(", n, " / ", chunk, ") = ", sign_chunks(n, chunk));
  AGRT_EXPECTS(bits.device == device && scales.device == device, ValueError, op,
               ": bits_out and scales_out must be on ", ref_name, "'s device ", device.str(), ", got ",
               bits.device.str(), " and ", scales.device.str());
  AGRT_EXPECTS(!bits.read_only && !scales.read_only, ValueError, op, ": bits_out/scales_out are read-only");
}

void check_compress_args(const TensorView& x, const TensorView* error, std::int64_t chunk, const TensorView& bits,
                         const TensorView& scales) {
  const char* op = "sign_compress";
  AGRT_EXPECTS(x.dtype == DType::kFloat32, TypeError, op, ": x: expected float32, got ", dtype_name(x.dtype));
  AGRT_EXPECTS(chunk >= 1, ValueError, op, ": chunk: expected an int >= 1, got ", chunk);
  const std::int64_t n = x.numel;
  if (error != nullptr) {
    AGRT_EXPECTS(error->dtype == DType::kFloat32, TypeError, op, ": error: expected float32, got ",
                 dtype_name(error->dtype));
    AGRT_EXPECTS(error->numel == n, ValueError, op, ": error has ", error->numel, " elements, x has ", n);
    AGRT_EXPECTS(error->device == x.device, ValueError, op, ": error is on ", error->device.str(), ", x on ",
                 x.device.str());
    AGRT_EXPECTS(!error->read_only, ValueError, op, ": error is read-only; it is updated in place");
  }
  check_message_outputs(op, n, chunk, x.device, "x", bits, scales);
  AGRT_EXPECTS(float_aligned(x) && float_aligned(scales) && (error == nullptr || float_aligned(*error)), ValueError,
               op, ": x, error and scales_out must be 4-byte aligned");
  const TensorView none{};
  const Named args[] = {
      {&x, "x", false},
      {error ? error : &none, "error", true},
      {&bits, "bits_out", true},
      {&scales, "scales_out", true}};
  check_no_overlap(op, args);
}

void check_adam_compress_args(const TensorView& g, const TensorView& denom, const TensorView& u,
                              const TensorView& error, double beta1, std::int64_t chunk, const TensorView& bits,
                              const TensorView& scales, const TensorView* sq_norm) {
  const char* op = "onebit_adam_compress";
  AGRT_EXPECTS(g.dtype == DType::kFloat32, TypeError, op, ": g: expected float32, got ", dtype_name(g.dtype));
  AGRT_EXPECTS(float_aligned(g), ValueError, op, ": g must be 4-byte aligned");
  const std::int64_t n = g.numel;
  check_float_like(op, denom, "denom", n, g, "g", false);
  check_float_like(op, u, "u", n, g, "g", false);
  check_float_like(op, error, "error", n, g, "g", true);
  AGRT_EXPECTS(chunk >= 1, ValueError, op, ": chunk: expected an int >= 1, got ", chunk);
  AGRT_EXPECTS(std::isfinite(beta1) && beta1 >= 0.0 && beta1 < 1.0, ValueError, op,
               ": beta1: expected a finite float in [0, 1), got ", beta1);
  check_message_outputs(op, n, chunk, g.device, "g", bits, scales);
  AGRT_EXPECTS(float_aligned(scales), ValueError, op, ": scales_out must be 4-byte aligned");
  const TensorView none{};
  if (sq_norm != nullptr) {
    AGRT_EXPECTS(sq_norm->nbytes() == sizeof(double), ValueError, op,
                 ": sq_norm_out: expected 8 bytes (one float64), got ", sq_norm->nbytes());
    AGRT_EXPECTS(sq_norm->device == g.device, ValueError, op, ": sq_norm_out must be on g's device ", g.device.str(),
                 ", got ", sq_norm->device.str());
    AGRT_EXPECTS(!sq_norm->read_only, ValueError, op, ": sq_norm_out is read-only");
    AGRT_EXPECTS(reinterpret_cast<std::uintptr_t>(sq_norm->data) % alignof(double) == 0, ValueError, op,
                 ": sq_norm_out: expected 8-byte alignment");
  }
  const Named args[] = {{&g, "g", false},
                        {&denom, "denom", false},
                        {&u, "u", false},
                        {&error, "error", true},
                        {&bits, "bits_out", true},
                        {&scales, "scales_out", true},
                        {sq_norm ? sq_norm : &none, "sq_norm_out", true}};
  check_no_overlap(op, args);
}

void check_decompress_args(const char* op, const SignRows& bits, const SignRows& scales, const TensorView& out,
                           std::int64_t chunk) {
  AGRT_EXPECTS(bits.span.dtype == DType::kUInt8, TypeError, op, ": bits: expected uint8, got ",
               dtype_name(bits.span.dtype));
  AGRT_EXPECTS(scales.span.dtype == DType::kFloat32, TypeError, op, ": scales: expected float32, got ",
               dtype_name(scales.span.dtype));
  AGRT_EXPECTS(out.dtype == DType::kFloat32, TypeError, op, ": out: expected float32, got ", dtype_name(out.dtype));
  AGRT_EXPECTS(chunk >= 1, ValueError, op, ": chunk: expected an int >= 1, got ", chunk);
  AGRT_EXPECTS(bits.rows == scales.rows, ValueError, op, ": bits has ", bits.rows, " rows, scales has ", scales.rows,
               "; expected one row of each per rank");
  const std::int64_t n = out.numel;
  AGRT_EXPECTS(bits.row_len == sign_bits_bytes(n), ValueError, op, ": bits rows have ", bits.row_len,
               " bytes, expected ceil(", n, " / 8) = ", sign_bits_bytes(n), " for out's ", n, " elements");
  AGRT_EXPECTS(scales.row_len == sign_chunks(n, chunk), ValueError, op, ": scales rows have ", scales.row_len,
               " elements, expected ceil(", n, " / ", chunk, ") = ", sign_chunks(n, chunk), " for out's ", n,
               " elements");
  AGRT_EXPECTS(bits.rows <= 1 || (bits.row_stride >= bits.row_len && scales.row_stride >= scales.row_len), ValueError,
               op, ": rows must not overlap");
  AGRT_EXPECTS(bits.span.device == out.device && scales.span.device == out.device, ValueError, op,
               ": bits, scales and out must be on one device, got ", bits.span.device.str(), ", ",
               scales.span.device.str(), " and ", out.device.str());
  AGRT_EXPECTS(!out.read_only, ValueError, op, ": out is read-only; it is written");
  AGRT_EXPECTS(float_aligned(out) && float_aligned(scales.span), ValueError, op,
               ": out and scales must be 4-byte aligned");
  AGRT_EXPECTS(!overlaps(out, bits.span), ValueError, op, ": out overlaps bits in memory; expected separate buffers");
  AGRT_EXPECTS(!overlaps(out, scales.span), ValueError, op,
               ": out overlaps scales in memory; expected separate buffers");
}

void check_adam_decompress_args(const SignRows& bits, const SignRows& scales, const TensorView& out,
                                const TensorView& u, std::int64_t chunk, double scale, double bias) {
  const char* op = "onebit_adam_decompress";
  check_decompress_args(op, bits, scales, out, chunk);
  check_float_like(op, u, "u", out.numel, out, "out", true);
  // Both are applied as float32: 1e39 is finite as a double but not as a float. A double rounds to
  // a finite float exactly when its magnitude is below the midpoint of FLT_MAX and 2^128
  // (compared as doubles: converting an out-of-range double to float is undefined behaviour).
  constexpr double kFloatRoundsToInf = 3.4028235677973366e38;  // (2 - 2^-24) * 2^127
  AGRT_EXPECTS(std::fabs(scale) < kFloatRoundsToInf, ValueError, op,
               ": scale: expected a float finite in float32, got ", scale);
  AGRT_EXPECTS(std::fabs(bias) < kFloatRoundsToInf, ValueError, op,
               ": bias: expected a float finite in float32, got ", bias);
  const Named args[] = {
      {&bits.span, "bits", false}, {&scales.span, "scales", false}, {&out, "out", true}, {&u, "u", true}};
  check_no_overlap(op, args);
}

[[noreturn]] void no_cuda(const char* op, const char* arg, const Device& device) {
  throw ValueError(::agrt::detail::concat(op, ": ", arg, " is on ", device.str(),
                                  " but this build of autoglm_rt has no CUDA kernels"));
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
    no_cuda("sign_compress", "x", x.device);
#endif
  }
  compress_cpu(x, error, chunk, bits, scales);
}

void sign_decompress(const SignRows& bits, const SignRows& scales, const TensorView& out, std::int64_t chunk,
                     double scale) {
  check_decompress_args("sign_decompress", bits, scales, out, chunk);
  if (out.numel == 0) return;
  if (out.device.type == DeviceType::kCUDA) {
#ifdef AGRT_WITH_CUDA
    return cuda::sign_decompress(bits, scales, out, chunk, static_cast<float>(scale));
#else
    no_cuda("sign_decompress", "out", out.device);
#endif
  }
  decompress_cpu(bits, scales, out, chunk, static_cast<float>(scale), nullptr, 1.0f);
}

void onebit_adam_compress(const TensorView& g, const TensorView& denom, const TensorView& u, const TensorView& error,
                          double beta1, std::int64_t chunk, const TensorView& bits, const TensorView& scales,
                          const TensorView* sq_norm) {
  check_adam_compress_args(g, denom, u, error, beta1, chunk, bits, scales, sq_norm);
  const AdamCoefficients k = onebit_detail::adam_coefficients(beta1);
  if (g.device.type == DeviceType::kCUDA) {
#ifdef AGRT_WITH_CUDA
    return cuda::onebit_adam_compress(g, denom, u, error, k.beta1, k.one_minus_beta1, chunk, bits, scales, sq_norm);
#else
    no_cuda("onebit_adam_compress", "g", g.device);
#endif
  }
  const AdamInputs in{g.as<const float>(), denom.as<const float>(), u.as<const float>(), error.as<float>(), k};
  adam_compress_cpu(in, g.numel, chunk, bits, scales, sq_norm);
}

void onebit_adam_decompress(const SignRows& bits, const SignRows& scales, const TensorView& out, const TensorView& u,
                            std::int64_t chunk, double scale, double bias) {
  check_adam_decompress_args(bits, scales, out, u, chunk, scale, bias);
  if (out.numel == 0) return;
  if (out.device.type == DeviceType::kCUDA) {
#ifdef AGRT_WITH_CUDA
    return cuda::onebit_adam_decompress(bits, scales, out, u, chunk, static_cast<float>(scale),
                                        static_cast<float>(bias));
#else
    no_cuda("onebit_adam_decompress", "out", out.device);
#endif
  }
  decompress_cpu(bits, scales, out, chunk, static_cast<float>(scale), u.as<float>(), static_cast<float>(bias));
}

}  // namespace agrt::kernels
