// Fused top-k gradient compression with error feedback, and its scatter-add inverse.
//
// Ranking: entries are ranked by |acc| where acc = grad + residual is computed in float32 (the
// same bits as numpy's float32 addition) and rounded to grad's dtype. NaN ranks above +Inf (every NaN equal), and among equal
// magnitudes the lower index wins, so the selected set is a function of the input alone. The k
// selected entries are written in ascending index order on every device.
#pragma once

#include <cstdint>

#include "autoglm_rt/tensor_view.h"

namespace agrt::kernels {

/// The digits of the radix select over the 31-bit magnitude key (sign bit dropped): 11, 11 and 9
/// bits, most significant first. Shared by the CPU and CUDA twins so their thresholds agree.
inline constexpr int kTopkDigitBits[3] = {11, 11, 9};
inline constexpr int kTopkDigitShift[3] = {20, 9, 0};
inline constexpr std::uint32_t kTopkNanKey = 0x7f800001u;  // every NaN maps here, above +Inf

/// Index dtype used for a tensor of `numel` elements: int32 below 2^31 elements, else int64.
constexpr DType topk_index_dtype(std::int64_t numel) noexcept {
  return numel >= (std::int64_t{1} << 31) ? DType::kInt64 : DType::kInt32;
}

/// Compresses `grad` to its k largest-magnitude entries of acc = grad + residual.
///
/// - grad: float32/float16/bfloat16, numel >= 1. residual: same dtype, device and numel, or
///   numel == 0 / data == nullptr for "no error feedback" (acc = grad).
/// - values: k elements of float32/float16/bfloat16 (rounded to nearest even; overflow -> Inf).
/// - indices: k elements of int32 (only when grad.numel < 2^31) or int64.
/// - On return residual holds acc with the k selected entries set to zero.
/// - 1 <= k <= grad.numel, else ValueError; dtype/device mismatches raise TypeError/ValueError
///   before anything is written.
/// CPU (agrt::parallel_for, deterministic for any thread count): from 2^18 elements and for
/// k <= numel/3, bounds on the threshold are sampled from 256 spread blocks and one pass (read
/// grad+residual, write acc) keeps the ~k entries above the lower one; the exact select then runs
/// over the few between the bounds. If the bounds missed (rare; heavy ties) or the tensor is small,
/// an exact two-pass radix select over acc follows (the worst case reads acc twice more).
/// The float32 pass uses an AVX2 loop with no branch per kept entry where the CPU has AVX2
/// (checked at run time); AUTOGLM_RT_TOPK_SIMD=scalar (read on each call) forces the portable
/// loop, which gives the same bits. Buffers for the kept entries (~8 bytes per kept entry) are
/// cached between calls, at most 256 MiB per process.
/// CUDA: accumulate pass, up to two histogram passes (skipped once a bin is taken whole), a count
/// pass and an emit pass (compiled and desk-checked, not yet run on a GPU).
/// CUDA: runs on grad.stream, never synchronises the host (scratch from cudaMallocAsync).
/// - sq_norm: empty for none, else 8 aligned bytes (any dtype; written as one IEEE float64) on
///   grad's device that receive sum(grad^2) accumulated in float64, computed in the pass that
///   reads grad (CPU: deterministic, per-chunk sums added in chunk order; CUDA: per-block sums
///   added by float64 atomics, so the last bits may vary between runs).
/// - Any two of grad, residual, values, indices, sq_norm sharing a byte: ValueError.
void topk_compress(const TensorView& grad, const TensorView& residual, std::int64_t k,
                   const TensorView& values, const TensorView& indices, const TensorView& sq_norm = {});

/// out[indices[i]] += scale * values[i] for every i; duplicate indices accumulate. Each update is
/// computed in float32 and rounded into out's dtype (float32/float16/bfloat16).
/// With check_indices (the default) every index must lie in [0, out.numel) (checked first:
/// ValueError and out untouched); without it an index outside out is skipped (never written) and
/// nothing is checked up front, so on CUDA the host does not wait at all (for callers whose
/// indices come from topk_compress, such as the DDP hook).
/// CPU: deterministic (per output element, updates apply in the order of `values`).
/// CUDA: atomics (float32 add; a compare-and-swap loop for float16/bfloat16 so that each update is
/// rounded once, as on the CPU), so the summation order of duplicates is not fixed. Runs on out.stream;
/// the index check reads one word back, so the host waits once for that stream's work up to the
/// check (the scatter itself is queued without waiting). Hence not capturable in a CUDA graph
/// unless check_indices is false.
void topk_decompress(const TensorView& values, const TensorView& indices, const TensorView& out,
                     double scale, bool check_indices = true);

#ifdef AGRT_WITH_CUDA
namespace cuda {
void topk_compress(const TensorView& grad, const TensorView& residual, std::int64_t k,
                   const TensorView& values, const TensorView& indices, const TensorView& sq_norm);
void topk_decompress(const TensorView& values, const TensorView& indices, const TensorView& out,
                     double scale, bool check_indices);
}  // namespace cuda
#endif

}  // namespace agrt::kernels
