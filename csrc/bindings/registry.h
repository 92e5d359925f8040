// Each binding file registers its own functions with AGRT_BINDINGS(name) { ... }, so adding a
// component touches no shared file. module.cpp runs the registered functions in name order.
#pragma once

#include <pybind11/pybind11.h>

namespace agrt::bindings {

using BindFn = void (*)(pybind11::module_&);

struct BindingRegistrar {
  BindingRegistrar(const char* name, BindFn fn);
};

void run_registered_bindings(pybind11::module_& m);

}  // namespace agrt::bindings

#define AGRT_BINDINGS(name)                                                              \
  static void agrt_bind_##name(pybind11::module_& m);                                     \
  static const ::agrt::bindings::BindingRegistrar agrt_registrar_##name(#name, &agrt_bind_##name); \
  static void agrt_bind_##name(pybind11::module_& m)
