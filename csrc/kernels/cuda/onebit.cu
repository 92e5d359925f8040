// CUDA twin of the fused 1-bit (sign) compression, its averaging inverse and the fused 1-bit Adam
// steps, on the caller's stream with no host synchronisation. Sums follow the header's order
// exactly (lane l of a warp adds elements l, l + 32, ... of a segment; a shuffle-down tree;
// segments in order), so scales, bits and error equal the CPU twin's bit for bit, except for the
// sign and payload of a NaN: the GPU writes its canonical NaN, x86 keeps or makes its own.
//
//   chunk % 8 == 0 and chunk <= kFusedMaxChunk (the usual case): one kernel, one warp per chunk:
//     segment sums -> scale -> ballot-packed bits and error over the chunk (now in L1/L2).
//   otherwise: bytes may straddle chunks, or a chunk is too long for one warp:
//     segment_sums  one warp per segment; when a chunk is one segment it writes the scale itself
//     chunk_scales  one thread per chunk adds its segments in order (only for multi-segment chunks)
//     pack_bytes    one thread per byte: its eight bits and errors
// Both are templates over where c comes from (a Source, below): sign_compress reads x + error in
// both sweeps; 1-bit Adam computes c from g, denom, u and error in the first sweep, stores it in
// error and reads it back in the second (in the fused kernel the same thread writes and reads
// each element: segments and 32-element groups both start at multiples of 32 from the chunk's
// start). Adam's sum of g^2: per thread, then per block (shuffle tree, warps in order) into
// scratch, then one block adds the blocks' partials in a fixed order; the grid depends on n and
// chunk only, so the result is the same on every run.
#include <cuda_runtime.h>

#include <cstdint>

#include "autoglm_rt/error.h"
#include "autoglm_rt/kernels/onebit.h"
#include "core/cuda/helpers.h"
#include "kernels/onebit_detail.h"

namespace agrt::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr long long kFusedMaxChunk = 16384;
constexpr long long kMaxBlocks = 65536;
constexpr unsigned kFullMask = 0xffffffffu;

static_assert(kSignLanes == 32, "the lane order of the header is a warp's");

using onebit_detail::AdamCoefficients;
using onebit_detail::adam_momentum;
using onebit_detail::averaged;
using onebit_detail::chunk_scale;
using onebit_detail::error_after;
using onebit_detail::kept_momentum;
using onebit_detail::mul_rn;
using onebit_detail::sign_bit;

// sign_compress's c: x_i + e_i in float32; x_i alone without error feedback (as on the CPU).
struct SignSource {
  static constexpr bool kSquares = false;
  const float* x;
  float* e;
  __device__ __forceinline__ float first(long long i) const {
    return e != nullptr ? onebit_detail::add_rn(x[i], e[i]) : x[i];
  }
  __device__ __forceinline__ float second(long long i) const { return first(i); }
  __device__ __forceinline__ float* error() const { return e; }
};

// 1-bit Adam's c (onebit_detail::adam_momentum), stored into e by the first sweep (which also adds
// up g^2 for this thread), read back from there by the second.
struct AdamSource {
  static constexpr bool kSquares = true;
  const float* g;
  const float* denom;
  const float* u;
  float* e;
  AdamCoefficients k;
  double sq = 0.0;
  __device__ __forceinline__ float first(long long i) {
    const float gi = g[i];
    const float c = adam_momentum(gi, denom[i], u[i], e[i], k);
    e[i] = c;
    const double gd = static_cast<double>(gi);
    sq = __dadd_rn(sq, __dmul_rn(gd, gd));  // the square is exact in float64
    return c;
  }
  __device__ __forceinline__ float second(long long i) const { return e[i]; }
  __device__ __forceinline__ float* error() const { return e; }
  __device__ __forceinline__ double squares() const { return sq; }
};

// Sum of |c| over [lo, hi) (at most one segment) in the header's order; every lane returns it.
template <class Source>
__device__ __forceinline__ double warp_segment_sum(Source& src, long long lo, long long hi, int lane) {
  double acc = 0.0;
  for (long long i = lo + lane; i < hi; i += 32) acc = __dadd_rn(acc, static_cast<double>(fabsf(src.first(i))));
  for (int off = 16; off >= 1; off /= 2) acc = __dadd_rn(acc, __shfl_down_sync(kFullMask, acc, off));
  return __shfl_sync(kFullMask, acc, 0);
}

