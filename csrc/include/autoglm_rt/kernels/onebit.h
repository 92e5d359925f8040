// Fused 1-bit (sign) compression with error feedback, and its averaging inverse.
//
// Message of a tensor of n float32 elements cut into chunks of `chunk` elements:
//   bits    ceil(n / 8) bytes; bit i % 8 of byte i / 8 (least significant first, numpy's
//           packbits(bitorder="little")) is 1 iff c_i >= 0, where c_i = x_i + error_i in float32
//           (so -0.0 gives 1 and NaN gives 0); the last byte's padding bits are 0.
//   scales  ceil(n / chunk) float32: the mean of |c_i| over each chunk (the last chunk divides
//           by its own length), summed in float64 in the fixed order below, rounded once.
// The decoded value is d_i = +scales[i / chunk] if the bit is set, else -scales[i / chunk].
//
// The float64 sum of a chunk is defined exactly, so that the CPU and CUDA kernels (and any
// thread count) give the same bits: the chunk is cut into segments of kSignSegment elements;
// in a segment, lane l (0..31) adds |c| of elements l, l + 32, l + 64, ... in that order starting
// from 0.0, then lanes are combined by the tree "for off = 16, 8, 4, 2, 1: lane[l] += lane[l + off]
// for l < off" (a warp's shuffle-down reduction); the chunk's sum is 0.0 + seg_0 + seg_1 + ... in
// order. It differs from numpy's pairwise float64 sum in the last float64 bits only, which after
// rounding to float32 almost never shows.
#pragma once

#include <cstdint>

#include "autoglm_rt/tensor_view.h"

namespace agrt::kernels {

/// Elements per summation segment and lanes per segment (see above): shared by both twins.
inline constexpr std::int64_t kSignSegment = 2048;
inline constexpr int kSignLanes = 32;

/// Bytes of packed bits for n elements.
constexpr std::int64_t sign_bits_bytes(std::int64_t n) noexcept { return (n + 7) / 8; }
/// Chunks (scales) for n elements; chunk >= 1.
constexpr std::int64_t sign_chunks(std::int64_t n, std::int64_t chunk) noexcept { return (n + chunk - 1) / chunk; }

/// W equally long rows of one message field, each contiguous, row r starting r * row_stride
/// elements after row 0 (row_stride >= row_len), e.g. the bits or scales of every rank inside one
/// gathered [W, message bytes] buffer. `span` covers (rows - 1) * row_stride + row_len elements
/// from row 0's start (the gaps between rows included: they are never read).
struct SignRows {
  TensorView span;
  std::int64_t rows = 0;
  std::int64_t row_len = 0;
  std::int64_t row_stride = 0;
};

/// Compresses x (float32, n elements, any n >= 0) into `bits` (uint8, sign_bits_bytes(n)) and
/// `scales` (float32, sign_chunks(n, chunk)), and with error feedback (`error` not null: float32,
/// n elements) updates error in place to c_i - d_i (float32). chunk >= 1.
/// Bad input (dtype: TypeError; size, device, chunk, read-only output, float data not 4-byte
/// aligned, any two of x/error/bits/scales sharing a byte: ValueError) is refused before anything
/// is written. n == 0 writes nothing.
/// CPU: one pass per chunk while it is in cache (sum, then bits and error), chunks in groups of
/// about detail::kTaskCost elements spread over agrt::parallel_for (below that, one thread); the
/// bits of the result do not depend on the thread count. AVX2 where the CPU has it, unless
/// AUTOGLM_RT_ONEBIT_SIMD=scalar (read on each call); both loops give the same bits.
/// CUDA (compiled, not yet run on a GPU): chunk % 8 == 0 and chunk <= 16384: one warp per chunk
/// (segment sums, shuffle tree, ballot-packed bits); otherwise per-segment sums, per-chunk
/// scales, then one thread per byte. Runs on x.stream, never synchronises the host (scratch for
/// chunks longer than a segment from agrt::cuda::Scratch on the same stream).
void sign_compress(const TensorView& x, const TensorView* error, std::int64_t chunk, const TensorView& bits,
                   const TensorView& scales);

/// out_i = float(scale) * (0.0f + d_0i + d_1i + ... + d_(W-1)i) in float32, where d_ri is the value
/// decoded from row r of bits (uint8, row_len sign_bits_bytes(n)) and of scales (float32, row_len
/// sign_chunks(n, chunk)), n = out.numel (float32). The order over rows is fixed, so every rank
/// decoding the same rows gets the same bits (CPU, CUDA, any thread count). W may be 0 (out = 0).
/// Bad input is refused before out is written: TypeError for a dtype, ValueError for sizes, a row
/// count that differs between bits and scales, devices, chunk < 1, read-only or misaligned out,
/// out sharing a byte with the span of bits or scales.
/// CPU: blocks of 2048 elements of out, eight per byte with AVX2 (same bits as the scalar loop),
/// spread over agrt::parallel_for. CUDA: one thread per element, grid-stride, on out.stream.
void sign_decompress(const SignRows& bits, const SignRows& scales, const TensorView& out, std::int64_t chunk,
                     double scale);

#ifdef AGRT_WITH_CUDA
namespace cuda {
void sign_compress(const TensorView& x, const TensorView* error, std::int64_t chunk, const TensorView& bits,
                   const TensorView& scales);
void sign_decompress(const SignRows& bits, const SignRows& scales, const TensorView& out, std::int64_t chunk,
                     float scale);
}  // namespace cuda
#endif

}  // namespace agrt::kernels
