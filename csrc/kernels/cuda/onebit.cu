// CUDA twin of the fused 1-bit (sign) compression and its averaging inverse, on the caller's
// stream with no host synchronisation. Sums follow the header's order exactly (lane l of a warp
// adds elements l, l + 32, ... of a segment; a shuffle-down tree; segments in order), so scales,
// bits and error equal the CPU twin's bit for bit.
//
//   chunk % 8 == 0 and chunk <= kFusedMaxChunk (the usual case): one kernel, one warp per chunk:
//     segment sums -> scale -> ballot-packed bits and error over the chunk (now in L1/L2).
//   otherwise: bytes may straddle chunks, or a chunk is too long for one warp:
//     segment_sums  one warp per segment; when a chunk is one segment it writes the scale itself
//     chunk_scales  one thread per chunk adds its segments in order (only for multi-segment chunks)
//     pack_bytes    one thread per byte: its eight bits and errors
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

using onebit_detail::chunk_scale;
using onebit_detail::decoded;

// c_i = x_i + e_i in float32; x_i alone without error feedback (as on the CPU).
__device__ __forceinline__ float combined(const float* x, const float* e, long long i) {
  return e != nullptr ? __fadd_rn(x[i], e[i]) : x[i];
}

// Sum of |c| over [lo, hi) (at most one segment) in the header's order; every lane returns it.
__device__ __forceinline__ double warp_segment_sum(const float* x, const float* e, long long lo, long long hi,
                                                   int lane) {
  double acc = 0.0;
  for (long long i = lo + lane; i < hi; i += 32) acc = __dadd_rn(acc, static_cast<double>(fabsf(combined(x, e, i))));
  for (int off = 16; off >= 1; off /= 2) acc = __dadd_rn(acc, __shfl_down_sync(kFullMask, acc, off));
  return __shfl_sync(kFullMask, acc, 0);
}

// One warp per chunk (grid-stride over chunks); chunk % 8 == 0 so no byte spans two chunks.
__global__ void __launch_bounds__(kThreads) compress_fused(const float* __restrict__ x, float* __restrict__ e,
                                                           long long n, long long chunk, long long nc,
                                                           unsigned char* __restrict__ bits,
                                                           float* __restrict__ scales) {
  const int lane = threadIdx.x & 31;
  const long long warps = static_cast<long long>(gridDim.x) * kWarpsPerBlock;
  for (long long j = blockIdx.x * static_cast<long long>(kWarpsPerBlock) + threadIdx.x / 32; j < nc; j += warps) {
    const long long lo = j * chunk;
    const long long hi = lo + chunk < n ? lo + chunk : n;
    double sum = 0.0;
    for (long long s0 = lo; s0 < hi; s0 += kSignSegment) {
      const long long s1 = s0 + kSignSegment < hi ? s0 + kSignSegment : hi;
      sum = __dadd_rn(sum, warp_segment_sum(x, e, s0, s1, lane));
    }
    const float s = chunk_scale(sum, hi - lo);
    if (lane == 0) scales[j] = s;
    for (long long base = lo; base < hi; base += 32) {  // base % 8 == 0
      const long long i = base + lane;
      const bool in = i < hi;
      const float c = in ? combined(x, e, i) : 0.0f;
      const bool pos = in && c >= 0.0f;  // false for NaN
      const unsigned ballot = __ballot_sync(kFullMask, pos);
      if (in && e != nullptr) e[i] = __fsub_rn(c, decoded(pos, s));
      // Lane 8q writes the byte of elements base + 8q .. + 7: all inside this chunk, or past n
      // (padding, whose ballot bits are 0).
      if ((lane & 7) == 0 && in) bits[i >> 3] = static_cast<unsigned char>((ballot >> lane) & 0xffu);
    }
  }
}