// The block's threads' g^2 added into partial[blockIdx.x]: a shuffle tree per warp, then warp 0
// adds the warps in order. Every thread of the block must call it.
template <class Source>
__device__ void block_squares(const Source& src, double* __restrict__ partial) {
  if constexpr (Source::kSquares) {
    __shared__ double warp_sum[kWarpsPerBlock];
    double v = src.squares();
    for (int off = 16; off >= 1; off /= 2) v = __dadd_rn(v, __shfl_down_sync(kFullMask, v, off));
    if ((threadIdx.x & 31) == 0) warp_sum[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
      double total = 0.0;
      for (int w = 0; w < kWarpsPerBlock; ++w) total = __dadd_rn(total, warp_sum[w]);
      partial[blockIdx.x] = total;
    }
  }
}

// One warp per chunk (grid-stride over chunks); chunk % 8 == 0 so no byte spans two chunks.
template <class Source>
__global__ void __launch_bounds__(kThreads) compress_fused(Source src, long long n, long long chunk, long long nc,
                                                           unsigned char* __restrict__ bits,
                                                           float* __restrict__ scales, double* __restrict__ sq) {
  const int lane = threadIdx.x & 31;
  const long long warps = static_cast<long long>(gridDim.x) * kWarpsPerBlock;
  float* e = src.error();
  for (long long j = blockIdx.x * static_cast<long long>(kWarpsPerBlock) + threadIdx.x / 32; j < nc; j += warps) {
    const long long lo = j * chunk;
    const long long hi = lo + chunk < n ? lo + chunk : n;
    double sum = 0.0;
    for (long long s0 = lo; s0 < hi; s0 += kSignSegment) {
      const long long s1 = s0 + kSignSegment < hi ? s0 + kSignSegment : hi;
      sum = __dadd_rn(sum, warp_segment_sum(src, s0, s1, lane));
    }
    const float s = chunk_scale(sum, hi - lo);
    if (lane == 0) scales[j] = s;
    for (long long base = lo; base < hi; base += 32) {  // base % 8 == 0
      const long long i = base + lane;
      const bool in = i < hi;
      const float c = in ? src.second(i) : 0.0f;
      const bool pos = in && sign_bit(c);  // false for NaN
      const unsigned ballot = __ballot_sync(kFullMask, pos);
      if (in && e != nullptr) e[i] = error_after(c, pos, s);
      // Lane 8q writes the byte of elements base + 8q .. + 7: all inside this chunk, or past n
      // (padding, whose ballot bits are 0).
      if ((lane & 7) == 0 && in) bits[i >> 3] = static_cast<unsigned char>((ballot >> lane) & 0xffu);
    }
  }
  if (sq != nullptr) block_squares(src, sq);
}

// One warp per segment slot: chunk j owns slots [j * spc, (j + 1) * spc); the last chunk's unused
// slots stay unwritten. With one slot per chunk the sum is the chunk's: the scale goes straight
// to `scales`; otherwise to partial[slot].
template <class Source>
__global__ void __launch_bounds__(kThreads) segment_sums(Source src, long long n, long long chunk, long long spc,
                                                         long long slots, double* __restrict__ partial,
                                                         float* __restrict__ scales, double* __restrict__ sq) {
  const int lane = threadIdx.x & 31;
  const long long warps = static_cast<long long>(gridDim.x) * kWarpsPerBlock;
  for (long long g = blockIdx.x * static_cast<long long>(kWarpsPerBlock) + threadIdx.x / 32; g < slots; g += warps) {
    const long long j = g / spc;
    const long long chunk_hi = (j + 1) * chunk < n ? (j + 1) * chunk : n;
    const long long lo = j * chunk + (g % spc) * kSignSegment;
    if (lo >= chunk_hi) continue;  // the whole warp skips together
    const long long hi = lo + kSignSegment < chunk_hi ? lo + kSignSegment : chunk_hi;
    const double sum = warp_segment_sum(src, lo, hi, lane);
    if (lane == 0) {
      if (partial == nullptr) {
        scales[j] = chunk_scale(sum, chunk_hi - j * chunk);
      } else {
        partial[g] = sum;
      }
    }
  }
  if (sq != nullptr) block_squares(src, sq);
}

