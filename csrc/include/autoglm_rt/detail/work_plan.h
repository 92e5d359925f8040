// How the CPU reductions over lists of tensors (grad_stats, add_sumsq) cut their work: tensors
// into items of at most kItemElems elements, consecutive items into tasks of about kTaskCost
// elements for the thread pool. Boundaries depend only on the sizes, so per-item partial results
// merged in item order give the same bits on any thread count.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "autoglm_rt/tensor_view.h"

namespace agrt::detail {

// 256 KiB of float32 per item: large enough that per-item overhead vanishes, small enough that a
// 1e9-element tensor still spreads over every thread and the float64 lane sums stay short.
inline constexpr std::int64_t kItemElems = std::int64_t{1} << 16;
// A task is a run of items worth about this many elements, counting kItemOverhead per item so
// that thousands of tiny tensors are grouped instead of costing one scheduling step each. Below
// one task's worth (512 KiB of float32, ~30 us) the call runs on the caller's thread alone:
// waking a pool worker for a small model's gradients cost more CPU than it saved (measured on a
// 67k-parameter CNN: 204 us per grad_stats call with 2 threads, 74 us with this size).
inline constexpr std::int64_t kTaskCost = std::int64_t{1} << 17;
inline constexpr std::int64_t kItemOverhead = 64;

struct WorkItem {
  std::size_t tensor;
  std::int64_t begin;
  std::int64_t end;
};

struct WorkPlan {
  std::vector<WorkItem> items;
  std::vector<std::size_t> first_item;  // tensors.size() + 1 entries: tensor t owns [first_item[t], first_item[t+1])
  std::vector<std::size_t> task_begin;  // tasks() + 1 entries: task i owns items [task_begin[i], task_begin[i+1])
  std::int64_t tasks() const { return static_cast<std::int64_t>(task_begin.size()) - 1; }
};

inline WorkPlan plan_work(const std::vector<TensorView>& tensors) {
  WorkPlan plan;
  plan.first_item.assign(tensors.size() + 1, 0);
  for (std::size_t t = 0; t < tensors.size(); ++t) {
    plan.first_item[t] = plan.items.size();
    for (std::int64_t b = 0; b < tensors[t].numel; b += kItemElems) {
      plan.items.push_back({t, b, std::min(tensors[t].numel, b + kItemElems)});
    }
  }
  plan.first_item[tensors.size()] = plan.items.size();
  plan.task_begin.push_back(0);
  std::int64_t cost = 0;
  for (std::size_t i = 0; i < plan.items.size(); ++i) {
    cost += plan.items[i].end - plan.items[i].begin + kItemOverhead;
    if (cost >= kTaskCost && i + 1 < plan.items.size()) {
      plan.task_begin.push_back(i + 1);
      cost = 0;
    }
  }
  plan.task_begin.push_back(plan.items.size());
  return plan;
}

}  // namespace agrt::detail