// One warp per segment slot: chunk j owns slots [j * spc, (j + 1) * spc); the last chunk's unused
// slots stay unwritten. With one slot per chunk the sum is the chunk's: the scale goes straight
// to `scales`; otherwise to partial[slot].
__global__ void __launch_bounds__(kThreads) segment_sums(const float* __restrict__ x, const float* __restrict__ e,
                                                         long long n, long long chunk, long long spc,
                                                         long long slots, double* __restrict__ partial,
                                                         float* __restrict__ scales) {
  const int lane = threadIdx.x & 31;
  const long long warps = static_cast<long long>(gridDim.x) * kWarpsPerBlock;
  for (long long g = blockIdx.x * static_cast<long long>(kWarpsPerBlock) + threadIdx.x / 32; g < slots; g += warps) {
    const long long j = g / spc;
    const long long chunk_hi = (j + 1) * chunk < n ? (j + 1) * chunk : n;
    const long long lo = j * chunk + (g % spc) * kSignSegment;
    if (lo >= chunk_hi) continue;  // the whole warp skips together
    const long long hi = lo + kSignSegment < chunk_hi ? lo + kSignSegment : chunk_hi;
    const double sum = warp_segment_sum(x, e, lo, hi, lane);
    if (lane == 0) {
      if (partial == nullptr) {
        scales[j] = chunk_scale(sum, chunk_hi - j * chunk);
      } else {
        partial[g] = sum;
      }
    }
  }
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
__global__ void __launch_bounds__(kThreads) pack_bytes(const float* __restrict__ x, float* __restrict__ e,
                                                       long long n, long long chunk,
                                                       const float* __restrict__ scales,
                                                       unsigned char* __restrict__ bits, long long nbytes) {
  for (long long b = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; b < nbytes;
       b += static_cast<long long>(gridDim.x) * blockDim.x) {
    unsigned byte = 0;
    for (int k = 0; k < 8; ++k) {
      const long long i = 8 * b + k;
      if (i >= n) break;
      const float c = combined(x, e, i);
      const bool pos = c >= 0.0f;
      byte |= (pos ? 1u : 0u) << k;
      if (e != nullptr) e[i] = __fsub_rn(c, decoded(pos, scales[i / chunk]));
    }
    bits[b] = static_cast<unsigned char>(byte);
  }
}

// One thread per element: rows added in order in float32 from 0.0f, then scaled.
__global__ void __launch_bounds__(kThreads) decompress(const unsigned char* __restrict__ bits, long long bits_stride,
                                                       const float* __restrict__ scales, long long scales_stride,
                                                       long long rows, float* __restrict__ out, long long n,
                                                       long long chunk, float scale) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long byte = i >> 3;
    const int bit = static_cast<int>(i & 7);
    const long long j = i / chunk;
    float acc = 0.0f;
    for (long long r = 0; r < rows; ++r) {
      const bool set = ((bits[r * bits_stride + byte] >> bit) & 1u) != 0;
      acc = __fadd_rn(acc, decoded(set, scales[r * scales_stride + j]));
    }
    out[i] = __fmul_rn(scale, acc);
  }
}

unsigned int blocks_for(long long work, long long per_block) {
  const long long b = (work + per_block - 1) / per_block;
  return static_cast<unsigned int>(b < 1 ? 1 : (b < kMaxBlocks ? b : kMaxBlocks));
}

}  // namespace

void sign_compress(const TensorView& x, const TensorView* error, std::int64_t chunk, const TensorView& bits,
                   const TensorView& scales) {
  ::agrt::cuda::DeviceGuard guard(x.device.index);
  const auto stream = reinterpret_cast<cudaStream_t>(x.stream);
  const long long n = x.numel;
  const long long nc = sign_chunks(n, chunk);
  const float* xp = x.as<const float>();
  float* ep = error != nullptr ? error->as<float>() : nullptr;
  auto* bp = bits.as<unsigned char>();
  float* sp = scales.as<float>();
  if (chunk % 8 == 0 && chunk <= kFusedMaxChunk) {
    compress_fused<<<blocks_for(nc, kWarpsPerBlock), kThreads, 0, stream>>>(xp, ep, n, chunk, nc, bp, sp);
    AGRT_CUDA_CHECK(cudaGetLastError());
    return;
  }
  const long long spc = (chunk + kSignSegment - 1) / kSignSegment;
  const long long slots = nc * spc;
  if (spc == 1) {
    segment_sums<<<blocks_for(slots, kWarpsPerBlock), kThreads, 0, stream>>>(xp, ep, n, chunk, spc, slots, nullptr,
                                                                             sp);
  } else {
    ::agrt::cuda::Scratch scratch(static_cast<std::size_t>(slots) * sizeof(double), stream, x.device.index);
    auto* partial = scratch.as<double>();
    segment_sums<<<blocks_for(slots, kWarpsPerBlock), kThreads, 0, stream>>>(xp, ep, n, chunk, spc, slots, partial,
                                                                             sp);
    chunk_scales<<<blocks_for(nc, kThreads), kThreads, 0, stream>>>(partial, n, chunk, spc, nc, sp);
    AGRT_CUDA_CHECK(cudaGetLastError());
    scratch.release();
  }
  const long long nbytes = sign_bits_bytes(n);
  pack_bytes<<<blocks_for(nbytes, kThreads), kThreads, 0, stream>>>(xp, ep, n, chunk, sp, bp, nbytes);
  AGRT_CUDA_CHECK(cudaGetLastError());
}

void sign_decompress(const SignRows& bits, const SignRows& scales, const TensorView& out, std::int64_t chunk,
                     float scale) {
  ::agrt::cuda::DeviceGuard guard(out.device.index);
  const auto stream = reinterpret_cast<cudaStream_t>(out.stream);
  const long long n = out.numel;
  decompress<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
      bits.span.as<const unsigned char>(), bits.row_stride, scales.span.as<const float>(), scales.row_stride,
      bits.rows, out.as<float>(), n, chunk, scale);
  AGRT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace agrt::kernels::cuda
