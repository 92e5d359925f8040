// The CPU top-k kernels against a brute-force stable sort, plus bad input.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "agrt_test.h"
#include "autoglm_rt/detail/half.h"
#include "autoglm_rt/error.h"
#include "autoglm_rt/kernels/topk.h"
#include "autoglm_rt/parallel.h"

using namespace agrt;

namespace {

template <typename T>
TensorView view(std::vector<T>& v, DType t) {
  TensorView tv;
  tv.data = v.data();
  tv.dtype = t;
  tv.numel = static_cast<std::int64_t>(v.size());
  return tv;
}

// Indices of the k largest |x| (NaN largest), ties to the lower index, returned ascending.
std::vector<std::int64_t> brute_force(const std::vector<float>& acc, std::int64_t k) {
  std::vector<std::int64_t> order(acc.size());
  std::iota(order.begin(), order.end(), 0);
  auto rank = [&](std::int64_t i) {
    const float a = acc[static_cast<std::size_t>(i)];
    return std::isnan(a) ? std::numeric_limits<double>::infinity() * 2 : static_cast<double>(std::fabs(a));
  };
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
    const bool na = std::isnan(acc[static_cast<std::size_t>(a)]), nb = std::isnan(acc[static_cast<std::size_t>(b)]);
    if (na != nb) return na;
    return rank(a) > rank(b);
  });
  order.resize(static_cast<std::size_t>(k));
  std::sort(order.begin(), order.end());
  return order;
}

void check_case(std::vector<float> grad, std::vector<float> residual, std::int64_t k) {
  std::vector<float> acc(grad.size());
  for (std::size_t i = 0; i < grad.size(); ++i) acc[i] = grad[i] + residual[i];
  const auto expected = brute_force(acc, k);
  std::vector<float> values(static_cast<std::size_t>(k));
  std::vector<std::int32_t> indices(static_cast<std::size_t>(k));
  kernels::topk_compress(view(grad, DType::kFloat32), view(residual, DType::kFloat32), k,
                         view(values, DType::kFloat32), view(indices, DType::kInt32));
  for (std::int64_t j = 0; j < k; ++j) {
    const auto i = expected[static_cast<std::size_t>(j)];
    CHECK(indices[static_cast<std::size_t>(j)] == i);
    const float want = acc[static_cast<std::size_t>(i)];
    const float got = values[static_cast<std::size_t>(j)];
    CHECK((std::isnan(want) && std::isnan(got)) || got == want);
    acc[static_cast<std::size_t>(i)] = 0.0f;
  }
  for (std::size_t i = 0; i < acc.size(); ++i) {
    CHECK((std::isnan(acc[i]) && std::isnan(residual[i])) || acc[i] == residual[i]);
  }
}

}  // namespace

TEST(compress_matches_brute_force) {
  std::mt19937 rng(42);
  std::normal_distribution<float> normal;
  for (std::int64_t n : {1, 5, 100, 5000, 300000}) {  // 300000: the sampled one-pass path
    for (std::int64_t k : {std::int64_t{1}, std::max<std::int64_t>(1, n / 50), n}) {
      std::vector<float> g(static_cast<std::size_t>(n)), r(static_cast<std::size_t>(n));
      for (auto& x : g) x = normal(rng);
      for (auto& x : r) x = 0.1f * normal(rng);
      check_case(g, r, k);
    }
  }
}

TEST(compress_ties_nan_inf) {
  std::vector<float> g = {1, -2, 2, NAN, INFINITY, -INFINITY, 2, 0, -0.0f, 1};
  for (std::int64_t k = 1; k <= 10; ++k) check_case(g, std::vector<float>(g.size(), 0.0f), k);
  std::vector<float> same(300000, 3.0f);  // every entry ties: the sampled bound overflows
  check_case(same, std::vector<float>(same.size(), 0.0f), 777);
}

// The one-pass path (>= 2^18 elements) at DDP densities, through the AVX2 float32 loop (where the
// CPU has it) and through the portable loop AUTOGLM_RT_TOPK_SIMD=scalar forces; NaN and Inf among
// the kept entries, and a length that leaves a tail in the last block.
TEST(compress_both_inner_loops_match_brute_force) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  const std::int64_t n = 300003;
  std::vector<float> g(static_cast<std::size_t>(n)), r(static_cast<std::size_t>(n));
  for (auto& x : g) x = normal(rng);
  for (auto& x : r) x = 0.1f * normal(rng);
  const float specials[3] = {NAN, INFINITY, -INFINITY};
  for (std::size_t i = 0; i < g.size(); i += 997) g[i] = specials[(i / 997) % 3];
  for (const char* loop : {"auto", "scalar"}) {
    if (std::string(loop) == "scalar") {
      setenv("AUTOGLM_RT_TOPK_SIMD", "scalar", 1);
    } else {
      unsetenv("AUTOGLM_RT_TOPK_SIMD");
    }
    for (std::int64_t k : {n / 1000, n / 100, n / 10}) check_case(g, r, k);
  }
  unsetenv("AUTOGLM_RT_TOPK_SIMD");
}