__global__ void __launch_bounds__(kThreads) chunk_scales(const double* __restrict__ partial, long long n,
                                                         long long chunk, long long spc, long long nc,
                                                         float* __restrict__ scales) {
  for (long long j = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; j < nc;
       j += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long len = ((j + 1) * chunk < n ? (j + 1) * chunk : n) - j * chunk;
    const long long segs = (len + kSignSegment - 1) / kSignSegment;
    double sum = 0.0;
    for (long long k = 0; k < segs; ++k) sum = __dadd_rn(sum, partial[j * spc + k]);
    scales[j] = chunk_scale(sum, len);
  }
}

// One thread per byte: its (up to) eight elements, each decoded with its own chunk's scale.
template <class Source>
__global__ void __launch_bounds__(kThreads) pack_bytes(Source src, long long n, long long chunk,
                                                       const float* __restrict__ scales,
                                                       unsigned char* __restrict__ bits, long long nbytes) {
  float* e = src.error();
  for (long long b = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; b < nbytes;
       b += static_cast<long long>(gridDim.x) * blockDim.x) {
    unsigned byte = 0;
    for (int k = 0; k < 8; ++k) {
      const long long i = 8 * b + k;
      if (i >= n) break;
      const float c = src.second(i);
      const bool pos = sign_bit(c);
      byte |= (pos ? 1u : 0u) << k;
      if (e != nullptr) e[i] = error_after(c, pos, scales[i / chunk]);
    }
    bits[b] = static_cast<unsigned char>(byte);
  }
}

// One block adds partial[0..count) into *out: thread t adds t, t + kThreads, ... in order, then a
// fixed tree over the threads. Deterministic for a given count.
__global__ void __launch_bounds__(kThreads) sum_partials(const double* __restrict__ partial, long long count,
                                                         double* __restrict__ out) {
  __shared__ double sh[kThreads];
  double v = 0.0;
  for (long long i = threadIdx.x; i < count; i += kThreads) v = __dadd_rn(v, partial[i]);
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int off = kThreads / 2; off >= 1; off /= 2) {
    if (threadIdx.x < off) sh[threadIdx.x] = __dadd_rn(sh[threadIdx.x], sh[threadIdx.x + off]);
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = sh[0];
}

// How an element ends a decompress: out = average (sign_decompress) ...
struct PlainFinish {
  float* out;
  float scale;
  __device__ __forceinline__ void operator()(long long i, float acc) const { out[i] = averaged(acc, scale); }
};

// ... or 1-bit Adam's u where the average is finite, and out = average * bias.
struct AdamFinish {
  float* out;
  float* u;
  float scale;
  float bias;
  __device__ __forceinline__ void operator()(long long i, float acc) const {
    const float avg = averaged(acc, scale);
    u[i] = kept_momentum(avg, u[i]);
    out[i] = mul_rn(avg, bias);
  }
};

// One thread per element: rows added in order in float32 from 0.0f, then finished.
template <class Finish>
__global__ void __launch_bounds__(kThreads) decompress(const unsigned char* __restrict__ bits, long long bits_stride,
                                                       const float* __restrict__ scales, long long scales_stride,
                                                       long long rows, long long n, long long chunk, Finish finish) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long byte = i >> 3;
    const int bit = static_cast<int>(i & 7);
    const long long j = i / chunk;
    float acc = 0.0f;
    for (long long r = 0; r < rows; ++r) {
      const bool set = ((bits[r * bits_stride + byte] >> bit) & 1u) != 0;
      acc = __fadd_rn(acc, onebit_detail::decoded(set, scales[r * scales_stride + j]));
    }
    finish(i, acc);
  }
}

unsigned int blocks_for(long long work, long long per_block) {
  const long long b = (work + per_block - 1) / per_block;
  return static_cast<unsigned int>(b < 1 ? 1 : (b < kMaxBlocks ? b : kMaxBlocks));
}

