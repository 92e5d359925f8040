// CPU add_sumsq: the work is cut as grad_stats' (detail/work_plan.h); each item's float64 partial
// sum lands in its own slot and the slots are summed in item order.
#include "autoglm_rt/kernels/accumulate.h"

#include <algorithm>
#include <cstdint>
#include <string>

#include "autoglm_rt/detail/work_plan.h"
#include "autoglm_rt/error.h"
#include "autoglm_rt/parallel.h"

namespace agrt::kernels {
namespace {

constexpr int kLanes = 8;  // independent float64 sums: vectorizable, short dependency chains

double sumsq_range(const float* s, std::int64_t n) {
  double lane[kLanes] = {};
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double v = s[i + l];
      lane[l] += v * v;
    }
  }
  for (; i < n; ++i) lane[0] += static_cast<double>(s[i]) * static_cast<double>(s[i]);
  double total = 0;
  for (double x : lane) total += x;
  return total;
}

double add_sumsq_range(float* d, const float* s, std::int64_t n) {
  double lane[kLanes] = {};
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = s[i + l];
      d[i + l] += v;
      lane[l] += static_cast<double>(v) * static_cast<double>(v);
    }
  }
  for (; i < n; ++i) {
    d[i] += s[i];
    lane[0] += static_cast<double>(s[i]) * static_cast<double>(s[i]);
  }
  double total = 0;
  for (double x : lane) total += x;
  return total;
}

void check(const TensorView& v, const std::string& name) {
  AGRT_EXPECTS(v.device.type == DeviceType::kCPU, TypeError, name, ": add_sumsq runs on CPU tensors, got one on ",
               v.device.str());
  AGRT_EXPECTS(v.dtype == DType::kFloat32, TypeError, name, ": expected dtype float32, got ", dtype_name(v.dtype));
}

}  // namespace

double add_sumsq(const std::vector<TensorView>& dst, const std::vector<TensorView>& src) {
  const bool add = !dst.empty();
  AGRT_EXPECTS(!add || dst.size() == src.size(), ValueError, "dst: expected an empty list or ", src.size(),
               " tensors like src, got ", dst.size());
  for (std::size_t t = 0; t < src.size(); ++t) {
    check(src[t], "src[" + std::to_string(t) + "]");
    if (!add) continue;
    const std::string name = "dst[" + std::to_string(t) + "]";
    check(dst[t], name);
    AGRT_EXPECTS(dst[t].numel == src[t].numel, ValueError, name, ": expected ", src[t].numel,
                 " elements like src[", t, "], got ", dst[t].numel);
    AGRT_EXPECTS(!dst[t].read_only, ValueError, name, ": expected a writable tensor, got a read-only one");
  }

  const agrt::detail::WorkPlan plan = agrt::detail::plan_work(src);
  const auto& items = plan.items;
  const auto& task_begin = plan.task_begin;

  std::vector<double> partial(items.size(), 0.0);
  parallel_for(0, plan.tasks(), 1, [&](std::int64_t tb, std::int64_t te) {
    for (std::int64_t task = tb; task < te; ++task) {
      const auto first = task_begin[static_cast<std::size_t>(task)];
      const auto last = task_begin[static_cast<std::size_t>(task) + 1];
      for (std::size_t i = first; i < last; ++i) {
        const agrt::detail::WorkItem& it = items[i];
        const float* s = src[it.tensor].as<const float>() + it.begin;
        const std::int64_t n = it.end - it.begin;
        partial[i] = add ? add_sumsq_range(dst[it.tensor].as<float>() + it.begin, s, n) : sumsq_range(s, n);
      }
    }
  });
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace agrt::kernels
