// grad_stats (CPU) against a long double reference written as plainly as possible.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "agrt_test.h"
#include "autoglm_rt/detail/half.h"
#include "autoglm_rt/error.h"
#include "autoglm_rt/kernels/grad_stats.h"
#include "autoglm_rt/parallel.h"
#include "kernels/grad_stats_moments.h"

using namespace agrt;
using kernels::kGradStatsFields;

namespace {

struct Ref {
  long double numel = 0, nonfinite = 0, sum = 0, sum_abs = 0, sumsq = 0, maxabs = 0, mean = 0, var = 0;
};

Ref reference(const std::vector<float>& x) {
  Ref r;
  r.numel = static_cast<long double>(x.size());
  long double n = 0;
  for (float v : x) {
    if (!std::isfinite(v)) {
      r.nonfinite += 1;
      continue;
    }
    n += 1;
    r.sum += v;
    r.sum_abs += std::fabs(v);
    r.sumsq += static_cast<long double>(v) * v;
    r.maxabs = std::max<long double>(r.maxabs, std::fabs(v));
  }
  r.mean = n > 0 ? r.sum / n : NAN;
  long double m2 = 0;
  for (float v : x) {
    if (std::isfinite(v)) m2 += (v - r.mean) * (v - r.mean);
  }
  r.var = n > 0 ? m2 / n : NAN;
  return r;
}

bool close(long double got, long double want, long double scale, long double rtol = 1e-6L) {
  return std::fabs(got - want) <= rtol * std::fabs(scale) + 1e-300L;
}

bool matches(const double* row, const Ref& r) {
  bool ok = row[kernels::kStatNumel] == static_cast<double>(r.numel) &&
            row[kernels::kStatNonfinite] == static_cast<double>(r.nonfinite) &&
            close(row[kernels::kStatSum], r.sum, r.sum_abs) && close(row[kernels::kStatSumsq], r.sumsq, r.sumsq) &&
            close(row[kernels::kStatMaxabs], r.maxabs, r.maxabs);
  if (r.numel - r.nonfinite == 0) return ok && std::isnan(row[kernels::kStatMean]) && std::isnan(row[kernels::kStatVar]);
  const long double mean_abs = r.sum_abs / (r.numel - r.nonfinite);
  return ok && close(row[kernels::kStatMean], r.mean, mean_abs) && close(row[kernels::kStatVar], r.var, r.var);
}

// Storage for tensors of any of the three dtypes, with their values as float (the reference).
struct Tensors {
  std::vector<std::vector<float>> f32;
  std::vector<std::vector<std::uint16_t>> h16;
  std::vector<std::vector<float>> values;
  std::vector<TensorView> views;

  void add(const std::vector<float>& v, DType dtype) {
    TensorView t;
    t.dtype = dtype;
    t.numel = static_cast<std::int64_t>(v.size());
    if (dtype == DType::kFloat32) {
      f32.push_back(v);
      values.push_back(v);
      t.data = f32.back().data();
    } else {
      std::vector<std::uint16_t> h(v.size());
      std::vector<float> back(v.size());
      for (std::size_t i = 0; i < v.size(); ++i) {
        h[i] = dtype == DType::kFloat16 ? detail::float_to_fp16(v[i]) : detail::float_to_bf16(v[i]);
        back[i] = dtype == DType::kFloat16 ? detail::fp16_to_float(h[i]) : detail::bf16_to_float(h[i]);
      }
      h16.push_back(std::move(h));
      values.push_back(std::move(back));
      t.data = h16.back().data();
    }
    views.push_back(t);
  }
};

std::vector<double> run(const std::vector<TensorView>& views) {
  std::vector<double> out((views.size() + 1) * kGradStatsFields, -1.0);
  TensorView o;
  o.data = out.data();
  o.dtype = DType::kInt64;
  o.numel = static_cast<std::int64_t>(out.size());
  kernels::grad_stats(views, o, TensorView{});
  return out;
}

bool check_all(Tensors& ts) {
  const auto out = run(ts.views);
  bool ok = true;
  std::vector<float> all;
  for (std::size_t i = 0; i < ts.views.size(); ++i) {
    if (!matches(out.data() + i * kGradStatsFields, reference(ts.values[i]))) {
      std::fprintf(stderr, "  tensor %zu (numel %lld) differs\n", i, static_cast<long long>(ts.views[i].numel));
      ok = false;
    }
    all.insert(all.end(), ts.values[i].begin(), ts.values[i].end());
  }
  if (!matches(out.data() + ts.views.size() * kGradStatsFields, reference(all))) {
    std::fprintf(stderr, "  total differs\n");
    ok = false;
  }
  return ok;
}

std::vector<float> normal(std::size_t n, float mean, float std, unsigned seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(mean, std);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

}  // namespace

TEST(sizes_around_every_boundary_and_all_dtypes) {
  Tensors ts;
  unsigned seed = 1;
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (std::size_t n : {0, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 65535, 65536, 65537, 140001}) {
      ts.add(normal(n, 0.5f, 2.0f, seed++), dt);
    }
  }
  CHECK(check_all(ts));
}

