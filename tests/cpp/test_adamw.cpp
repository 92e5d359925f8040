// Fused Adam/AdamW (CPU): the dispatched (AVX2) path equals the scalar oracle bit for bit, for
// any thread count; bad input throws the documented error and writes nothing.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "agrt_test.h"
#include "autoglm_rt/error.h"
#include "autoglm_rt/kernels/adamw.h"
#include "autoglm_rt/parallel.h"

using namespace agrt;

namespace {

struct Set {
  std::vector<std::vector<float>> p, g, m, v;
};

Set make(const std::vector<std::int64_t>& sizes, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Set s;
  for (auto n : sizes) {
    std::vector<float> p(n), g(n), m(n), v(n);
    for (std::int64_t i = 0; i < n; ++i) {
      p[i] = normal(rng);
      g[i] = normal(rng) * 0.01f;
      m[i] = normal(rng) * 0.001f;
      v[i] = std::fabs(normal(rng)) * 1e-5f;
    }
    s.p.push_back(p);
    s.g.push_back(g);
    s.m.push_back(m);
    s.v.push_back(v);
  }
  return s;
}

std::vector<TensorView> views(std::vector<std::vector<float>>& xs) {
  std::vector<TensorView> out;
  for (auto& x : xs) {
    TensorView t;
    t.data = x.data();
    t.numel = static_cast<std::int64_t>(x.size());
    out.push_back(t);
  }
  return out;
}

bool same_bits(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].size() != b[i].size()) return false;
    if (!a[i].empty() && std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(float)) != 0) return false;
  }
  return true;
}

}  // namespace

TEST(vector_path_equals_scalar_oracle) {
  const std::vector<std::int64_t> sizes{0, 1, 7, 8, 9, 65535, 65537, 200001};
  for (int variant = 0; variant < 3; ++variant) {
    kernels::AdamConfig c;
    c.weight_decay = variant == 0 ? 0.01 : variant == 1 ? 0.05 : 0.0;
    c.decoupled_weight_decay = variant != 1;
    c.maximize = variant == 2;
    c.beta1 = variant == 2 ? 0.3 : 0.9;
    Set a = make(sizes, 7 + variant), b = a;
    const std::vector<double> steps(sizes.size(), 3.0);
    kernels::adam_step(views(a.p), views(a.g), views(a.m), views(a.v), steps, c);
    kernels::adam_step_scalar(views(b.p), views(b.g), views(b.m), views(b.v), steps, c);
    CHECK(same_bits(a.p, b.p));
    CHECK(same_bits(a.m, b.m));
    CHECK(same_bits(a.v, b.v));
  }
}

TEST(thread_count_does_not_change_results) {
  const std::vector<std::int64_t> sizes{300001, 5};
  kernels::AdamConfig c;
  c.weight_decay = 0.01;
  Set a = make(sizes, 3), b = a;
  const std::vector<double> steps{2.0, 9.0};
  const int before = num_threads();
  set_num_threads(1);
  kernels::adam_step(views(a.p), views(a.g), views(a.m), views(a.v), steps, c);
  set_num_threads(4);
  kernels::adam_step(views(b.p), views(b.g), views(b.m), views(b.v), steps, c);
  set_num_threads(before);
  CHECK(same_bits(a.p, b.p) && same_bits(a.m, b.m) && same_bits(a.v, b.v));
}

TEST(bad_input_throws_and_writes_nothing) {
  Set a = make({4, 3}, 1);
  const Set orig = a;
  kernels::AdamConfig c;
  auto p = views(a.p), g = views(a.g), m = views(a.m), v = views(a.v);
  CHECK_THROWS(ValueError, kernels::adam_step(p, g, m, v, {1.0, 0.0}, c));  // step 0
  g[1].dtype = DType::kFloat16;
  CHECK_THROWS(TypeError, kernels::adam_step(p, g, m, v, {1.0, 1.0}, c));
  g[1].dtype = DType::kFloat32;
  m[1].numel = 2;
  CHECK_THROWS(ValueError, kernels::adam_step(p, g, m, v, {1.0, 1.0}, c));
  m[1].numel = 3;
  p[0].read_only = true;
  CHECK_THROWS(ValueError, kernels::adam_step(p, g, m, v, {1.0, 1.0}, c));
  p[0].read_only = false;
  v.pop_back();
  CHECK_THROWS(ValueError, kernels::adam_step(p, g, m, v, {1.0, 1.0}, c));
  CHECK(same_bits(a.p, orig.p) && same_bits(a.m, orig.m) && same_bits(a.v, orig.v));
}

AGRT_TEST_MAIN()