// Both compress paths for one Source; `sq_out` (Adam only, may be null) receives sum g^2.
template <class Source>
void compress(Source src, long long n, long long chunk, const TensorView& bits, const TensorView& scales,
              double* sq_out, cudaStream_t stream, int device) {
  const long long nc = sign_chunks(n, chunk);
  auto* bp = bits.as<unsigned char>();
  float* sp = scales.as<float>();
  const bool fused = chunk % 8 == 0 && chunk <= kFusedMaxChunk;
  // Segments per chunk: no chunk holds more than min(chunk, n) elements, so a huge chunk over a
  // small tensor does not size the scratch (or the grid) by the chunk.
  const long long longest = chunk < n ? chunk : (n > 0 ? n : 1);
  const long long spc = (longest + kSignSegment - 1) / kSignSegment;
  const long long slots = nc * spc;
  const unsigned int grid = fused ? blocks_for(nc, kWarpsPerBlock) : blocks_for(slots, kWarpsPerBlock);
  // Scratch: per-block g^2 partials, then (multi-segment chunks off the fused path) segment sums.
  const std::size_t sq_count = sq_out != nullptr ? grid : 0;
  const std::size_t seg_count = !fused && spc > 1 ? static_cast<std::size_t>(slots) : 0;
  ::agrt::cuda::Scratch scratch((sq_count + seg_count) * sizeof(double), stream, device);
  double* sq_partial = sq_count > 0 ? scratch.as<double>() : nullptr;
  double* seg_partial = seg_count > 0 ? scratch.as<double>() + sq_count : nullptr;
  if (fused) {
    compress_fused<<<grid, kThreads, 0, stream>>>(src, n, chunk, nc, bp, sp, sq_partial);
  } else {
    segment_sums<<<grid, kThreads, 0, stream>>>(src, n, chunk, spc, slots, seg_partial, sp, sq_partial);
    if (seg_partial != nullptr) {
      chunk_scales<<<blocks_for(nc, kThreads), kThreads, 0, stream>>>(seg_partial, n, chunk, spc, nc, sp);
    }
    const long long nbytes = sign_bits_bytes(n);
    pack_bytes<<<blocks_for(nbytes, kThreads), kThreads, 0, stream>>>(src, n, chunk, sp, bp, nbytes);
  }
  if (sq_partial != nullptr) sum_partials<<<1, kThreads, 0, stream>>>(sq_partial, grid, sq_out);
  AGRT_CUDA_CHECK(cudaGetLastError());
  scratch.release();
}

template <class Finish>
void decompress_rows(const SignRows& bits, const SignRows& scales, long long n, std::int64_t chunk, Finish finish,
                     cudaStream_t stream) {
  decompress<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(bits.span.as<const unsigned char>(), bits.row_stride,
                                                               scales.span.as<const float>(), scales.row_stride,
                                                               bits.rows, n, chunk, finish);
  AGRT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void sign_compress(const TensorView& x, const TensorView* error, std::int64_t chunk, const TensorView& bits,
                   const TensorView& scales) {
  ::agrt::cuda::DeviceGuard guard(x.device.index);
  const SignSource src{x.as<const float>(), error != nullptr ? error->as<float>() : nullptr};
  compress(src, x.numel, chunk, bits, scales, nullptr, reinterpret_cast<cudaStream_t>(x.stream), x.device.index);
}

void sign_decompress(const SignRows& bits, const SignRows& scales, const TensorView& out, std::int64_t chunk,
                     float scale) {
  ::agrt::cuda::DeviceGuard guard(out.device.index);
  decompress_rows(bits, scales, out.numel, chunk, PlainFinish{out.as<float>(), scale},
                  reinterpret_cast<cudaStream_t>(out.stream));
}

void onebit_adam_compress(const TensorView& g, const TensorView& denom, const TensorView& u, const TensorView& error,
                          float beta1, float one_minus_beta1, std::int64_t chunk, const TensorView& bits,
                          const TensorView& scales, const TensorView* sq_norm) {
  ::agrt::cuda::DeviceGuard guard(g.device.index);
  const auto stream = reinterpret_cast<cudaStream_t>(g.stream);
  auto* sq = sq_norm != nullptr ? static_cast<double*>(sq_norm->data) : nullptr;
  if (g.numel == 0) {
    if (sq != nullptr) AGRT_CUDA_CHECK(cudaMemsetAsync(sq, 0, sizeof(double), stream));  // +0.0
    return;
  }
  const AdamSource src{g.as<const float>(), denom.as<const float>(), u.as<const float>(), error.as<float>(),
                       AdamCoefficients{beta1, one_minus_beta1}};
  compress(src, g.numel, chunk, bits, scales, sq, stream, g.device.index);
}

void onebit_adam_decompress(const SignRows& bits, const SignRows& scales, const TensorView& out, const TensorView& u,
                            std::int64_t chunk, float scale, float bias) {
  ::agrt::cuda::DeviceGuard guard(out.device.index);
  decompress_rows(bits, scales, out.numel, chunk, AdamFinish{out.as<float>(), u.as<float>(), scale, bias},
                  reinterpret_cast<cudaStream_t>(out.stream));
}

}  // namespace agrt::kernels::cuda