TEST(non_finite_values_are_counted_and_excluded) {
  Tensors ts;
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  auto v = normal(1000, 3.0f, 1.0f, 7);
  v[0] = nan;  // the shift must come from the next finite element
  v[64] = inf;
  v[500] = -inf;
  v[999] = nan;
  ts.add(v, DType::kFloat32);
  ts.add(v, DType::kBFloat16);
  ts.add(std::vector<float>(100, nan), DType::kFloat32);
  ts.add(std::vector<float>(70, inf), DType::kFloat16);
  CHECK(check_all(ts));
  const auto out = run(ts.views);
  CHECK(out[2 * kGradStatsFields + kernels::kStatNonfinite] == 100);
  CHECK(out[2 * kGradStatsFields + kernels::kStatMaxabs] == 0);
  CHECK(std::isnan(out[2 * kGradStatsFields + kernels::kStatVar]));
}

TEST(values_outside_the_float32_square_range_stay_exact) {
  Tensors ts;
  std::vector<float> huge(300, 1.0f);
  huge[5] = 3e38f;
  huge[200] = -2e30f;
  ts.add(huge, DType::kFloat32);
  ts.add(normal(500, 0.0f, 1e-25f, 9), DType::kFloat32);  // squares underflow float32
  ts.add(normal(300, 1e20f, 1e18f, 10), DType::kBFloat16);
  CHECK(check_all(ts));
}

TEST(far_from_zero_mean_keeps_the_variance) {
  Tensors ts;
  ts.add(normal(100000, 1e4f, 0.05f, 11), DType::kFloat32);
  CHECK(check_all(ts));
}

TEST(bit_identical_for_any_thread_count) {
  Tensors ts;
  for (unsigned i = 0; i < 300; ++i) ts.add(normal(i * 37 % 500, 0.1f, 1.0f, i), DType::kFloat32);
  ts.add(normal(300000, 0.0f, 1.0f, 12), DType::kFloat32);
  CHECK(check_all(ts));
  set_num_threads(1);
  const auto one = run(ts.views);
  set_num_threads(5);
  const auto five = run(ts.views);
  set_num_threads(2);
  CHECK(std::memcmp(one.data(), five.data(), one.size() * sizeof(double)) == 0);
}

TEST(chan_merge_of_parts_equals_the_whole) {
  // moments of [a | b] from moments of a and b.
  const auto v = normal(1000, 5.0f, 2.0f, 13);
  auto moments = [](const float* p, std::size_t n) {
    kernels::detail::Moments m;
    for (std::size_t i = 0; i < n; ++i) {
      kernels::detail::Moments one = kernels::detail::moments_from_shifted(1, 0, p[i], double(p[i]) * p[i],
                                                                           std::fabs(p[i]), p[i], 0, 0);
      kernels::detail::merge_into(m, one);
    }
    return m;
  };
  auto whole = moments(v.data(), v.size());
  auto left = moments(v.data(), 300);
  const auto right = moments(v.data() + 300, 700);
  kernels::detail::merge_into(left, right);
  CHECK(std::fabs(left.mean - whole.mean) < 1e-12 && std::fabs(left.m2 - whole.m2) < 1e-9 * whole.m2);
  CHECK(left.count == 1000 && std::fabs(left.sum - whole.sum) < 1e-9 * std::fabs(whole.sum));
}

TEST(bad_arguments_throw) {
  std::vector<float> x(10, 1.0f);
  TensorView t;
  t.data = x.data();
  t.numel = 10;
  std::vector<double> out(2 * kGradStatsFields);
  TensorView o;
  o.data = out.data();
  o.dtype = DType::kInt64;
  o.numel = 2 * kGradStatsFields;
  TensorView bad_dtype = t;
  bad_dtype.dtype = DType::kInt32;
  CHECK_THROWS(TypeError, kernels::grad_stats({bad_dtype}, o, TensorView{}));
  TensorView bad_out = o;
  bad_out.dtype = DType::kFloat32;
  CHECK_THROWS(TypeError, kernels::grad_stats({t}, bad_out, TensorView{}));
  bad_out = o;
  bad_out.numel = kGradStatsFields;
  CHECK_THROWS(ValueError, kernels::grad_stats({t}, bad_out, TensorView{}));
  bad_out = o;
  bad_out.read_only = true;
  CHECK_THROWS(ValueError, kernels::grad_stats({t}, bad_out, TensorView{}));
  TensorView other = t;
  other.device = Device{DeviceType::kCUDA, 0};
  std::vector<double> out3(3 * kGradStatsFields);
  TensorView o3 = o;
  o3.data = out3.data();
  o3.numel = 3 * kGradStatsFields;
  CHECK_THROWS(ValueError, kernels::grad_stats({t, other}, o3, TensorView{}));
  TensorView null_data = t;
  null_data.data = nullptr;
  CHECK_THROWS(ValueError, kernels::grad_stats({null_data}, o, TensorView{}));
  CHECK(kernels::grad_stats_workspace_bytes({t}) == 0);
#ifndef AGRT_WITH_CUDA
  TensorView cuda_out = o;
  cuda_out.device = other.device;
  CHECK_THROWS(ValueError, kernels::grad_stats({other}, cuda_out, TensorView{}));
#endif
}

AGRT_TEST_MAIN()
