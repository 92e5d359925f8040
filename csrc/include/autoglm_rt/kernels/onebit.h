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
// rounding to float32 almost never shows. "Same bits" below holds for every value that is not
// NaN: a NaN's sign and payload differ between CPU and CUDA (a GPU writes its canonical NaN).
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

/// 1-bit Adam's compress half in one pass over its inputs. Per element, in float32, each
/// operation rounded once and no FMA anywhere (CPU and CUDA alike):
///   p = g / denom;  m = float(beta1) * u + float(1 - beta1) * p;  c = m + error
/// (1 - beta1 computed in float64, then rounded, as torch applies a Python scalar), then
/// sign_compress's rules on c: bits, scales (same float64 order) and error <- c - d, bit for bit
/// what sign_compress(m, error) gives. g, denom, u: float32, n elements, read only; error:
/// float32, n elements, updated. `sq_norm` (not null: 8 bytes, 8-byte aligned, e.g. one int64
/// holding the bits of a float64) receives sum g_i^2 accumulated in float64 in an order fixed by
/// n and chunk alone (overwritten; 0 for n == 0); the CPU and CUDA orders differ.
/// Bad input is refused before anything is written: TypeError for a dtype; ValueError for sizes,
/// devices, chunk < 1, beta1 outside [0, 1) or not finite, a read-only output, float data not
/// 4-byte aligned, and any output (error, bits, scales, sq_norm) sharing a byte with another
/// argument (g, denom and u may share memory with each other: they are only read).
/// CPU: the chunks of a task, 2048 elements at a time while they are in L1: c is computed into
/// the error buffer (which is updated anyway) together with the g^2 lanes, summed from there in
/// the header's order, then bits and the new error are written over it: g, denom, u, error read
/// once, error written once. Tasks as sign_compress's; the g^2 partials of the tasks are added in
/// task order, so no result depends on the thread count or on AVX2 vs the portable loop.
/// CUDA (compiled, not yet run on a GPU): sign_compress's two paths with c computed in the first
/// sweep and kept in error for the second; g^2 per thread, then per block (fixed tree) into
/// agrt::cuda::Scratch, then one block adds the blocks in order. Runs on g.stream, never waits.
void onebit_adam_compress(const TensorView& g, const TensorView& denom, const TensorView& u, const TensorView& error,
                          double beta1, std::int64_t chunk, const TensorView& bits, const TensorView& scales,
                          const TensorView* sq_norm);

/// 1-bit Adam's decompress half in one pass: with avg_i the value sign_decompress(bits, scales,
/// ., chunk, scale) writes (float32 sum over the rows in order, times float(scale)):
///   u_i = avg_i where avg_i is finite (NaN/Inf: u_i unchanged), out_i = avg_i * float(bias).
/// out and u: float32, n elements each. Refused before anything is written: as sign_decompress,
/// plus u's dtype, size, device, read-only or misaligned, scale or bias not finite, and out or u
/// sharing a byte with each other or with bits or scales. CPU: sign_decompress's blocks with the
/// last step writing u and out; CUDA: one thread per element.
void onebit_adam_decompress(const SignRows& bits, const SignRows& scales, const TensorView& out, const TensorView& u,
                            std::int64_t chunk, double scale, double bias);

#ifdef AGRT_WITH_CUDA
namespace cuda {
void sign_compress(const TensorView& x, const TensorView* error, std::int64_t chunk, const TensorView& bits,
                   const TensorView& scales);
void sign_decompress(const SignRows& bits, const SignRows& scales, const TensorView& out, std::int64_t chunk,
                     float scale);
/// n may be 0 (then only sq_norm is written).
void onebit_adam_compress(const TensorView& g, const TensorView& denom, const TensorView& u, const TensorView& error,
                          float beta1, float one_minus_beta1, std::int64_t chunk, const TensorView& bits,
                          const TensorView& scales, const TensorView* sq_norm);
void onebit_adam_decompress(const SignRows& bits, const SignRows& scales, const TensorView& out, const TensorView& u,
                            std::int64_t chunk, float scale, float bias);
}  // namespace cuda
#endif

}  // namespace agrt::kernels
