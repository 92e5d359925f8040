// Private: the float64 moments grad_stats reduces, and Chan's merge of two of them. Shared by the
// CPU and CUDA kernels (host and device code), so both give the same formulas.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define AGRT_HD __host__ __device__ __forceinline__
#else
#define AGRT_HD inline
#endif

namespace agrt::kernels::detail {

struct Moments {
  double count = 0;      // finite elements
  double nonfinite = 0;  // NaN or Inf
  double sum = 0;
  double sumsq = 0;
  double maxabs = 0;
  double mean = 0;       // of the finite elements (0 while count == 0)
  double m2 = 0;         // sum of squared deviations from mean
};

/// Moments of a block from its raw sums and sums shifted by `shift` (s1 = sum(x - shift),
/// s2 = sum((x - shift)^2)): shifting by a value close to the data keeps M2 = s2 - s1^2/n free of
/// catastrophic cancellation when |mean| >> std.
AGRT_HD Moments moments_from_shifted(double count, double nonfinite, double sum, double sumsq, double maxabs,
                                     double shift, double s1, double s2) {
  Moments m;
  m.count = count;
  m.nonfinite = nonfinite;
  m.sum = sum;
  m.sumsq = sumsq;
  m.maxabs = maxabs;
  if (count > 0) {
    const double d = s1 / count;
    m.mean = shift + d;
    const double m2 = s2 - s1 * d;
    m.m2 = m2 > 0 ? m2 : 0;
  }
  return m;
}

/// a <- a merged with b (Chan et al.); order matters only in the last bits, callers fix it.
AGRT_HD void merge_into(Moments& a, const Moments& b) {
  if (b.count > 0) {
    if (a.count == 0) {
      a.mean = b.mean;
      a.m2 = b.m2;
    } else {
      const double n = a.count + b.count;
      const double delta = b.mean - a.mean;
      const double wb = b.count / n;
      a.mean += delta * wb;
      a.m2 += b.m2 + delta * delta * a.count * wb;
    }
  }
  a.count += b.count;
  a.nonfinite += b.nonfinite;
  a.sum += b.sum;
  a.sumsq += b.sumsq;
  a.maxabs = a.maxabs > b.maxabs ? a.maxabs : b.maxabs;
}

/// Writes one output row (see GradStatsField) for `numel` elements with moments m.
AGRT_HD void write_row(double* row, double numel, const Moments& m) {
  const double nan = static_cast<double>(NAN);
  row[0] = numel;
  row[1] = m.nonfinite;
  row[2] = m.sum;
  row[3] = m.sumsq;
  row[4] = m.maxabs;
  row[5] = m.count > 0 ? m.mean : nan;
  row[6] = m.count > 0 ? m.m2 / m.count : nan;
  row[7] = m.m2;
}

}  // namespace agrt::kernels::detail