TEST(compress_half_residual_is_rounded_acc) {
  std::vector<std::uint16_t> g(1000), r(1000);
  for (std::size_t i = 0; i < g.size(); ++i) {
    g[i] = detail::float_to_fp16(static_cast<float>(i % 37) - 18.0f);
    r[i] = detail::float_to_fp16(0.001f * static_cast<float>(i));
  }
  std::vector<float> values(10);
  std::vector<std::int64_t> indices(10);
  const auto r0 = r;
  kernels::topk_compress(view(g, DType::kFloat16), view(r, DType::kFloat16), 10, view(values, DType::kFloat32),
                         view(indices, DType::kInt64));
  std::vector<float> dense(1000, 0.0f);
  kernels::topk_decompress(view(values, DType::kFloat32), view(indices, DType::kInt64), view(dense, DType::kFloat32),
                           1.0);
  for (std::size_t i = 0; i < g.size(); ++i) {
    const float acc = detail::fp16_to_float(
        detail::float_to_fp16(detail::fp16_to_float(g[i]) + detail::fp16_to_float(r0[i])));
    CHECK(dense[i] + detail::fp16_to_float(r[i]) == acc);
  }
}

TEST(decompress_accumulates_and_validates) {
  std::vector<float> values = {1, 2, 3, 4};
  std::vector<std::int32_t> indices = {0, 2, 0, 3};
  std::vector<float> out(4, 1.0f);
  kernels::topk_decompress(view(values, DType::kFloat32), view(indices, DType::kInt32), view(out, DType::kFloat32),
                           0.5);
  CHECK(out[0] == 3.0f && out[1] == 1.0f && out[2] == 2.0f && out[3] == 3.0f);
  indices[1] = 4;
  CHECK_THROWS(ValueError, kernels::topk_decompress(view(values, DType::kFloat32), view(indices, DType::kInt32),
                                                    view(out, DType::kFloat32), 1.0));
  CHECK(out[0] == 3.0f && out[2] == 2.0f);
}

TEST(compress_rejects_bad_input) {
  std::vector<float> g(10, 1.0f), r(10, 0.0f), v(3);
  std::vector<std::int32_t> idx(3);
  std::vector<std::uint16_t> r16(10);
  auto call = [&](const TensorView& gv, const TensorView& rv, std::int64_t k) {
    kernels::topk_compress(gv, rv, k, view(v, DType::kFloat32), view(idx, DType::kInt32));
  };
  CHECK_THROWS(ValueError, call(view(g, DType::kFloat32), view(r, DType::kFloat32), 0));
  CHECK_THROWS(ValueError, call(view(g, DType::kFloat32), view(r, DType::kFloat32), 11));
  CHECK_THROWS(ValueError, call(view(g, DType::kFloat32), view(r, DType::kFloat32), 4));  // outputs hold 3
  CHECK_THROWS(TypeError, call(view(g, DType::kFloat32), view(r16, DType::kFloat16), 3));
  CHECK_THROWS(TypeError, call(view(idx, DType::kInt32), TensorView{}, 3));
  TensorView gpu = view(g, DType::kFloat32);
  gpu.device = Device{DeviceType::kCUDA, 0};
  CHECK_THROWS(ValueError, call(gpu, view(r, DType::kFloat32), 3));
}

TEST(compress_sq_norm_is_float64_sum_of_grad_squares) {
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (const std::int64_t n : {std::int64_t{1}, std::int64_t{1000}, std::int64_t{1} << 19}) {
    std::vector<float> g(static_cast<std::size_t>(n)), r(static_cast<std::size_t>(n));
    for (auto& x : g) x = dist(rng);
    for (auto& x : r) x = 0.1f * dist(rng);
    const std::int64_t k = std::max<std::int64_t>(1, n / 100);
    std::vector<float> v(static_cast<std::size_t>(k));
    std::vector<std::int32_t> idx(static_cast<std::size_t>(k));
    std::vector<std::int64_t> sq_bits(1);
    kernels::topk_compress(view(g, DType::kFloat32), view(r, DType::kFloat32), k, view(v, DType::kFloat32),
                           view(idx, DType::kInt32), view(sq_bits, DType::kInt64));
    double sq = 0;
    std::memcpy(&sq, sq_bits.data(), sizeof sq);
    long double ref = 0;
    for (const float x : g) ref += static_cast<long double>(x) * x;
    CHECK(std::fabs(sq - static_cast<double>(ref)) <= 1e-12 * static_cast<double>(ref));
  }
}

TEST(compress_rejects_overlapping_buffers) {
  std::vector<float> g(100, 1.0f), r(100, 0.0f), v(3);
  std::vector<std::int32_t> idx(3);
  std::vector<std::int64_t> sq(2);
  auto gv = view(g, DType::kFloat32);
  CHECK_THROWS(ValueError, kernels::topk_compress(gv, gv, 3, view(v, DType::kFloat32), view(idx, DType::kInt32)));
  TensorView inside = gv;  // values written into grad
  inside.numel = 3;
  CHECK_THROWS(ValueError,
               kernels::topk_compress(gv, view(r, DType::kFloat32), 3, inside, view(idx, DType::kInt32)));
  TensorView two = view(sq, DType::kInt64);  // 16 bytes: not one float64
  CHECK_THROWS(ValueError, kernels::topk_compress(gv, view(r, DType::kFloat32), 3, view(v, DType::kFloat32),
                                                  view(idx, DType::kInt32), two));
  CHECK(g[0] == 1.0f && r[0] == 0.0f);
}

AGRT_TEST_MAIN()
