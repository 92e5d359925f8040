#include "bindings/registry.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

namespace agrt::bindings {
namespace {
std::vector<std::pair<std::string, BindFn>>& registry() {
  static std::vector<std::pair<std::string, BindFn>> r;
  return r;
}
}  // namespace

BindingRegistrar::BindingRegistrar(const char* name, BindFn fn) { registry().emplace_back(name, fn); }

void run_registered_bindings(pybind11::module_& m) {
  auto entries = registry();
  std::sort(entries.begin(), entries.end());
  for (auto& [name, fn] : entries) fn(m);
}

}  // namespace agrt::bindings
